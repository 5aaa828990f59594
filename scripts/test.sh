#!/usr/bin/env bash
# Set up and run every test on a fresh machine: install torch (CPU build) and the test deps, build the
# C++ extension against that torch, run the C++ test executable, then pytest (compiled path required).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

"$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$PY" -m pip install -q -r requirements-test.txt
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "import fsdp_fastload, sys; ok = fsdp_fastload.extension_available(); print('extension_available:', ok); sys.exit(0 if ok else 'the C++ extension did not build or load')"

# The same csrc/ built by CMake into a C++ test executable.
prefix=$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build build/cmake
ctest --test-dir build/cmake --output-on-failure

# Again under AddressSanitizer: the C++ tests feed read_ranges out-of-range and overflowing ranges,
# which must be refused before pread writes a byte (ASan aborts on any out-of-bounds write, also inside
# pread). LeakSanitizer stays on: with torch 2.13 it reports nothing, so no ASAN_OPTIONS needed.
cmake -S . -B build/cmake-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFSDP_FASTLOAD_ASAN=ON \
  -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build build/cmake-asan
ctest --test-dir build/cmake-asan --output-on-failure

export FSDP_FASTLOAD_REQUIRE_EXTENSION=1
"$PY" -m pytest tests "$@"

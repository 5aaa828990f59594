#!/usr/bin/env bash
# A lent GPU's whole check in one call (the session's device time is short): build the extension
# against that machine's torch, diagnose its error path, run the tests that need CUDA, the one-GPU
# benchmark and the demo on CUDA. Every stage has a time limit inside BUDGET seconds; logs and
# tables go to $OUT (./gpu_out: eight files, what the device tool brings back).
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-450}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
limit() { local l; l=$(left); (( l < $1 )) && echo "$l" || echo "$1"; }
stage() { echo "=== $1 at $(( $(date +%s) - T0 )) s (limit $2 s)"; }
STAGES=" ${STAGES:-env build tests bench raise demo probe} "  # a shorter call: STAGES="build raise tests"
# "suite" (not in the default): the rest of tests/ on this machine's torch, with CUDA present
# (SUITE_FILES: those files, in that order, instead of tests/: a short stage reaches the ones named first)
want() { [[ "$STAGES" == *" $1 "* ]]; }

if want env; then
stage env 30
{ nvidia-smi -L; nproc; $PY -c "import sys, torch, transformers, accelerate, safetensors
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(),
      'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'safetensors', safetensors.__version__)"
} 2>&1 | tee "$OUT/env.txt"
fi

if want build; then
stage build "$(limit 120)"
rm -rf build fsdp_fastload/_C*.so
timeout "$(limit 120)" $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "build rc=$?"; tail -3 "$OUT/build.log"
$PY -c "import fsdp_fastload as f; print('extension_available', f.extension_available())"
fi

if want tests; then
stage tests "$(limit 150)"
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")  # a crashing test then fails alone
FSDP_FASTLOAD_REQUIRE_EXTENSION=1 timeout "$(limit 150)" $PY -m pytest -p no:cacheprovider -q $XDIST -rf \
    --tb=short --durations=5 ${CUDA_TESTS:-tests/test_cuda.py tests/test_ops.py tests/test_layout.py} > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|error|FAILED|ERROR|crashed" "$OUT/pytest.log" | cut -c1-300 | tail -30
fi

if want bench; then
stage bench "$(limit 120)"
timeout "$(limit 120)" $PY benchmarks/gpu_bench.py --models medium,1b --runs 3 --out "$OUT/bench.md" \
    ${BENCH_METHODS:+--methods "$BENCH_METHODS"} \
    > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; grep -E "^\[|Error|error" "$OUT/bench.log" | tail -25
fi

if want suite; then
stage suite "$(limit 240)"
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n ${SUITE_WORKERS:-12}")
# (-v: each test's outcome is in the log as it ends, also when the stage runs out of time)
timeout "$(limit 240)" $PY -m pytest -p no:cacheprovider -v $XDIST -rf --tb=short --durations=5 ${SUITE_FILES:-tests} \
    --ignore=tests/test_cuda.py --ignore=tests/test_ops.py --ignore=tests/test_layout.py > "$OUT/suite.log" 2>&1
echo "suite rc=$?"; grep -cE " PASSED " "$OUT/suite.log"; grep -E " passed|FAILED|ERROR|crashed" "$OUT/suite.log" | cut -c1-300 | tail -30
fi

if want raise; then
stage raise "$(limit 120)"
# An error raised inside the extension must reach Python whole, as a RuntimeError: on the GPU image
# of 2026-11-26 it crashed the process (the build linked its own static libstdc++; see that script).
OUT="$OUT" PYTHON=$PY timeout "$(limit 120)" bash benchmarks/gpu_diag_raise.sh | head -70
fi

if want demo; then
stage demo "$(limit 40)"
timeout "$(limit 40)" $PY -m fsdp_fastload demo --device cuda --nproc 1 > "$OUT/demo.log" 2>&1
echo "demo rc=$?"; tail -12 "$OUT/demo.log"
fi

if want probe; then
stage probe "$(limit 40)"
timeout "$(limit 40)" $PY benchmarks/gpu_align_probe.py 2>&1 | grep "^|" | tee "$OUT/align_probe.md"
fi

echo "=== done at $(( $(date +%s) - T0 )) s"

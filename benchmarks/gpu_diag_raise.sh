#!/usr/bin/env bash
# Why does an error raised inside the extension segfault on the GPU image (torch 2.11.0+cu130,
# Python 3.12.3, /opt/gcc/bin/g++ 13.3; the same libstdc++ 6.0.33 for both compilers there) while it
# raises cleanly here (torch 2.11/2.13, g++ 12)? Run from the repository root on that machine; one
# report file, $OUT/raise_diag.txt. Builds under /tmp (the checkout's own build is left alone).
set -u; OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; PY=${PYTHON:-python3}; export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/raise_diag.txt") 2>&1
R='import os, torch; from fsdp_fastload import ops
f = ops.alloc(4096, "cpu"); s = ops.encode_spec([torch.float32], [8], [(4,)])
cases = [("alloc", lambda: ops.alloc(-1, "cpu")), ("bad dtype", lambda: ops.carve(f, [99, 0, 0])),
         ("misaligned", lambda: ops.carve(f[1:], s)),
         ("read past EOF (returned, raised in Python)", lambda: ops.read_ranges("/proc/self/cmdline", f, [1 << 30], [0], [8])),
         # thrown by the caching allocator, through the op: does a throw inside libtorch crash too?
         ("cuda OOM in alloc", lambda: torch.ops.fsdp_fastload.alloc(1 << 50, torch.device("cuda"), False)),
         ("cuda OOM, refused before the op", lambda: ops.alloc(1 << 50, "cuda")),
         ("cuda OOM, no extension frame", lambda: torch.empty(1 << 50, dtype=torch.uint8, device="cuda"))]
crashed = 0
for n, c in cases:  # each in a child of its own: one crash does not hide the next case
    pid = os.fork()
    if pid == 0:
        try: c(); print(n, "NO RAISE", flush=True)
        except Exception as e: print(n, "raised:", type(e).__name__, str(e)[:70], flush=True)
        os._exit(0)
    st = os.waitpid(pid, 0)[1]
    if os.WIFSIGNALED(st): print(n, "CRASHED: signal", os.WTERMSIG(st), flush=True); crashed = 1
raise SystemExit(crashed)'
echo "CXX=${CXX:-} CC=${CC:-} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"; which -a g++ c++
for c in /opt/gcc/bin/g++ /usr/bin/g++; do [ -x "$c" ] && { echo "== $c"; file -L "$c" | cut -c1-120
  $c --version | head -1; realpath "$($c -print-file-name=libstdc++.so.6)" "$($c -print-file-name=libgcc_s.so.1)"; }; done
$PY -c "import torch; print(torch.__version__, torch._C._GLIBCXX_USE_CXX11_ABI)
print(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'stdc++' in l or 'gcc_s' in l}))"
b() {  # b NAME [env...]: a clean build in /tmp/diag-NAME, then raise there
  local d=/tmp/diag-$1; rm -rf "$d"; mkdir -p "$d"; cp -r setup.py pyproject.toml csrc fsdp_fastload "$d"/
  (cd "$d" && rm -f fsdp_fastload/_C*.so && env "${@:2}" timeout 120 $PY setup.py build_ext --inplace > build.log 2>&1
   echo "== $1 build rc=$?"; grep -m2 -o "^\[[12]/[0-9]\] [^ ]*\|^[^ ]*g++ [^ ]* -shared" build.log
   objdump -T fsdp_fastload/_C.abi3.so 2>/dev/null | grep -o "GLIBCXX_[0-9.]*\|CXXABI_[0-9.]*" | sort -uV | tail -2 | tr '\n' ' '
   ldd fsdp_fastload/_C.abi3.so | grep -E "stdc|gcc_s"
   timeout 60 $PY -c "$R"; rc=$?; echo "== $1 raise rc=$rc"
   TORCH_SHOW_CPP_STACKTRACES=0 TORCH_DISABLE_ADDR2LINE=1 timeout 60 $PY -c "$R"; echo "== $1 raise, no C++ stack traces: rc=$?"
   if [ $rc != 0 ] && command -v cuda-gdb >/dev/null; then  # no gdb there; cuda-gdb debugs host code
     timeout 90 cuda-gdb -q -batch -ex run -ex bt --args $PY -c "$R" 2>&1 | grep -E "^#|SIGSEGV" | head -30; fi)
}
b default
[ -x /usr/bin/g++ ] && b system CC=/usr/bin/gcc CXX=/usr/bin/g++
b O0 DEBUG=1

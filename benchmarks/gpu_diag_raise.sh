#!/usr/bin/env bash
# Do the extension's errors reach Python whole on this machine? On the GPU image of 2026-11-26
# (torch 2.11.0+cu130, Python 3.12.3, CXX=/opt/gcc/bin/g++, a wrapper script around g++ 13.3) every
# error raised or returned by the extension crashed the process: that build had no libstdc++ among
# its needed libraries, a static copy of its own beside torch's shared one, and (reproduced on CPU with
# LDFLAGS=-static-libstdc++) the copy's iostreams cut each message at its first number. setup.py now
# links the shared libstdc++ first. This checks the extension in the checkout (build it first), and
# with DIAG_BUILDS=1 also clean builds under /tmp with each compiler. One report: $OUT/raise_diag.txt.
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
        except Exception as e: print(n, "raised:", type(e).__name__, repr(str(e).splitlines()[0][:110]), flush=True)
        os._exit(0)
    st = os.waitpid(pid, 0)[1]
    if os.WIFSIGNALED(st): print(n, "CRASHED: signal", os.WTERMSIG(st), flush=True); crashed = 1
raise SystemExit(crashed)'
echo "CXX=${CXX:-} CC=${CC:-} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"; which -a g++ c++
[ -n "${CXX:-}" ] && file -L "$CXX" | grep -q "shell script" && { echo "== $CXX:"; head -c 2000 "$CXX"; echo; }
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
so=$(ls fsdp_fastload/_C*.so 2>/dev/null | head -1)
if [ -n "$so" ]; then
  echo "== checkout's $so"; ldd "$so" | grep -E "stdc|gcc_s"
  objdump -T "$so" 2>/dev/null | grep -o "GLIBCXX_[0-9.]*" | sort -uV | tail -1
  timeout 60 $PY -c "$R"; echo "== checkout raise rc=$?"
fi
if [ "${DIAG_BUILDS:-0}" = 1 ]; then
  b default
  [ -x /usr/bin/g++ ] && b system CC=/usr/bin/gcc CXX=/usr/bin/g++
fi

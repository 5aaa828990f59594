"""Build fsdp-fastload: the Python package plus the abi3 C++ extension `fsdp_fastload._C`.

Build against the torch already installed (an isolated build env would download another torch):
    pip install --no-build-isolation -e .        # or: pip wheel --no-build-isolation --no-deps .
Set FSDP_FASTLOAD_BUILD_EXT=0 to skip the extension (the package then uses its pure-PyTorch fallback).
The C++ compiler must match the libstdc++ torch runs with (see `_pick_compiler`).
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup

LIMITED_API = "0x03090000"  # CPython 3.9: one wheel for every later CPython
BUILD_EXT = os.environ.get("FSDP_FASTLOAD_BUILD_EXT", "1") != "0"


def _libstdcxx_of(cxx):
    """Real path of the libstdc++.so.6 that the C++ compiler `cxx` links against, or None."""
    try:
        out = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return os.path.realpath(out) if os.path.isabs(out) and os.path.exists(out) else None


def _loaded_libstdcxx():
    """Real path of the libstdc++ this process (Python, torch) has loaded, or None (not Linux, none)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libstdc++.so" in line}
    except OSError:
        return None
    return os.path.realpath(paths.pop()) if len(paths) == 1 else None


def _glibcxx(path):
    """The newest GLIBCXX_x.y.z symbol version a libstdc++ provides, as a tuple (() if unreadable)."""
    try:
        with open(path, "rb") as f:
            found = re.findall(rb"GLIBCXX_(\d+)\.(\d+)(?:\.(\d+))?\x00", f.read())
    except OSError:
        return ()
    return max((tuple(int(x or 0) for x in v) for v in found), default=())


def _pick_compiler():
    """Build with a C++ compiler whose libstdc++ is not newer than the one torch runs with. A compiler
    of a newer toolchain (seen: CXX=/opt/gcc/bin/g++ beside the system's older libstdc++, on a GPU
    image) builds an extension that imports and runs, but the inline library code its headers put in
    the extension then runs against the older library: a segfault on the first error the extension
    raises. Such a compiler is replaced by one that links torch's own libstdc++, if there is one here
    (said on the build's output); FSDP_FASTLOAD_KEEP_CXX=1 keeps it."""
    import torch  # noqa: F401  (loads the runtime libstdc++ through libc10)

    cxx = os.environ.get("CXX", "c++")
    runtime, mine = _loaded_libstdcxx(), _libstdcxx_of(cxx)
    if (runtime is None or mine is None or runtime == mine or os.environ.get("FSDP_FASTLOAD_KEEP_CXX") == "1"
            or _glibcxx(mine) <= _glibcxx(runtime)):
        return
    for cand in ("/usr/bin/g++", "g++", "c++"):
        path = shutil.which(cand)
        if path and _libstdcxx_of(path) == runtime:
            cc = shutil.which(os.path.join(os.path.dirname(path), "gcc"))
            print(f"fsdp_fastload: the C++ compiler {cxx} links {mine}, newer than the {runtime} torch runs "
                  f"with: building with {path} instead (FSDP_FASTLOAD_KEEP_CXX=1 keeps {cxx})")
            os.environ["CXX"] = path
            if cc:
                os.environ["CC"] = cc
            return
    print(f"fsdp_fastload: WARNING: the C++ compiler {cxx} links {mine}, newer than the {runtime} torch runs "
          "with, and no compiler here links that one: the extension may crash when it raises an error. "
          "Point CXX at a compiler of torch's libstdc++, or set FSDP_FASTLOAD_BUILD_EXT=0.")


def extensions():
    if not BUILD_EXT:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    _pick_compiler()
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(
        os.path.relpath(p, here)
        for p in glob.glob(os.path.join(here, "csrc", "*.cpp"))
        if not os.path.basename(p).startswith("test_")
    )
    debug = os.environ.get("DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    ext = CppExtension(
        "fsdp_fastload._C",
        sources,
        extra_compile_args={"cxx": cxx + [f"-DPy_LIMITED_API={LIMITED_API}"]},
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["fsdp_fastload", "fsdp_fastload.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)

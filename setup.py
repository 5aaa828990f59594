"""Build fsdp-fastload: the Python package plus the abi3 C++ extension `fsdp_fastload._C`.

Build against the torch already installed (an isolated build env would download another torch):
    pip install --no-build-isolation -e .        # or: pip wheel --no-build-isolation --no-deps .
Set FSDP_FASTLOAD_BUILD_EXT=0 to skip the extension (the package then uses its pure-PyTorch fallback).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

LIMITED_API = "0x03090000"  # CPython 3.9: one wheel for every later CPython
BUILD_EXT = os.environ.get("FSDP_FASTLOAD_BUILD_EXT", "1") != "0"


def extensions():
    if not BUILD_EXT:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

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
        # The C++ runtime torch uses, shared: a compiler that links its own copy statically (a g++
        # wrapper adding -static-libstdc++, as on one GPU image) gives the process two runtimes, and
        # the copy's iostreams cut every error message at its first number or crash the process.
        # Named before the compiler's own -lstdc++, the shared library defines every symbol first.
        extra_link_args=["-lstdc++"] if sys.platform.startswith("linux") else [],
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

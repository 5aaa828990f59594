"""Build fsdp-fastload: the Python package plus the abi3 C++ extension `fsdp_fastload._C`.

Build against the torch already installed (an isolated build env would download another torch):
    pip install --no-build-isolation -e .        # or: pip wheel --no-build-isolation --no-deps .
Set FSDP_FASTLOAD_BUILD_EXT=0 to skip the extension (the package then uses its pure-PyTorch fallback).
"""
import glob
import os

from setuptools import find_packages, setup

LIMITED_API = "0x03090000"  # CPython 3.9: one wheel for every later CPython
BUILD_EXT = os.environ.get("FSDP_FASTLOAD_BUILD_EXT", "1") != "0"


def _torch_libstdcxx():
    """The shared libstdc++ torch runs with, as a link input, so the extension needs that library.

    A toolchain whose library directory holds only libstdc++.a (the g++ wrapper of one GPU image,
    2026-11-26) links its own static copy into the extension: two C++ runtimes in one process, and
    the copy's iostreams cut every error message at its first number or crash the process. Named
    here, before the compiler's own -lstdc++, the shared library defines every symbol first."""
    try:
        with open("/proc/self/maps") as maps:  # torch is imported: its libstdc++ is mapped
            for line in maps:
                fields = line.rstrip("\n").split(None, 5)
                path = fields[5] if len(fields) == 6 else ""
                if os.path.basename(path).startswith("libstdc++.so") and os.path.isfile(path):
                    return [path]
    except OSError:
        pass
    return []


def extensions():
    if not BUILD_EXT:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension  # imports torch

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
        extra_link_args=_torch_libstdcxx(),
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

"""The C++ ops (`torch.ops.fsdp_fastload.*`), their fake kernels, and their pure-PyTorch fallbacks.

Each public function here dispatches to the compiled op when `fsdp_fastload._C` loaded and to the
fallback next to it otherwise. The fallbacks are the specification: tests compare the two.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import stat as _stat
from itertools import chain
from typing import Sequence

import torch

logger = logging.getLogger("fsdp_fastload")

# Dtype codes shared with csrc/ops.cpp (kDtypes): the index in this tuple is the code.
_DTYPES: tuple[torch.dtype, ...] = (
    torch.uint8, torch.int8, torch.int16, torch.int32,
    torch.int64, torch.float16, torch.float32, torch.float64,
    torch.complex64, torch.complex128, torch.bool, torch.bfloat16,
    torch.float8_e5m2, torch.float8_e4m3fn,
    torch.float8_e5m2fnuz, torch.float8_e4m3fnuz,
    torch.uint16, torch.uint32, torch.uint64,
    torch.float8_e8m0fnu, torch.float4_e2m1fn_x2,  # (MX scales; two float4 values a byte)
)
DTYPE_CODE: dict[torch.dtype, int] = {d: i for i, d in enumerate(_DTYPES)}

_state = {"loaded": None, "reason": ""}


def _load_extension() -> bool:
    """Import `fsdp_fastload._C` once; log once (and never raise) when falling back."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    if os.environ.get("FSDP_FASTLOAD_DISABLE_EXTENSION", "0") not in ("", "0"):
        _state.update(loaded=False, reason="FSDP_FASTLOAD_DISABLE_EXTENSION is set")
        logger.info("fsdp_fastload: using the pure-PyTorch ops (%s)", _state["reason"])
        return False
    try:
        importlib.import_module("fsdp_fastload._C")
        torch.ops.fsdp_fastload.carve  # noqa: B018  (the registration really happened)
    except Exception as e:  # a missing build, a torch ABI mismatch, a broken .so: all fall back
        _state.update(loaded=False, reason=f"{type(e).__name__}: {e}")
        logger.warning(
            "fsdp_fastload: compiled extension unavailable, using the pure-PyTorch ops (%s). "
            "Build it with `pip install --no-build-isolation .`", _state["reason"])
        return False
    _register_fakes()
    _state.update(loaded=True, reason="")
    return True


def extension_available() -> bool:
    """Whether the compiled C++ ops (`fsdp_fastload._C`) are in use.

    Example::

        >>> import fsdp_fastload
        >>> isinstance(fsdp_fastload.extension_available(), bool)
        True
    """
    return _load_extension()


# ----------------------------------------------------------------------------------- spec helpers

def encode_spec(dtypes: Sequence[torch.dtype], offsets: Sequence[int],
                shapes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]] | None = None
                ) -> list[int]:
    """Flatten view descriptions into carve's int list: per view [code, offset, ndim, *sizes,
    *strides], or, without `strides` (contiguous views), [code, offset, -ndim - 1, *sizes]."""
    codes = [DTYPE_CODE[d] for d in dtypes]
    if strides is None:
        return list(chain.from_iterable((c, o, -len(s) - 1, *s) for c, o, s in zip(codes, offsets, shapes)))
    return list(chain.from_iterable((c, o, len(s), *s, *st) for c, o, s, st in zip(codes, offsets, shapes, strides)))


def contiguous_strides(shape: Sequence[int]) -> list[int]:
    """The strides of a contiguous tensor of `shape` (a size-0 dimension counts as 1)."""
    strides, acc = [0] * len(shape), 1
    for d in range(len(shape) - 1, -1, -1):
        strides[d] = acc
        acc *= max(int(shape[d]), 1)
    return strides


def _decode_spec(spec: Sequence[int]):
    i, n = 0, len(spec)
    while i < n:
        if i + 3 > n:
            raise RuntimeError(f"fsdp_fastload carve: truncated spec at offset {i}")
        code, off, raw = spec[i], spec[i + 1], spec[i + 2]
        if not 0 <= code < len(_DTYPES):
            raise RuntimeError(f"fsdp_fastload: unknown dtype code {code} (expected 0..{len(_DTYPES) - 1})")
        contiguous = raw < 0
        ndim = -raw - 1 if contiguous else raw
        words = ndim if contiguous else 2 * ndim
        if ndim > 64 or i + 3 + words > n:
            raise RuntimeError(f"fsdp_fastload carve: bad ndim {raw}")
        sizes = list(spec[i + 3:i + 3 + ndim])
        strides = contiguous_strides(sizes) if contiguous else list(spec[i + 3 + ndim:i + 3 + 2 * ndim])
        yield _DTYPES[code], off, sizes, strides
        i += 3 + words


def _check_flat(flat: torch.Tensor, op: str) -> None:
    if flat.dtype != torch.uint8 or flat.dim() != 1 or not flat.is_contiguous():
        raise RuntimeError(
            f"{op}: expected a 1-D contiguous uint8 buffer (got dtype {flat.dtype}, {flat.dim()} dims). "
            "Pass the tensor returned by fsdp_fastload alloc.")


# ----------------------------------------------------------------------------- fallbacks (the spec)

def _alloc_ref(nbytes: int, device: torch.device, pin_memory: bool = False) -> torch.Tensor:
    if nbytes < 0:
        raise RuntimeError(f"fsdp_fastload alloc: nbytes must be >= 0 (got {nbytes})")
    return torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin_memory)


def _carve_ref(flat: torch.Tensor, spec: Sequence[int]) -> list[torch.Tensor]:
    _check_flat(flat, "fsdp_fastload carve")
    nbytes, base, out = flat.numel(), flat.storage_offset(), []
    for dtype, off, sizes, strides in _decode_spec(spec):
        item = dtype.itemsize
        if off < 0 or off % item or (base + off) % item:
            raise RuntimeError(
                f"fsdp_fastload carve: view {len(out)} ({dtype}) has byte offset {off} not aligned to "
                f"its itemsize {item}. Align offsets with the layout stage.")
        if any(s < 0 for s in sizes) or any(s < 0 for s in strides):
            raise RuntimeError(f"fsdp_fastload carve: view {len(out)} has a negative size or stride")
        extent = _extent(sizes, strides, item)
        if off + extent > nbytes:
            raise RuntimeError(
                f"fsdp_fastload carve: view {len(out)} spans bytes [{off}, {off + extent}) outside the "
                f"buffer of {nbytes} bytes")
        # A byte range whose length is a multiple of the itemsize reinterprets cleanly as `dtype`.
        region = flat[off:off + extent].view(dtype)
        out.append(region.as_strided(sizes, strides))
    return out


def _extent(sizes: Sequence[int], strides: Sequence[int], itemsize: int) -> int:
    """Bytes a view of `sizes`/`strides` spans from its first element (0 when empty)."""
    if any(n == 0 for n in sizes):
        return 0
    return (sum((n - 1) * st for n, st in zip(sizes, strides)) + 1) * itemsize


def _carve_owned_ref(flat: torch.Tensor, spec: Sequence[int]) -> list[torch.Tensor]:
    """`carve`'s pieces, each with a storage of its own over `flat`'s memory on CPU (through numpy,
    which keeps `flat` alive; not resizable, no early page release); views elsewhere. An empty piece
    holds no memory anywhere (a storage of its own, grown without touching its neighbours)."""
    views = _carve_ref(flat, spec)
    whole = None
    if flat.device.type == "cpu":
        try:
            whole = flat.numpy()
        except (ImportError, RuntimeError):  # no numpy: views
            pass
    out = []
    for v, (dtype, off, sizes, strides) in zip(views, _decode_spec(spec)):
        extent = _extent(sizes, strides, dtype.itemsize)
        if not extent:  # no memory: no storage at the address of another piece
            out.append(torch.empty_strided(sizes, strides, dtype=dtype, device=flat.device))
        elif whole is None:
            out.append(v)
        else:
            out.append(torch.from_numpy(whole[off:off + extent]).view(dtype).as_strided(sizes, strides))
    return out


def _poison_ref(flat: torch.Tensor, value: int = 255) -> None:
    _check_flat(flat, "fsdp_fastload poison_")
    if not 0 <= value <= 255:
        raise RuntimeError(f"fsdp_fastload poison_: value must be a byte (got {value})")
    flat.fill_(value)


def _copy_ranges_ref(dst: torch.Tensor, srcs: Sequence[torch.Tensor], src_offsets: Sequence[int],
                     dst_offsets: Sequence[int], lengths: Sequence[int]) -> None:
    _check_flat(dst, "fsdp_fastload copy_ranges")
    if not len(srcs) == len(src_offsets) == len(dst_offsets) == len(lengths):
        raise RuntimeError("fsdp_fastload copy_ranges: srcs, src_offsets, dst_offsets and lengths differ "
                           "in length")
    for i, (s, so, d, n) in enumerate(zip(srcs, src_offsets, dst_offsets, lengths)):
        if not s.is_contiguous():
            raise RuntimeError(f"fsdp_fastload copy_ranges: source {i} is not contiguous")
        s_bytes = s.numel() * s.element_size()
        if so < 0 or d < 0 or n < 0:
            raise RuntimeError(f"fsdp_fastload copy_ranges: range {i} has a negative offset or length")
        if so + n > s_bytes:
            raise RuntimeError(f"fsdp_fastload copy_ranges: range {i} reads bytes [{so}, {so + n}) outside "
                               f"its source of {s_bytes} bytes")
        if d + n > dst.numel():
            raise RuntimeError(f"fsdp_fastload copy_ranges: range {i} writes bytes [{d}, {d + n}) outside "
                               f"the destination of {dst.numel()} bytes")
    for s, so, d, n in zip(srcs, src_offsets, dst_offsets, lengths):
        if n:
            dst[d:d + n].copy_(s.detach().reshape(-1).view(torch.uint8)[so:so + n], non_blocking=True)


def _prefault_ref(flat: torch.Tensor) -> bool:
    _check_flat(flat, "fsdp_fastload prefault")
    if flat.device.type != "cpu" or not flat.numel():
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = os.sysconf("SC_PAGE_SIZE")
    a = (flat.data_ptr() + page - 1) // page * page
    b = (flat.data_ptr() + flat.numel()) // page * page
    return b <= a or libc.madvise(a, b - a, 23) == 0  # MADV_POPULATE_WRITE (Linux >= 5.14)


def _read_ranges_ref(path: str, dst: torch.Tensor, file_offsets: Sequence[int],
                     dst_offsets: Sequence[int], lengths: Sequence[int], num_threads: int = 4,
                     expect: Sequence[int] = (), fd: int = -1) -> None:
    if dst.device.type != "cpu" or not dst.is_contiguous():
        raise RuntimeError("fsdp_fastload read_ranges: destination must be a contiguous CPU tensor")
    if not len(file_offsets) == len(dst_offsets) == len(lengths):
        raise RuntimeError(
            "fsdp_fastload read_ranges: file_offsets, dst_offsets and lengths differ in length")
    if fd < 0 and not os.path.isfile(path):
        raise RuntimeError(f"fsdp_fastload read_ranges: {path} is not a regular file. "
                           "Pass the path of a safetensors file.")
    with contextlib.ExitStack() as stack:
        if fd < 0:  # else the caller's open file (see the compiled op)
            fd = stack.enter_context(open(path, "rb", buffering=0)).fileno()
        st = os.fstat(fd)
        if not _stat.S_ISREG(st.st_mode):
            raise RuntimeError(f"fsdp_fastload read_ranges: {path} is not a regular file. "
                               "Pass the path of a safetensors file.")
        if len(expect) not in (0, 4):
            raise RuntimeError("fsdp_fastload read_ranges: expect must be empty or [device, inode, size, mtime_ns]")
        opened = stamp_of(st)
        if expect and opened != tuple(expect):
            raise RuntimeError(_changed(path, "since its layout was read"))
        _read_into(fd, path, opened[2], dst, file_offsets, dst_offsets, lengths)
        if stamp_of(os.fstat(fd)) != opened:
            raise RuntimeError(_changed(path, "while it was read"))


def stamp_of(st: os.stat_result) -> tuple[int, int, int, int]:
    """A file's identity and version: (device, inode, size, mtime_ns), device and inode as signed
    64-bit integers (as the compiled op sees them). `read_ranges(expect=...)` compares it.

    Example::

        >>> len(stamp_of(os.stat(__file__)))
        4
    """
    def i64(v: int) -> int:
        return v - (1 << 64) if v >= 1 << 63 else v
    return i64(st.st_dev), i64(st.st_ino), st.st_size, st.st_mtime_ns


def _changed(path: str, when: str) -> str:  # (the compiled op's text, word for word)
    return (f"fsdp_fastload read_ranges: {path} changed {when} (its inode, size or modification time "
            "differ): was it written to or replaced during the load (a checkpoint saved again)? Where its "
            "tensors were located (by its header, or by the mapping a model was loaded with), another "
            "version's bytes may be now. Load from files that nothing writes to while materialize runs.")


def _read_into(fd: int, path: str, size: int, dst: torch.Tensor, file_offsets: Sequence[int],
               dst_offsets: Sequence[int], lengths: Sequence[int]) -> None:
    dst_bytes = dst.numel() * dst.element_size()
    for i, (fo, d, n) in enumerate(zip(file_offsets, dst_offsets, lengths)):
        if fo < 0 or d < 0 or n < 0:
            raise RuntimeError(f"fsdp_fastload read_ranges: range {i} has a negative offset or length")
        if d + n > dst_bytes:
            raise RuntimeError(
                f"fsdp_fastload read_ranges: range {i} writes bytes [{d}, {d + n}) outside the "
                f"destination of {dst_bytes} bytes")
        if fo + n > size:
            raise RuntimeError(
                f"fsdp_fastload read_ranges: range {i} reads bytes [{fo}, {fo + n}) past the end of "
                f"{path} ({size} bytes). The file is truncated or its header lies.")
    raw = dst.new_empty(0, dtype=torch.uint8)
    if dst.numel():  # as_strided: a contiguous tensor of one element may still carry any stride
        raw = dst.as_strided((dst.numel(),), (1,)).view(torch.uint8)
    for fo, d, n in zip(file_offsets, dst_offsets, lengths):
        view = memoryview(raw[d:d + n].numpy())
        got = 0
        while got < n:
            r = os.preadv(fd, [view[got:]], fo + got)
            if not r:
                raise RuntimeError(
                    f"fsdp_fastload read_ranges: {path} ended early (was it truncated while reading?)")
            got += r


# ------------------------------------------------------------------------------------ fake kernels

def _register_fakes() -> None:
    lib = "fsdp_fastload::"

    @torch.library.register_fake(lib + "alloc")
    def _(nbytes, device, pin_memory=False):
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    @torch.library.register_fake(lib + "carve")
    def _(flat, spec):
        return _carve_ref(flat, spec)

    @torch.library.register_fake(lib + "carve_owned")
    def _(flat, spec):
        return [torch.empty_strided(sizes, strides, dtype=dtype, device=flat.device)
                for dtype, _, sizes, strides in _decode_spec(spec)]

    @torch.library.register_fake(lib + "poison_")
    def _(flat, value=255):
        return None

    @torch.library.register_fake(lib + "prefault")
    def _(flat):
        return False

    @torch.library.register_fake(lib + "copy_ranges")
    def _(dst, srcs, src_offsets, dst_offsets, lengths):
        return None

    @torch.library.register_fake(lib + "read_ranges")
    def _(path, dst, file_offsets, dst_offsets, lengths, num_threads=4, expect=(), fd=-1):
        return ""


# --------------------------------------------------------------------------------- public wrappers

def alloc(nbytes: int, device: torch.device | str, *, pin_memory: bool = False) -> torch.Tensor:
    """One uninitialized uint8 buffer of `nbytes` on `device` (no fill, no page touched).

    On CUDA a request larger than the device could give at all (its free memory plus what the
    caching allocator holds unused) is refused here, in Python, before the op runs: the common
    out-of-memory (a model that does not fit) then never throws inside the extension, and the
    message names our sizes (on one GPU image every error the extension raised crashed the
    process, until setup.py linked torch's shared libstdc++; README, Limitations)."""
    device = torch.device(device)
    if device.type == "cuda" and nbytes > 0:
        _check_cuda_fits(int(nbytes), device)
    if _load_extension():
        return torch.ops.fsdp_fastload.alloc(int(nbytes), device, pin_memory)
    return _alloc_ref(int(nbytes), device, pin_memory)


def _check_cuda_fits(nbytes: int, device: torch.device) -> None:
    """Raise torch.OutOfMemoryError if `nbytes` exceeds every byte the caching allocator could
    obtain on `device` (the driver's free memory plus its reserved but unallocated blocks): such a
    request fails in any case. Smaller ones are left to the allocator (fragmentation may still fail)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    if nbytes > free + cached:
        gib = 2 ** 30
        raise torch.OutOfMemoryError(
            f"CUDA out of memory (fsdp_fastload alloc, checked before allocating): tried to allocate "
            f"{nbytes / gib:.2f} GiB on cuda:{index}, which has {free / gib:.2f} GiB free of {total / gib:.2f} "
            f"GiB and {cached / gib:.2f} GiB cached by PyTorch's allocator unused.")


def carve(flat: torch.Tensor, spec: Sequence[int]) -> list[torch.Tensor]:
    """All views described by `spec` (see `encode_spec`) over `flat`, in one call."""
    if _load_extension() and flat.device.type in ("cpu", "cuda", "meta"):
        return torch.ops.fsdp_fastload.carve(flat, list(spec))
    return _carve_ref(flat, spec)


def carve_owned(flat: torch.Tensor, spec: Sequence[int]) -> list[torch.Tensor]:
    """`carve`'s pieces as a loaded model's tensors: each with a storage of its own (offset 0, exactly
    its bytes) over `flat`'s memory, so that torch.save, pickle, deepcopy and resize_ see one tensor's
    bytes, as after one allocation per tensor. The memory stays allocated while any piece lives; on
    CPU (with the extension) a piece that dies returns its whole pages to the kernel at once. Views on
    meta (and, without the extension, off CPU).

    Example::

        >>> flat = alloc(64, "cpu")
        >>> a, b = carve_owned(flat, encode_spec([torch.float32] * 2, [0, 32], [(4,), (2, 2)]))
        >>> b.untyped_storage().nbytes(), b.storage_offset(), b.data_ptr() - flat.data_ptr()
        (16, 0, 32)
    """
    if _load_extension() and flat.device.type in ("cpu", "cuda", "meta"):
        return torch.ops.fsdp_fastload.carve_owned(flat, list(spec))
    return _carve_owned_ref(flat, spec)


def poison_(flat: torch.Tensor, value: int = 255) -> torch.Tensor:
    """Fill every byte of `flat` with `value` (0xFF: NaN in float views, -1 in signed ints)."""
    if _load_extension() and flat.device.type in ("cpu", "cuda", "meta"):
        torch.ops.fsdp_fastload.poison_(flat, int(value))
    else:
        _poison_ref(flat, int(value))
    return flat


def prefault(flat: torch.Tensor) -> bool:
    """Fault the pages of the CPU buffer `flat` in without writing them (no-op elsewhere); safe to
    run on another thread while data is received into it. Whether it happened."""
    if _load_extension():
        return bool(torch.ops.fsdp_fastload.prefault(flat))
    return _prefault_ref(flat)


class Prefault:
    """`prefault(flat)` on a background thread (the op runs without the GIL); `join()` before use ends.

    Receivers start it before the layout arrives, so the page faults of fresh memory overlap src's
    planning and the transfer instead of slowing each received byte.
    """

    def __init__(self, flat: torch.Tensor):
        import threading

        self.thread = threading.Thread(target=prefault, args=(flat,), name="fsdp_fastload-prefault",
                                       daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join()


def copy_ranges(dst: torch.Tensor, srcs: Sequence[torch.Tensor], src_offsets: Sequence[int],
                dst_offsets: Sequence[int], lengths: Sequence[int]) -> None:
    """Copy `lengths[i]` bytes from byte `src_offsets[i]` of `srcs[i]` to byte `dst_offsets[i]` of the
    flat uint8 `dst`, for every i, in one call (validated first; sources must be contiguous)."""
    if _load_extension():
        torch.ops.fsdp_fastload.copy_ranges(dst, list(srcs), list(src_offsets), list(dst_offsets), list(lengths))
    else:
        _copy_ranges_ref(dst, srcs, src_offsets, dst_offsets, lengths)


def read_ranges(path: str, dst: torch.Tensor, file_offsets: Sequence[int], dst_offsets: Sequence[int],
                lengths: Sequence[int], *, num_threads: int = 4, expect: Sequence[int] | None = None,
                fd: int = -1) -> None:
    """Read byte ranges of the file `path` into `dst`'s bytes (threads, no GIL, validated first).
    `fd` >= 0: read that open file instead of opening `path` (which then only names it in errors;
    the descriptor stays open). `expect`: the file's `stamp_of` when its layout was read; a file
    replaced or written since, or written while it is read, raises instead of giving bytes of another
    version.
    Raises RuntimeError naming the range or the file; the compiled op returns that text instead of
    throwing it (see csrc/fastload.h), and it is raised here."""
    args = (os.fspath(path), dst, list(file_offsets), list(dst_offsets), list(lengths), int(num_threads),
            list(expect or ()), int(fd))
    if _load_extension():
        problem = torch.ops.fsdp_fastload.read_ranges(*args)
        if problem:
            raise RuntimeError(problem)
    else:
        _read_ranges_ref(*args)

"""The `state_dict=` source on rank src: a mapping of tensors, a `.safetensors` file, or a directory.

Safetensors headers are parsed and validated here before a byte of data is read: length inside the
file, JSON well-formed, dtypes known, `shape x itemsize == byte span`, spans inside the data section and
not overlapping. Data is later read with the `read_ranges` op straight into (staging or final) buffers.
"""
from __future__ import annotations

import bisect
import contextlib
import errno
import json
import os
import stat as _stat
import struct
import sys
from dataclasses import dataclass
from typing import Mapping

import torch

from .ops import stamp_of

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "C64": torch.complex64,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E8M0": torch.float8_e8m0fnu,
    "F4": torch.float4_e2m1fn_x2,  # two values a byte: the header counts values, torch bytes (see below)
}
# itemsize 0 marks F4: the header's shape counts float4 values, torch's float4_e2m1fn_x2 counts bytes
# (pairs), so its last dimension is halved, as the safetensors library does
_DTYPES_ITEMSIZE = {k: (v, 0 if k == "F4" else v.itemsize) for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 << 20  # safetensors' own limit


def _where(path: str, name: str) -> str:
    return f"{path}: tensor '{name}'"


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read as it claims; names the file and the problem."""


class OpenFile:
    """A file held open from the moment its layout is read (a safetensors header parsed, a mapping's
    file checked) until the last FileTensor in it is gone, and read through that descriptor.

    So a checkpoint saved again under the same name meanwhile (a new file renamed over it) changes
    nothing: the bytes read are those of the file whose header was parsed; and a file system whose
    inode numbers change between lookups (some FUSE mounts) is no problem. `stamp` (`ops.stamp_of`
    when opened) is checked on every read: a file written in place since (truncated, saved again
    into the same inode) is an error naming it, never bytes of another version at the old offsets.
    """

    __slots__ = ("path", "fd", "stat", "stamp")

    def __init__(self, path: str, fd: int, st: os.stat_result):
        self.path, self.fd, self.stat, self.stamp = path, fd, st, stamp_of(st)

    @staticmethod
    def open(path: str) -> "OpenFile":
        """`path` opened for reading (O_NONBLOCK: a FIFO named by mistake is refused, not waited on),
        with its `os.fstat` then."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            return OpenFile(path, fd, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  (at interpreter exit `os` may be gone already)
            pass

    def __repr__(self) -> str:
        return f"OpenFile({self.path!r}, fd={self.fd})"


class FileTensor:
    """One tensor inside a safetensors file: absolute byte offset in the file, dtype, shape, and the
    file held open (`OpenFile`; None: `path` is opened when read, unchecked).

    (A plain slotted class, not a frozen dataclass: one is made per checkpoint tensor, and a frozen
    dataclass's constructor costs ~1 us more, 1.5 ms of src's time before the first byte at 1,400.)
    """

    __slots__ = ("path", "offset", "nbytes", "dtype", "shape", "file")

    def __init__(self, path: str, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...],
                 file: OpenFile | None = None):
        self.path, self.offset, self.nbytes, self.dtype, self.shape = path, offset, nbytes, dtype, shape
        self.file = file

    @property
    def stamp(self) -> tuple | None:
        return None if self.file is None else self.file.stamp

    def __repr__(self) -> str:
        return (f"FileTensor(path={self.path!r}, offset={self.offset}, nbytes={self.nbytes}, "
                f"dtype={self.dtype}, shape={self.shape})")

    def _key(self) -> tuple:
        return (self.path, self.offset, self.nbytes, self.dtype, self.shape, self.stamp)

    def __eq__(self, other) -> bool:
        return type(other) is FileTensor and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def parse_header(path: str) -> dict[str, FileTensor]:
    """Validate a safetensors file's header and return name -> FileTensor (reads only the header)."""
    try:
        file = OpenFile.open(path)  # the file this header belongs to, read through this descriptor
    except OSError as e:
        if e.errno == errno.EMFILE:
            raise CheckpointError(
                f"{path}: cannot open it ({e.strerror}): materialize keeps every file of a checkpoint open "
                "while it loads. Raise this process's limit on open files above the number of checkpoint "
                "files (`ulimit -n`, or resource.setrlimit(resource.RLIMIT_NOFILE, ...) before the call).") from e
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    try:
        return _parse_header(path, file)
    except BaseException:
        file.close()
        raise


def _read_exactly(fd: int, n: int, at: int) -> bytes:
    parts = []
    while n > 0:
        got = os.pread(fd, n, at)
        if not got:
            break
        parts.append(got)
        n, at = n - len(got), at + len(got)
    return b"".join(parts)


def _parse_header(path: str, file: OpenFile) -> dict[str, FileTensor]:
    size = file.stamp[2]
    try:
        if not _stat.S_ISREG(file.stat.st_mode):
            raise CheckpointError(f"{path}: not a regular file. Pass a safetensors file or a checkpoint directory.")
        head = _read_exactly(file.fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than the "
                                  "8-byte header length). The file is truncated or empty.")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            pickled = head.startswith((b"PK\x03\x04", b"\x80"))  # torch.save's zip, or a bare pickle
            hint = (" It looks like a torch.save / pickle file: pass its contents as a mapping "
                    "(state_dict=torch.load(path, mmap=True, weights_only=True))." if pickled else "")
            raise CheckpointError(f"{path}: header length {n} runs past the end of the file "
                                  f"({size} bytes). The file is truncated or not safetensors.{hint}")
        raw = _read_exactly(file.fd, n, 8)
        if len(raw) < n:
            raise CheckpointError(f"{path}: ended inside its header (was it truncated meanwhile?)")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, an over-long integer, deep nesting
        raise CheckpointError(f"{path}: header is not valid JSON ({e}). The file is corrupt.") from None
    if type(header) is not dict:
        raise CheckpointError(f"{path}: header is not a JSON object (got {type(header).__name__})")
    data_start, data_len = 8 + n, size - 8 - n
    out: dict[str, FileTensor] = {}
    spans = []
    known, where = _DTYPES_ITEMSIZE, _where  # (error text made only on the error path)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if type(info) is not dict:
            raise CheckpointError(f"{where(path, name)}: entry is not an object")
        name_of_dtype = info.get("dtype")
        got = known.get(name_of_dtype) if type(name_of_dtype) is str else None
        if got is None:
            raise CheckpointError(f"{where(path, name)}: unknown dtype {info.get('dtype')!r} "
                                  f"(known: {', '.join(SAFETENSORS_DTYPES)})")
        dtype, itemsize = got
        shape, offs = info.get("shape"), info.get("data_offsets")
        # (`type(x) is int`: JSON gives int or bool, and a bool is no size; plain loops, no generators)
        numel = 1
        if type(shape) is not list:
            numel = -1
        else:
            for s in shape:
                if type(s) is not int or s < 0:
                    numel = -1
                    break
                numel *= s
        if numel < 0:
            raise CheckpointError(f"{where(path, name)}: shape {shape!r} is not a list of non-negative integers")
        if not itemsize:  # F4
            if not shape or shape[-1] % 2:
                raise CheckpointError(f"{where(path, name)}: F4 (float4) shape {shape} has no even last dimension; "
                                      "two float4 values share a byte. The file is corrupt.")
            shape, numel, itemsize = shape[:-1] + [shape[-1] // 2], numel // 2, 1
        if not (type(offs) is list and len(offs) == 2 and type(offs[0]) is int and type(offs[1]) is int):
            raise CheckpointError(f"{where(path, name)}: data_offsets {offs!r} is not [begin, end]")
        begin, end = offs
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(f"{where(path, name)}: data_offsets [{begin}, {end}] fall outside the data "
                                  f"section of {data_len} bytes. The file is truncated or its header lies.")
        if numel * itemsize != end - begin:
            raise CheckpointError(f"{where(path, name)}: shape {shape} x {itemsize} bytes = "
                                  f"{numel * itemsize} bytes, but its span is {end - begin} bytes")
        spans.append((begin, end, name))
        out[name] = FileTensor(path, data_start + begin, end - begin, dtype, tuple(shape), file)
    spans.sort()
    reach, owner = 0, None  # the furthest end of any non-empty span so far, and whose
    for b, e, name in spans:
        if b < e:
            if b < reach:
                raise CheckpointError(f"{path}: tensors '{owner[2]}' [{owner[0]}, {owner[1]}) and "
                                      f"'{name}' [{b}, {e}) overlap. The file is corrupt.")
            if e > reach:
                reach, owner = e, (b, e, name)
    return out


def file_backed(facts: list, shapes: list) -> list[FileTensor | None]:
    """The file range each CPU tensor's bytes are mapped from, where reading the file gives exactly
    those bytes; None for the others. `facts` as `layout.memory_facts` gives them.

    `from_pretrained` leaves a model's tensors mapped from its safetensors files (a private, writable
    mapping). Copying them out faults each page of that mapping in, where reading the same bytes from
    the file (`read_ranges`, several threads) does not: on one H100 and one H200 the checkpoint flow
    ran 1.5x faster onto the GPU than the same model sent from its mapping (on a 2-core VM copying out
    of the mapping was the faster: see materialize's `read_mapped`). A range is used only when no page
    of it was written since it was mapped (a merged adapter, say: such a page is the process's own
    copy, no longer the file's) and the file is still the one mapped (opened, and its descriptor's
    device and inode are the mapping's; still that long): that descriptor is what is read, checked
    against the file's stamp then (a file written in place in between is an error, not other bytes).
    Written pages are found in /proc/self/pagemap (present and not a file page, or
    swapped), read for the tensors' pages alone (~2 ms a GB untouched); where pagemap does not answer
    as Linux documents it (checked on a page this process wrote), in /proc/self/smaps (a mapping with
    `Anonymous` pages is left out whole; it walks every mapping of the process: 30-70 ms). Linux only;
    anywhere else, or if /proc cannot be read, everything is None.

    Example::

        >>> from fsdp_fastload.layout import memory_facts
        >>> file_backed(memory_facts([torch.zeros(4)]), [(4,)])   # malloc-ed: no file
        [None]
    """
    out: list = [None] * len(facts)
    wanted = [i for i, f in enumerate(facts) if f is not None and f[4] < 0 and f[3]]
    if not wanted:
        return out
    regions = _mappings_of(sorted(facts[i][0] for i in wanted))  # which tensors lie in a file's mapping
    spans = []  # (tensor, address, nbytes) of those that do
    for i in wanted:
        addr, nbytes = facts[i][0], facts[i][3] * facts[i][2].itemsize
        if _region_of(regions, addr, nbytes) is not None:
            spans.append((i, addr, nbytes))
    if not spans:
        return out
    written = _written_pages([(a, n) for _, a, n in spans])
    if written is None:  # no usable pagemap: smaps' count of each mapping's own pages instead
        regions = _smaps_mappings()
    files: dict = {}
    for k, (i, addr, nbytes) in enumerate(spans):
        r = _region_of(regions, addr, nbytes)
        if r is None:
            continue
        start, end, offset, dev, inode, path, anonymous = r
        if written[k] if written is not None else anonymous != 0:
            continue
        if (path, dev, inode) not in files:
            files[(path, dev, inode)] = _same_file(path, dev, inode)
        file = files[(path, dev, inode)]
        at = offset + addr - start
        if file is not None and file.stamp[2] >= at + nbytes:
            out[i] = FileTensor(path, at, nbytes, facts[i][2], tuple(shapes[i]), file)
    return out


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_PRESENT, _SWAPPED, _FILE_PAGE = 1 << 63, 1 << 62, 1 << 61  # /proc/<pid>/pagemap's bits
_BITS = -(1 << 61)  # the three as an int64 mask
_PRESENT_FILE = -(1 << 63) + (1 << 61)  # a page of the file, mapped (as int64)
_pagemap_ok: bool | None = None  # whether this kernel's pagemap shows a page this process wrote


def _written_pages(spans: list[tuple[int, int]]) -> list[bool] | None:
    """Per (address, nbytes) span of a private file mapping: whether a page of it is the process's
    own (written since mapped: present and not a file page, or swapped out); None where
    /proc/self/pagemap cannot be read or does not answer as Linux documents it. Each page's entry
    is read once, the spans' pages merged into runs."""
    global _pagemap_ok
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return None
    try:
        if _pagemap_ok is None:
            # A page written here must show as present and the process's own; a pagemap that
            # answers zeros (or file pages) would let a written page pass as the file's.
            probe = torch.ones(2 * _PAGE, dtype=torch.uint8)
            first = (probe.data_ptr() + _PAGE - 1) // _PAGE
            try:
                raw = os.pread(fd, 8, 8 * first)
                v = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
            except OSError:
                v = 0
            _pagemap_ok = bool(v & _PRESENT) and not v & (_FILE_PAGE | _SWAPPED)
        if not _pagemap_ok:
            return None
        pages = sorted((a // _PAGE, (a + n - 1) // _PAGE + 1, k) for k, (a, n) in enumerate(spans) if n > 0)
        out = [False] * len(spans)
        i = 0
        while i < len(pages):  # a run: spans whose pages touch or overlap
            lo, hi, j = pages[i][0], pages[i][1], i + 1
            while j < len(pages) and pages[j][0] <= hi:
                hi, j = max(hi, pages[j][1]), j + 1
            raw = bytearray(8 * (hi - lo))
            if os.preadv(fd, [raw], 8 * lo) != len(raw):
                return None
            bits = torch.frombuffer(raw, dtype=torch.int64) & _BITS  # signed: bit 63 is the sign
            own = (bits != 0) & (bits != _PRESENT_FILE)  # neither untouched nor the file's page
            if bool(own.any()):
                seen = torch.cat([torch.zeros(1, dtype=torch.int64), own.cumsum(0)]).tolist()
                for first, end, k in pages[i:j]:
                    out[k] = seen[end - lo] > seen[first - lo]
            i = j
        return out
    except OSError:
        return None
    finally:
        os.close(fd)


def _region_of(regions: list, addr: int, nbytes: int):
    """The mapping in `regions` (sorted by start) that holds bytes [addr, addr + nbytes), or None."""
    k = bisect.bisect_right(regions, (addr, float("inf"))) - 1
    if k >= 0 and addr + nbytes <= regions[k][1]:
        return regions[k]
    return None


_PROCMAP_QUERY = (3 << 30) | (104 << 16) | (ord("f") << 8) | 17  # _IOWR('f', 17, struct procmap_query)
_procmap_query_ok = True  # until the kernel says it has no such ioctl (before Linux 6.11)


def _mappings_of(addrs: list[int]) -> list[tuple]:
    """The file mappings (as `_smaps_mappings` gives them, Anonymous None) that hold the addresses
    `addrs` (sorted), by start. One PROCMAP_QUERY ioctl per mapping (Linux >= 6.11) where the kernel
    has it; else /proc/self/maps, whose text costs with the process's mappings (a CUDA process holds
    thousands: 20k mappings take ~22 ms to read on this 2-core VM, ~1 ms for a CPU torch process)."""
    global _procmap_query_ok
    if _procmap_query_ok:
        import errno
        import fcntl

        regions: list = []
        try:
            fd = os.open("/proc/self/maps", os.O_RDONLY)
        except OSError:
            return []
        try:
            name = bytearray(4096)
            name_addr = _buffer_address(name)
            query = bytearray(104)
            for addr in addrs:
                if regions and regions[-1][0] <= addr < regions[-1][1]:
                    continue
                struct.pack_into("<QQQ", query, 0, 104, 0, addr)  # size, flags (covering vma), address
                struct.pack_into("<II", query, 80, len(name), 0)  # name buffer size, no build id
                struct.pack_into("<QQ", query, 88, name_addr, 0)
                try:
                    fcntl.ioctl(fd, _PROCMAP_QUERY, query)
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.ENAMETOOLONG):  # nothing mapped there; a path past 4 KiB
                        continue
                    if e.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                        _procmap_query_ok = False
                        break
                    raise
                start, end, _, _, offset, inode, major, minor, name_len = struct.unpack_from("<QQQQQQIII", query, 24)
                path = bytes(name[:max(name_len - 1, 0)])  # (its length counts the final NUL)
                if _a_file_to_read(inode, path):
                    regions.append((start, end, offset, (major, minor), inode, os.fsdecode(path), None))
                else:  # an anonymous or special mapping: remembered only to skip its other addresses
                    regions.append((start, end, None))
            else:
                return [r for r in regions if len(r) > 3]
        except OSError:
            return []
        finally:
            os.close(fd)
    return _maps_lookup(addrs)


def _maps_lookup(addrs: list[int]) -> list[tuple]:
    """`_mappings_of` without the ioctl: /proc/self/maps read once (its lines are in address order),
    each mapping found by bisecting its lines, so the Python work grows with the mappings asked
    about, not with the process's (the kernel's writing of the text still does)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return []
    if lines and not lines[-1]:
        lines.pop()
    regions: list = []
    for addr in addrs:
        if regions and regions[-1][0] <= addr < regions[-1][1]:
            continue
        lo, hi = 0, len(lines)  # the last line starting at or below addr
        while lo < hi:
            mid = (lo + hi) // 2
            line = lines[mid]
            if int(line[:line.index(b"-")], 16) <= addr:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            continue
        found = _file_line(lines[lo - 1])
        if found is not None and found[0] <= addr < found[1]:
            regions.append(found)
    return [r for r in regions if len(r) > 3]


def _file_line(line: bytes) -> tuple | None:
    """A /proc/self/maps line as `_smaps_mappings` gives it; (start, end, None) for a mapping that is
    no file to read (anonymous, special, under /dev/, deleted); None if it cannot be parsed."""
    global _MAPS_LINE
    if _MAPS_LINE is None:
        import re

        _MAPS_LINE = re.compile(_MAPPING_LINE)
    m = _MAPS_LINE.fullmatch(line)
    if m is None:
        return None
    start, end, offset, major, minor, inode, path = m.groups()
    if _a_file_to_read(int(inode), path):
        return (int(start, 16), int(end, 16), int(offset, 16), (int(major, 16), int(minor, 16)), int(inode),
                os.fsdecode(path), None)
    return (int(start, 16), int(end, 16), None)


_MAPS_LINE = None  # compiled on first use
# a mapping's line in /proc/self/maps (and its header line in smaps): start-end perms offset
# major:minor inode path
_MAPPING_LINE = rb"([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+)[ \t]*(.*)"


def _a_file_to_read(inode: int, path: bytes) -> bool:
    """Whether a mapping's (inode, path) is a file to read its bytes from: not anonymous or special
    (`[heap]`), not under /dev/ (devices, shared memory: no faster to read than to copy), not deleted."""
    return bool(inode) and path.startswith(b"/") and not path.startswith(b"/dev/") and not path.endswith(b" (deleted)")


def _buffer_address(buf: bytearray) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


_SMAPS = None  # compiled on first use: a mapping's header line, or its Anonymous line


def _smaps_mappings() -> list[tuple]:
    """(start, end, file offset, (major, minor), inode, path, Anonymous kB) of each mapping of a file
    in this process, by start address, from /proc/self/smaps (a mapping without that field is left
    out); [] where it cannot be read."""
    global _SMAPS
    import re

    try:
        with open("/proc/self/smaps", "rb") as f:
            text = f.read()
    except OSError:
        return []
    if _SMAPS is None:
        _SMAPS = re.compile(rb"^(?:" + _MAPPING_LINE + rb"|Anonymous:[ \t]*(\d+) kB)$", re.M)
    regions, current = [], None
    for m in _SMAPS.finditer(text):
        start, end, offset, major, minor, inode, path, anonymous = m.groups()
        if start is None:
            if current is not None:
                regions.append((*current, int(anonymous)))
                current = None
            continue
        current = None
        if _a_file_to_read(int(inode), path):
            current = (int(start, 16), int(end, 16), int(offset, 16), (int(major, 16), int(minor, 16)),
                       int(inode), os.fsdecode(path))
    regions.sort(key=lambda r: r[0])
    return regions


def _same_file(path: str, dev: tuple, inode: int) -> OpenFile | None:
    """`path` opened (`OpenFile`) if it is still the regular file mapped (device and inode, checked on
    the open descriptor: what is read is that file, whatever the name holds later) and this process
    may read it (a mapping outlives its file's permissions: then the open fails), else None."""
    try:
        file = OpenFile.open(path)
    except OSError:
        return None
    st = file.stat
    if not _stat.S_ISREG(st.st_mode) or st.st_ino != inode or (os.major(st.st_dev), os.minor(st.st_dev)) != dev:
        file.close()
        return None
    return file


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a file path or a directory (sharded via its index, or single)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or directory")
    # from_pretrained's order: a single model.safetensors wins over an index (save_pretrained into a
    # directory holding the other layout leaves both behind)
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            if not all(isinstance(f, str) for f in files):
                raise ValueError("weight_map values must be file names")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing[:5]}. "
                                  "Copy the complete checkpoint directory.")
        return [os.path.join(path, f) for f in files]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not found:
        pickled = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth")))
        hint = (f" It holds {pickled[:3]}: pass their contents as a mapping (state_dict=torch.load(file, "
                "mmap=True, weights_only=True), merged over the files if sharded)" if pickled else "")
        raise CheckpointError(f"{path}: directory holds no .safetensors file (and no "
                              f"model.safetensors.index.json).{hint} Save with save_pretrained or pass a mapping.")
    return [os.path.join(path, f) for f in found]


# the state_dict key of a module's extra state, after its path (torch's _EXTRA_STATE_KEY_SUFFIX)
EXTRA_STATE = "_extra_state"


def extra_state_key(path: str) -> str:
    """The state_dict key of the extra state of the module at `path` ('' for the root)."""
    return f"{path}.{EXTRA_STATE}" if path else EXTRA_STATE


def open_source(state_dict) -> dict[str, torch.Tensor | FileTensor]:
    """name -> tensor (mapping source) or FileTensor (safetensors source), validated."""
    if isinstance(state_dict, Mapping):
        bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)  # (extra state: any object)
               and not (k == EXTRA_STATE or k.endswith("." + EXTRA_STATE))]
        if bad:
            raise CheckpointError(f"state_dict values must be tensors; {bad[:5]} are not")
        return dict(state_dict)
    if isinstance(state_dict, (str, os.PathLike)):
        out: dict[str, torch.Tensor | FileTensor] = {}
        for f in checkpoint_files(state_dict):
            for name, ft in parse_header(f).items():
                if name in out:
                    raise CheckpointError(f"tensor '{name}' appears in two files ({f} and "
                                          f"{getattr(out[name], 'path', '?')})")
                out[name] = ft
        return out
    raise CheckpointError(f"state_dict must be a mapping of tensors, a .safetensors file or a "
                          f"checkpoint directory (got {type(state_dict).__name__})")


_FLOATS = {torch.float64, torch.float32, torch.float16, torch.bfloat16}


@dataclass
class Plan:
    """What src sends for each manifest entry: its source and wire dtype, or None (recompute locally)."""

    sources: list  # per entry: torch.Tensor | FileTensor | None
    wire: list  # per entry: torch.dtype | None
    unexpected: list[str]


class MatchError(str):
    """`match`'s error text; `missing` holds the names of the persistent tensors the checkpoint
    lacks (callers add hints about why)."""

    missing: list[str] = []


# Path segments that wrappers insert between a module and its parameters: activation checkpointing's
# CheckpointWrapper and torch.compile's OptimizedModule. A checkpoint names the tensors without them
# (CheckpointWrapper's own state_dict() drops its segment; torch's DCP drops both).
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod")


def unwrapped_name(name: str) -> str:
    """`name` without the wrappers' path segments: the key a checkpoint holds for the tensor.

    Example::

        >>> unwrapped_name("layers.0._orig_mod._checkpoint_wrapped_module.mlp.weight")
        'layers.0.mlp.weight'
    """
    if "_checkpoint_wrapped_module" not in name and "_orig_mod" not in name:
        return name
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_SEGMENTS)


def match(entries, source: dict, *, strict: bool,
          unsaved: frozenset = frozenset()) -> tuple[Plan | None, MatchError | None]:
    """Map checkpoint keys onto manifest entries; (plan, None) or (None, error text). Moves no data.

    A tensor's key is one of its names (module attribute paths), or, when none is in the checkpoint,
    one of them without the segments wrappers insert (`unwrapped_name`: activation checkpointing,
    torch.compile applied to layers before loading, as torchtitan-style code does).
    `unsaved`: names the model's own saving leaves out on purpose (transformers'
    `_keys_to_ignore_on_save`: Marian's sinusoidal positions), recomputed like non-persistent buffers
    when the checkpoint lacks them."""
    sources, wire, missing, problems = [], [], [], []
    used: set[str] = set()
    everything, source = source, _without_file_values_of_non_persistent(entries, source)
    for e in entries:
        names = e.names
        if len(names) == 1:  # (most entries: no generator)
            key = names[0]
            v = source.get(key)
            if v is not None:
                used.add(key)
        else:
            present = [n for n in names if n in source]
            key = present[0] if present else None
            v = None if key is None else source[key]
            used.update(present)
        if v is None:  # the names without wrapper segments?
            plain = [c for c in dict.fromkeys(map(unwrapped_name, names)) if c in source]
            if plain:
                key, v, present = plain[0], source[plain[0]], plain
                used.update(plain)
        if v is not None and len(names) > 1 and len(present) > 1 and (
                conflict := _tie_conflict(present, source, e.dtype)):
            problems.append(conflict)
            continue
        if v is None:
            if e.persistent and not (unsaved and any(n in unsaved or unwrapped_name(n) in unsaved for n in names)):
                missing.append(e.names[0])
            sources.append(None)
            wire.append(None)
            continue
        if isinstance(v, torch.Tensor) and type(v) not in (torch.Tensor, torch.nn.Parameter):
            problems.append(f"not supported: '{key}' is a {type(v).__name__} (a tensor subclass such as a "
                            "DTensor or a quantized tensor); pass plain full tensors")
            continue
        if isinstance(v, torch.Tensor) and v.layout != torch.strided:
            problems.append(f"'{key}' is a {v.layout} tensor in state_dict; the model's is dense. Pass "
                            f"dense tensors (state_dict[{key!r}].to_dense())")
            continue
        shape = tuple(v.shape)
        if shape != e.shape:
            problems.append(f"'{key}' has shape {shape} in the checkpoint but {e.shape} in the model")
            continue
        if isinstance(v, torch.Tensor) and v.is_meta:
            problems.append(f"'{key}' is a meta tensor in state_dict; it holds no values")
            continue
        if v.dtype != e.dtype and not (v.dtype in _FLOATS and e.dtype in _FLOATS):
            problems.append(f"'{key}' is {v.dtype} in the checkpoint but {e.dtype} in the model; only "
                            "floating-point dtypes convert exactly. Build the model with the "
                            "checkpoint's dtype")
            continue
        sources.append(v)
        wire.append(v.dtype if v.dtype.itemsize < e.dtype.itemsize else e.dtype)
    unexpected = sorted(k for k in everything if k not in used)
    if missing:
        hint = ""
        if unexpected:
            hint = (f" The checkpoint also has {len(unexpected)} key(s) the model does not, e.g. "
                    f"{unexpected[:3]}: its names may need converting on load (transformers' own conversion "
                    "renames or fuses some, e.g. expert weights; a module's own load_state_dict pre-hooks "
                    "rename others). Load the model with from_pretrained on src (load_state_dict for a plain "
                    "module) and call materialize(model) without state_dict.")
        problems.insert(0, f"{len(missing)} persistent tensor(s) missing from the checkpoint: "
                           f"{missing[:10]}{' ...' if len(missing) > 10 else ''}.{hint}")
    elif unexpected and strict:
        problems.append(f"{len(unexpected)} unexpected key(s) in the checkpoint (strict=True): "
                        f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if problems:
        error = MatchError("; ".join(problems[:5]))
        error.missing = missing
        return None, error
    return Plan(sources=sources, wire=wire, unexpected=unexpected), None


def _without_file_values_of_non_persistent(entries, source: dict) -> dict:
    """`source` without the checkpoint *file* values named like a non-persistent buffer (written by
    an older version of the model, e.g. rounded rotary `inv_freq`): `from_pretrained` and
    `load_state_dict` never load one (it is not in `state_dict()`), so it stays an unexpected key
    and the buffer is recomputed. A mapping's value is used: how a src hands over buffers it
    computed itself (the accelerate integration does)."""
    names = {n for e in entries if not e.persistent for n in e.names}
    names |= {unwrapped_name(n) for n in names}
    dropped = {n for n in names if type(source.get(n)) is FileTensor}
    return {k: v for k, v in source.items() if k not in dropped} if dropped else source


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same_bytes(a, b) -> bool:
    """Whether two checkpoint values are one span of one file, or one tensor's memory (no read)."""
    if isinstance(a, FileTensor):
        return a == b  # (FileTensor's own equality: the same span of the same file, as read)
    if type(a) in _PLAIN and type(b) in _PLAIN:
        return (a is b or (a.device == b.device and not a.is_meta and a.data_ptr() == b.data_ptr()
                           and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()))
    return False


def _tie_conflict(present: list[str], source: dict, dtype: torch.dtype) -> str | None:
    """The error when the checkpoint holds different values under names of one tied tensor.

    transformers' `from_pretrained` compares them too (`torch.equal`) and unties such a pair, with a
    warning that the config is wrong; here the skeleton's tie decides what every rank holds, so
    taking one of the values would silently differ from it: an error instead, naming the keys. Equal
    values (a tied model's own `state_dict()`, a `.bin` checkpoint's shared storage) load as one.
    Values that only src's conversion makes (fused experts) are not compared."""
    def value(v):
        if isinstance(v, FileTensor):
            from .fill import read_file_tensor  # (fill imports this module)

            v = read_file_tensor(v)
        # None: a value this check cannot read (matching reports subclasses, meta, sparse ones)
        return v if type(v) in _PLAIN and not v.is_meta and v.layout == torch.strided else None

    first, first_value = source[present[0]], None
    for other in present[1:]:
        second = source[other]
        if _same_bytes(first, second):
            continue
        if first_value is None:
            first_value = value(first)  # (read once for a group of several names)
        a, b = first_value, value(second)
        if a is None or b is None:
            return None
        dev = a.device if a.device == b.device else torch.device("cpu")  # (a GPU mapping compares there)
        if a.shape == b.shape and (a.dtype == b.dtype or (a.is_floating_point() and b.is_floating_point())):
            a, b = a.to(device=dev, dtype=dtype), b.to(device=dev, dtype=dtype)
            if torch.equal(a, b) or torch.equal(_bits(a), _bits(b)):  # (NaNs: equal when their bits are)
                continue
        what = "shapes" if a.shape != b.shape else "values"
        return (f"the checkpoint holds different {what} for '{present[0]}' and '{other}', which the model ties "
                "(one tensor). transformers' from_pretrained unties such a pair (its config is wrong for "
                "this checkpoint): build the model untied on every rank (for transformers, "
                "config.tie_word_embeddings=False), or leave one of the two keys out of the checkpoint")
    return None


def hf_renamed(module, source: dict, dtypes: dict) -> dict | None:
    """`source` under the names and in the form transformers' `from_pretrained` gives it, or None.

    transformers (>= 5) renames some architectures' checkpoint keys when it loads them (GPT-NeoX's
    `embed_out` is `lm_head`, ViT's layers were renamed, a base model's checkpoint loads into a
    `...ForCausalLM` under its `base_model_prefix`), and fuses others (a `WeightConverter`: MoE experts
    stored one 2-D tensor each, stacked into one 3-D parameter); `save_pretrained` writes the old form
    back. This applies the same `WeightRenaming`s and prefix rule to the keys (no data is touched), and
    gives each fused parameter a `HFConverted` source (see there). `dtypes`: the model's name -> dtype.
    None when `module` is not a transformers model or two keys would land on one name. Keys whose
    conversion cannot be followed keep their names, so they stay unmatched and the caller's error says
    to use the src-model flow.
    """
    tf = sys.modules.get("transformers")  # not imported: `module` cannot be a transformers model
    if tf is None or not isinstance(module, getattr(tf, "PreTrainedModel", ())):
        return None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        with _unwrapped_classes(module, tf.PreTrainedModel):
            mapping = get_model_conversion_mapping(module)
    except Exception:  # noqa: BLE001  an older or newer transformers without this machinery
        return None
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    known = dict.fromkeys(dtypes, True)
    out: dict = {}
    fused: dict = {}  # first target name -> [(checkpoint key, converter's source pattern, value)]
    for key, value in source.items():
        new, pattern = rename_source_key(key, renamings, converters, module.base_model_prefix, known)
        if pattern is not None and new in known:
            fused.setdefault(new, []).append((key, pattern, value))
            continue
        if pattern is not None or (new not in known and key in known):
            new = key
        if new in out:
            return None
        out[new] = value
    by_pattern = {k: c for c in converters for k in c.source_patterns}  # as transformers: the last declaring it
    for first, inputs in fused.items():
        made = _hf_fuse(module, by_pattern, first, inputs, dtypes)
        if made is None:  # not followed: the checkpoint's own names, unmatched
            for key, _, value in inputs:
                out.setdefault(key, value)
            continue
        for name, value in made.items():
            if name in out:
                return None
            out[name] = value
    return out


class HFConverted:
    """A parameter transformers makes on load from several checkpoint tensors (`WeightConverter`),
    as a source on src: shape and dtype known up front (the conversion dry-run on meta tensors), the
    values made when src packs it: its inputs read, cast to the model's dtype as transformers does
    first, converted by transformers' own operations, and dropped once sent."""

    __slots__ = ("group", "name", "shape", "dtype")

    def __init__(self, group: "_HFFusion", name: str, shape: tuple, dtype: torch.dtype):
        self.group, self.name, self.shape, self.dtype = group, name, shape, dtype

    def is_contiguous(self) -> bool:
        return False

    def __call__(self) -> torch.Tensor:
        return self.group.take(self.name)

    def __repr__(self) -> str:
        return f"HFConverted({self.name!r}, shape={self.shape}, dtype={self.dtype})"


class _HFFusion:
    """One transformers `WeightConverter` application (one layer's fused parameters)."""

    def __init__(self, module, converter, first: str, inputs: list, dtype: torch.dtype):
        self.module, self.converter, self.first, self.inputs, self.dtype = module, converter, first, inputs, dtype
        self.made: dict = {}

    def run(self, values: list) -> dict:
        import copy

        conv = copy.deepcopy(self.converter)
        for (key, pattern, _), v in zip(self.inputs, values):
            conv.add_tensor(self.first, key, pattern, v.to(self.dtype))
        with torch.no_grad():
            out = conv.convert(self.first, model=self.module, config=getattr(self.module, "config", None))
        return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}

    def take(self, name: str) -> torch.Tensor:
        if name not in self.made:  # (again after an earlier take: verify reads a source twice)
            from .fill import read_file_tensor

            self.made = self.run([read_file_tensor(v) if isinstance(v, FileTensor) else v.detach()
                                  for _, _, v in self.inputs])
        return self.made.pop(name)


def _hf_fuse(module, by_pattern: dict, first: str, inputs: list, dtypes: dict) -> dict | None:
    """name -> `HFConverted` for what transformers' converter makes of `inputs` ((checkpoint key,
    the converter's source pattern it matched, value)), or None where that cannot be followed: a dry
    run on meta tensors fails, or makes a name the model lacks or a dtype other than the model's.
    `by_pattern`: source pattern -> converter."""
    try:
        from transformers.core_model_loading import dot_natural_key

        inputs = sorted(inputs, key=lambda kv: dot_natural_key(kv[0]))  # transformers' order (experts)
        converter = by_pattern[inputs[0][1]]  # the one transformers picks: by the first input's pattern
        dtype = dtypes[first]
        group = _HFFusion(module, converter, first, inputs, dtype)
        made = group.run([torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for _, _, v in inputs])
    except Exception:  # noqa: BLE001  transformers' machinery changed, or this conversion needs values
        return None
    if not made or any(n not in dtypes or dtypes[n] != dtype or not isinstance(t, torch.Tensor) or t.dtype != dtype
                       for n, t in made.items()):
        return None
    return {n: HFConverted(group, n, tuple(t.shape), dtype) for n, t in made.items()}


@contextlib.contextmanager
def _unwrapped_classes(module, base: type):
    """`fully_shard` gives each module it wraps a class of its own (`FSDPGPTNeoXForCausalLM` for
    `GPTNeoXForCausalLM`), and transformers looks a model's key renamings up by class name first:
    while inside, the `base` instances among `module`'s submodules that FSDP2 wrapped have their
    own class back (restored on the way out, exceptions included)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2: nothing was wrapped by it
        yield
        return
    swapped = []
    try:
        for m in module.modules():
            cls = type(m)
            if isinstance(m, base) and isinstance(m, FSDPModule) and cls.__bases__[:1] == (FSDPModule,) \
                    and len(cls.__bases__) == 2:
                m.__class__ = cls.__bases__[1]
                swapped.append((m, cls))
        yield
    finally:
        for m, cls in swapped:
            m.__class__ = cls

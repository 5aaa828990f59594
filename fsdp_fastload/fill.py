"""Stage 4, fill: src packs bucket-sized byte ranges of the wire space; each is broadcast in place.

Receivers receive straight into their final storage (no unpack). On src, packing (or reading from
safetensors) bucket k+1 overlaps the asynchronous broadcast of bucket k. CUDA targets pack host data
into two pinned staging buffers and copy host->device on a side stream, so the copy of bucket k+1
overlaps NCCL's broadcast of bucket k. gloo and NCCL run the same code.
"""
from __future__ import annotations

import bisect
import ctypes
import sys
import time
from types import GeneratorType
from typing import Callable

import torch

from . import ops
from .comm import Broadcasts, first_line
from .layout import CROSS_GAP, Layout, bucket_windows, memory_facts
from .source import FileTensor


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The bytes of `t` as a 1-D uint8 tensor (a copy only if `t` is not contiguous)."""
    t = t.detach()
    if t.is_conj() or t.is_neg():  # a lazy conjugate/negative view: its values, not its storage's
        t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8)


def read(path: str, file, dst: torch.Tensor, file_offsets, dst_offsets, lengths, num_threads: int) -> None:
    """`ops.read_ranges` of a FileTensor's file: through its `OpenFile`, checked against its stamp."""
    if file is None:
        ops.read_ranges(path, dst, file_offsets, dst_offsets, lengths, num_threads=num_threads)
    else:
        ops.read_ranges(path, dst, file_offsets, dst_offsets, lengths, num_threads=num_threads,
                        expect=file.stamp, fd=file.fd)


def read_file_tensor(ft: FileTensor, *, num_threads: int = 4) -> torch.Tensor:
    """The whole tensor `ft` read into fresh CPU memory (used when src must convert its dtype)."""
    raw = torch.empty(ft.nbytes, dtype=torch.uint8)
    if ft.nbytes:
        read(ft.path, ft.file, raw, [ft.offset], [0], [ft.nbytes], num_threads)
    return raw.view(ft.dtype).reshape(ft.shape)


_FILE, _MEM, _CONV = 0, 1, 2


class Packer:
    """Writes the wire bytes of a byte range [a, b) into a destination, from tensors or files.

    Each sent entry is one span of the wire space with one source: a byte range of a safetensors
    file already in its wire dtype (read straight into the destination: zero-copy on CPU targets),
    a contiguous tensor in its wire dtype, or a tensor/file that src converts first (cached until
    its last byte is packed). Consecutive spans whose source bytes sit at the same distance from
    their wire offsets (one storage, one file: a run of the layout) form one piece: a bucket inside
    one piece is one `read_ranges` range, or one copy (or no copy at all: `direct_view`). Other
    buckets cost one `copy_ranges` call for their memory pieces and one `read_ranges` call per file,
    their arguments sliced out of per-span lists, never a Python loop of copies.
    """

    def __init__(self, sources: list, layout: Layout, *, read_threads: int = 4, names: list | None = None,
                 facts: list | None = None, pieces: tuple[list, list] | None = None, only: list | None = None):
        """`pieces`: (byte offsets, element counts) per source, where entry i's bytes are that many
        elements of `sources[i]` from that byte on, already in its wire dtype (a shard of a full
        tensor or file range, without a slice object per shard); an offset of None: the whole source.
        `only`: the entries this packer covers (default: all), for buckets of theirs alone."""
        self.read_threads = read_threads
        self.names = names  # per source: the tensor's name, for error messages
        wire_off, wire_dtype = layout.wire, layout.wire_dtype
        if facts is None:
            facts = memory_facts(sources)
        skips, counts = pieces if pieces is not None else (None, None)
        spans = [(wire_off[i], i) for i in (range(len(sources)) if only is None else only)
                 if wire_off[i] >= 0 and sources[i] is not None]
        spans.sort()
        starts, ends, kinds, objs, offs, runs, ids = [], [], [], [], [], [], []
        self.cross: set[int] = set()  # runs of CPU memory that span several storages
        run, prev, prev_base = -1, None, None
        for w, i in spans:
            src, wire = sources[i], wire_dtype[i]
            base = None
            skip = None if skips is None else skips[i]
            f = facts[i]
            if f is not None:  # a contiguous tensor with memory
                addr, base, dtype, numel, dev = f
                if skip is not None:
                    addr, numel = addr + skip, counts[i]
                if dtype == wire:
                    kind, obj, off = _MEM, src, skip or 0
                    # CPU memory: one piece across storages too, over gaps small enough to be mapped
                    key = (_MEM, -1, addr - w) if dev < 0 else (_MEM, dev, base, addr - w)
                else:
                    kind, obj, off, key = _CONV, src, wire, None
            elif isinstance(src, torch.Tensor):  # strided: made contiguous (and converted) when packed
                numel, kind, obj, off, key = src.numel(), _CONV, src, wire, None
            elif isinstance(src, FileTensor):
                numel = src.nbytes // src.dtype.itemsize if skip is None else counts[i]
                if src.dtype == wire:
                    off = src.offset + (skip or 0)
                    kind, obj = _FILE, (src.path, src.file)  # (the file its header was read from)
                    key = (_FILE, obj, off - w)
                else:
                    kind, obj, off, key = _CONV, src, wire, None
            else:  # a lazily materialized source (shard.py): shape and dtype, converted when packed
                numel, kind, obj, off, key = _numel(src), _CONV, src, wire, None
            if skip is not None and kind == _CONV:
                raise ValueError(f"Packer: source {i} is a piece that needs converting; pass the piece itself")
            if not numel:
                continue
            crosses = key is not None and key == prev and base != prev_base
            if key is None or key != prev or (crosses and w - ends[-1] > CROSS_GAP):
                run += 1
            elif crosses:
                self.cross.add(run)
            prev, prev_base = key, base
            starts.append(w)
            ends.append(w + numel * wire.itemsize)
            kinds.append(kind)
            objs.append(obj)
            offs.append(off)
            runs.append(run)
            ids.append(i)
        self.starts, self.ends, self.kinds, self.objs, self.offs, self.runs = starts, ends, kinds, objs, offs, runs
        self.ids = ids
        self.lens = [e - s for s, e in zip(starts, ends)]
        self.run_end: dict[int, int] = {}  # run -> end of its last span (wire bytes)
        for r, e in zip(runs, ends):
            self.run_end[r] = e
        self.non_mem = [0]  # non_mem[j]: spans before j that are not plain memory
        for k in kinds:
            self.non_mem.append(self.non_mem[-1] + (k != _MEM))
        self.converted: dict[int, torch.Tensor] = {}
        self.storages: dict[tuple, torch.Tensor] = {}
        self.wrote_host = False

    def describe(self, a: int, b: int) -> str:
        """The tensors whose bytes lie in [a, b), for an error message ('' without names)."""
        if not self.names:
            return ""
        j0, j1 = self._span_range(a, b)
        got = [repr(self.names[self.ids[j]]) for j in range(j0, min(j1, j0 + 5))]
        more = f" and {j1 - j0 - len(got)} more" if j1 - j0 > len(got) else ""
        return f"; tensor{'s' if j1 - j0 > 1 else ''} {', '.join(got)}{more}" if got else ""

    def _span_range(self, a: int, b: int) -> tuple[int, int]:
        return bisect.bisect_right(self.ends, a), bisect.bisect_left(self.starts, b)

    def _mem(self, j: int, last: bool) -> tuple[torch.Tensor, int]:
        """(contiguous tensor in the wire dtype, byte offset) for span j; conversions made once."""
        kind, obj, off = self.kinds[j], self.objs[j], self.offs[j]
        if kind == _MEM:
            return obj, off
        t = self.converted.get(j)
        if t is None:
            if isinstance(obj, FileTensor):
                t = read_file_tensor(obj, num_threads=self.read_threads)
            elif isinstance(obj, torch.Tensor):
                t = obj.detach().resolve_conj().resolve_neg()
            else:
                t = obj()
            t = t.to(off).contiguous()
            self.converted[j] = t
        if last:  # its last piece: drop the converted copy as we go
            del self.converted[j]
        return t, 0

    def _one_piece(self, j0: int, j1: int, a: int, b: int) -> tuple[int, int] | None:
        """[lo, hi) within [a, b) covered by spans j0..j1-1 if they form one run, else None."""
        if j0 >= j1 or self.runs[j0] != self.runs[j1 - 1] or self.kinds[j0] == _CONV:
            return None
        return max(a, self.starts[j0]), min(b, self.ends[j1 - 1])

    def _storage_bytes(self, j: int) -> torch.Tensor:
        """The whole storage of span j's tensor as uint8, made once per storage."""
        t = self.objs[j]
        st = t.untyped_storage()
        key = (st.data_ptr(), t.get_device())
        sb = self.storages.get(key)
        if sb is None:
            sb = self.storages[key] = torch.empty(0, dtype=torch.uint8, device=t.device).set_(st)
        return sb

    def direct_view(self, a: int, b: int) -> torch.Tensor | None:
        """The source bytes of [a, b) when they are one contiguous piece of memory (send, no copy)."""
        j0, j1 = self._span_range(a, b)
        piece = self._one_piece(j0, j1, a, b)
        if piece is None or self.kinds[j0] != _MEM:
            return None
        t = self.objs[j0]
        run = self.runs[j0]
        if run in self.cross:  # several storages back to back in CPU memory: the raw address range
            first = bisect.bisect_left(self.runs, run)
            if a < self.starts[first] or b > self.run_end[run]:
                return None
            addr = t.data_ptr() + self.offs[j0] - self.starts[j0] + a
            return torch.frombuffer((ctypes.c_char * (b - a)).from_address(addr), dtype=torch.uint8)
        # storage byte of wire byte 0
        base = t.data_ptr() + self.offs[j0] - t.untyped_storage().data_ptr() - self.starts[j0]
        sb = self._storage_bytes(j0)
        lo, hi = a + base, b + base
        if lo < 0 or hi > sb.numel():
            return None
        return sb[lo:hi]

    def pack(self, a: int, b: int, dst: torch.Tensor, *, split_device: bool = False) -> tuple | None:
        """Fill `dst` (uint8, covering [a, b)) with the wire bytes. With `split_device`, pieces that
        live on a device are returned instead, as `copy_ranges` arguments for the caller."""
        j0, j1 = self._span_range(a, b)
        self.wrote_host = False
        if j0 >= j1:
            return None
        piece = self._one_piece(j0, j1, a, b)
        if piece is not None and self.kinds[j0] == _FILE:
            lo, hi = piece
            read(*self.objs[j0], dst, [self.offs[j0] + lo - self.starts[j0]], [lo - a], [hi - lo], self.read_threads)
            self.wrote_host = True
            return None
        n = j1 - j0
        if (self.kinds[j0] == _FILE and self.runs[j1 - 1] - self.runs[j0] == n - 1
                and self.kinds[j0:j1].count(_FILE) == n  # (first: then every obj is a (path, file)
                and self.objs[j0:j1].count(self.objs[j0]) == n):  # pair, never a tensor to compare)
            # spans of one file, each a run of its own (a rank's shards of a checkpoint's tensors): one
            # read, its arguments by slicing (no two are back to back in both the file and the bucket)
            read(*self.objs[j0], dst, *self._sliced(j0, j1, a, b), self.read_threads)
            self.wrote_host = True
            return None
        if self.non_mem[j1] == self.non_mem[j0] and not split_device:  # plain memory: arguments by slicing
            ops.copy_ranges(dst, self.objs[j0:j1], *self._sliced(j0, j1, a, b))
            self.wrote_host = True
            return None
        return self._pack_mixed(j0, j1, a, b, dst, split_device)

    def _sliced(self, j0: int, j1: int, a: int, b: int) -> tuple[list, list, list]:
        """(source byte offsets, offsets in the bucket [a, b), lengths) of spans j0..j1-1, the first
        and last cut to the bucket: slices of the per-span lists, no loop over the spans' objects."""
        so = self.offs[j0:j1]
        do = [s - a for s in self.starts[j0:j1]]
        ln = self.lens[j0:j1]
        if do[0] < 0:  # the first span began in an earlier bucket
            so[0], ln[0], do[0] = so[0] - do[0], ln[0] + do[0], 0
        over = self.ends[j1 - 1] - b
        if over > 0:  # the last span goes on in the next bucket
            ln[-1] -= over
        return so, do, ln

    def _pack_mixed(self, j0, j1, a, b, dst, split_device) -> tuple | None:
        mem: tuple[list, list, list, list] = ([], [], [], [])
        dev: tuple[list, list, list, list] = ([], [], [], [])
        reads: dict[tuple, list[list[int]]] = {}  # (path, open file) -> its ranges
        for j in range(j0, j1):
            start, end = self.starts[j], self.ends[j]
            s, e = max(start, a), min(end, b)
            if self.kinds[j] == _FILE:
                fo = self.offs[j] + s - start
                rs = reads.setdefault(self.objs[j], [])
                if rs and rs[-1][0] + rs[-1][2] == fo and rs[-1][1] + rs[-1][2] == s - a:
                    rs[-1][2] += e - s  # back to back in the file and in the bucket: one read
                else:
                    rs.append([fo, s - a, e - s])
                continue
            t, off = self._mem(j, e == end)
            lists = dev if split_device and t.device.type != "cpu" else mem
            for lst, v in zip(lists, (t, off + s - start, s - a, e - s)):
                lst.append(v)
        self.wrote_host = bool(mem[0] or reads)
        if mem[0]:
            ops.copy_ranges(dst, *mem)
        for (path, file), rs in reads.items():
            fo, do, ln = zip(*rs)
            read(path, file, dst, fo, do, ln, self.read_threads)
        return dev if dev[0] else None


class WindowedPacker:
    """A `Packer` made window by window: one for the entries of about `WINDOW` tensors' buckets at a
    time, when the fill reaches them (same interface; callers pass whole buckets). src's first
    bucket then waits for its window's packer, not for one over every tensor (~5 us a tensor in
    Python: 7 ms of src's time before its first byte on the 1,443-tensor model); the later windows
    are made while earlier buckets are in flight. An entry straddling two windows is in both."""

    WINDOW = 128

    def __init__(self, sources: list, layout: Layout, *, numels: list[int], read_threads: int = 4,
                 names: list | None = None, facts: list | None = None):
        self.sources, self.layout = sources, layout
        self.kw = dict(read_threads=read_threads, names=names,
                       facts=memory_facts(sources) if facts is None else facts)
        wire, dtypes = layout.wire, layout.wire_dtype
        sent = [i for i in range(len(sources)) if wire[i] >= 0 and sources[i] is not None and numels[i]]
        nbytes = [n * d.itemsize if d is not None else 0 for n, d in zip(numels, dtypes)]
        self.bucket_starts = [a for a, _ in layout.buckets]
        self.window_of, self.windows = bucket_windows(layout.buckets, wire, sent, nbytes, self.WINDOW)
        self.current, self.packer = -1, None

    def _for(self, a: int) -> Packer:
        """The packer of the window holding the bucket that starts at byte `a`."""
        w = self.window_of[bisect.bisect_right(self.bucket_starts, a) - 1]
        if w != self.current:
            self.packer, self.current = None, -1  # (a failure below is raised again next time)
            self.packer = Packer(self.sources, self.layout, only=self.windows[w], **self.kw)
            self.current = w
        return self.packer

    @property
    def wrote_host(self) -> bool:
        return self.packer is not None and self.packer.wrote_host

    def pack(self, a: int, b: int, dst: torch.Tensor, *, split_device: bool = False) -> tuple | None:
        return self._for(a).pack(a, b, dst, split_device=split_device)

    def direct_view(self, a: int, b: int) -> torch.Tensor | None:
        try:  # (called outside the fill's error handling: a window that cannot be made is packed, and fails, there)
            packer = self._for(a)
        except Exception:  # noqa: BLE001
            return None
        return packer.direct_view(a, b)

    def describe(self, a: int, b: int) -> str:
        try:  # (called while reporting a failure, possibly this window's own)
            return self._for(a).describe(a, b)
        except Exception:  # noqa: BLE001
            return ""


def make_packer(sources: list, layout: Layout, *, numels: list[int], read_threads: int = 4,
                names: list | None = None, facts: list | None = None) -> Packer | WindowedPacker:
    """src's packer for `layout`'s buckets: window by window past `WindowedPacker.WINDOW` tensors."""
    if len(sources) <= WindowedPacker.WINDOW or len(layout.buckets) < 2:
        return Packer(sources, layout, read_threads=read_threads, names=names, facts=facts)
    return WindowedPacker(sources, layout, numels=numels, read_threads=read_threads, names=names, facts=facts)


def _numel(src) -> int:
    if src is None:
        return 0
    n = 1
    for s in src.shape:
        n *= s
    return n


def _progress(total: int) -> Callable[[int, float], None] | None:
    if total < (1 << 30) or not sys.stderr.isatty():
        return None

    def show(done: int, t0: float) -> None:
        dt = max(time.perf_counter() - t0, 1e-9)
        rate = done / dt
        eta = (total - done) / rate if rate else float("inf")
        sys.stderr.write(f"\rfsdp_fastload: {done / 1e9:6.2f}/{total / 1e9:.2f} GB  "
                         f"{rate / 1e9:5.2f} GB/s  ETA {eta:5.1f} s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def broadcast_fill(target: Callable[[int, int], torch.Tensor] | None, layout: Layout, *, is_src: bool,
                   packer: Packer | None, src: int, group, device: torch.device,
                   max_inflight: int = 4, progress: bool | None = None,
                   timeout: float | None = None, meanwhile: Callable[[], object] | None = None) -> str | None:
    """Fill every bucket's `target(a, b)` on every rank with src's bytes (collective).

    `target=None` on src means src keeps its own tensors (already on `device`): a bucket inside one
    tensor is sent straight from it, other buckets are packed into two reused staging buffers.
    `meanwhile` (work that needs no values: carving views, making parameters) runs while bytes
    arrive, in the time this rank would otherwise spend blocked on a transfer (see `Meanwhile`).
    Failures (see `comm.Broadcasts`): a dead or stuck peer raises MaterializeError on every surviving
    rank within `timeout` seconds per wait (None: `comm.default_timeout`). Returns this rank's own
    problem, None if all went well: a read/pack failure on src, or a failure of `meanwhile`, for the
    caller to agree on with the other ranks once every fill is done (so that all raise together).
    Either way nothing was installed.
    """
    sends = Broadcasts(layout, src=src, group=group, max_inflight=max_inflight, timeout=timeout,
                       poll=device.type == "cuda")
    if is_src and target is None:
        return _send_kept(layout, packer, sends, device=device, progress=progress)
    cuda = device.type == "cuda"
    staging: list[torch.Tensor] = []
    events: list = [None, None]
    copy_stream = None
    if cuda and is_src:
        copy_stream = torch.cuda.Stream(device=device)
        copy_stream.wait_stream(torch.cuda.current_stream(device))
        biggest = max((b - a for a, b in layout.buckets), default=0)
        try:
            staging = [ops.alloc(biggest, "cpu", pin_memory=True) for _ in range(2)]
        except RuntimeError as e:  # src still sends every bucket (unpacked): every rank raises this after
            sends.error = staging_problem(2 * biggest, e)
    show = _progress(layout.wire_total) if is_src and progress is not False else None
    t0 = time.perf_counter()
    later = Meanwhile(meanwhile, sends)
    for k, (a, b) in enumerate(layout.buckets):
        dst = target(a, b)
        if is_src and sends.error is None:
            try:
                if cuda:
                    _pack_cuda(dst, a, b, packer, staging[k % 2], events, k % 2, copy_stream, device)
                else:
                    packer.pack(a, b, dst)
            except Exception as e:  # noqa: BLE001  src keeps sending; every rank raises it after the fill
                sends.fail(k, e, packer.describe(a, b))
        sends.send(k, dst)
        if show:
            show(b, t0)
    later.finish()
    sends.drain()
    if cuda:
        torch.cuda.current_stream(device).synchronize()
    return sends.error or later.problem()


def staging_problem(nbytes: int, e: BaseException) -> str:
    """The agreement's text when src cannot allocate its staging buffers."""
    return (f"src could not allocate {nbytes / 2**20:.0f} MiB of staging buffers ({first_line(e)}). Free memory on "
            "src, or pass a smaller materialize(..., bucket_size=...). Nothing was installed on any rank.")


class Meanwhile:
    """Work that needs no values, overlapping a transfer: run in pieces whenever this rank would
    otherwise block on one of `sends`' transfers (src waiting for a staging buffer or an in-flight
    slot, a receiver for its bytes), and whatever is left by `finish()`. `fn` returns None (one
    piece) or a generator (a piece between yields: keep each under ~1 ms, since a transfer that
    completes meanwhile waits for the piece to end). A failure is kept in `failed` (see `problem`),
    for every rank to raise after the last collective of the fill (raising mid-loop would leave the
    peers waiting)."""

    def __init__(self, fn: Callable[[], object] | None, sends=None):
        self.fn, self.failed, self.pieces = fn, None, None
        if sends is not None and fn is not None:
            sends.idle = self.step

    def step(self) -> bool:
        """Run the next piece; whether any is left."""
        try:
            if self.pieces is None:
                fn, self.fn = self.fn, None
                if fn is None:
                    return False
                self.pieces = fn()
                if not isinstance(self.pieces, GeneratorType):
                    self.pieces = None
                    return False
            next(self.pieces)
            return True
        except StopIteration:
            self.pieces = None
        except Exception as e:  # noqa: BLE001
            self.failed, self.pieces = e, None
        return False

    def finish(self) -> None:
        while self.step():
            pass

    def problem(self) -> str | None:
        """The failure, as text for the agreement after the fill; None if there was none."""
        e = self.failed
        if e is None:
            return None
        return (f"preparing the tensors to install while the bytes arrived failed: {type(e).__name__}: {e} "
                "Nothing was installed.")


def _pack_cuda(dst, a, b, packer, stage, events, slot, copy_stream, device) -> None:
    """Host data -> pinned staging -> device (side stream); device pieces copied device-to-device."""
    if events[slot] is not None:
        events[slot].synchronize()  # the copy that last read this staging buffer is done
    device_pieces = packer.pack(a, b, stage[:b - a], split_device=True)
    with torch.cuda.stream(copy_stream):
        if packer.wrote_host:
            dst.copy_(stage[:b - a], non_blocking=True)
        if device_pieces:
            ops.copy_ranges(dst, *device_pieces)
        ev = torch.cuda.Event()
        ev.record(copy_stream)
    events[slot] = ev
    torch.cuda.current_stream(device).wait_event(ev)  # NCCL orders itself after the current stream


def _send_kept(layout: Layout, packer: Packer, sends: Broadcasts, *, device, progress) -> str | None:
    show = _progress(layout.wire_total) if progress is not False else None
    t0 = time.perf_counter()
    biggest = max((b - a for a, b in layout.buckets), default=0)
    slots: list[torch.Tensor | None] = [None, None]  # staging, allocated on first use
    slot_sent: list = [None, None]  # the broadcast that last read each staging buffer
    packed = 0
    for k, (a, b) in enumerate(layout.buckets):
        buf = packer.direct_view(a, b) if sends.error is None else None
        slot = None
        if buf is None:
            slot, packed = packed % 2, packed + 1
            if slot_sent[slot] is not None:
                sends.wait(slot_sent[slot])
            if slots[slot] is None:
                slots[slot] = ops.alloc(biggest, device)
            buf = slots[slot][:b - a]
            if sends.error is None:
                try:
                    packer.pack(a, b, buf)
                except Exception as e:  # noqa: BLE001  src keeps sending; every rank raises it after the fill
                    sends.fail(k, e, packer.describe(a, b))
        sent = sends.send(k, buf)
        if slot is not None:
            slot_sent[slot] = sent
        if show:
            show(b, t0)
    sends.drain()
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return sends.error

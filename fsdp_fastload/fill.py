"""Stage 4, fill: src packs bucket-sized byte ranges of the wire space; each is broadcast in place.

Receivers receive straight into their final storage (no unpack). On src, packing (or reading from
safetensors) bucket k+1 overlaps the asynchronous broadcast of bucket k. CUDA targets pack host data
into two pinned staging buffers and copy host->device on a side stream, so the copy of bucket k+1
overlaps NCCL's broadcast of bucket k. gloo and NCCL run the same code.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from typing import Callable

import torch
import torch.distributed as dist

from . import ops
from .layout import MAX_GAP, Layout
from .source import FileTensor


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The bytes of `t` as a 1-D uint8 tensor (a copy only if `t` is not contiguous)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8)


def read_file_tensor(ft: FileTensor, *, num_threads: int = 4) -> torch.Tensor:
    """The whole tensor `ft` read into fresh CPU memory (used when src must convert its dtype)."""
    raw = torch.empty(ft.nbytes, dtype=torch.uint8)
    if ft.nbytes:
        ops.read_ranges(ft.path, raw, [ft.offset], [0], [ft.nbytes], num_threads=num_threads)
    return raw.view(ft.dtype).reshape(ft.shape)


class Packer:
    """Writes the wire bytes of a byte range [a, b) into a destination, from tensors or files.

    Pieces that are back to back at their source with the same spacing as in the layout (a run) are
    merged: one `read_ranges` range for a file, one copy (or no copy at all: `direct_view`) for
    memory. A safetensors tensor already in its wire dtype is read straight into the destination
    (zero-copy on CPU targets); others are converted to the wire dtype first where src must shrink them.
    """

    def __init__(self, sources: list, layout: Layout, *, read_threads: int = 4):
        self.layout, self.sources, self.read_threads = layout, sources, read_threads
        self.spans = sorted(
            (layout.wire[i], layout.wire[i] + _numel(s) * layout.wire_dtype[i].itemsize, i)
            for i, s in enumerate(sources) if layout.wire[i] >= 0 and _numel(s))
        self.cache: dict[int, tuple] = {}
        self.storages: dict[int, torch.Tensor] = {}
        self.first = 0

    def _locate(self, k: int) -> tuple:
        """(kind, object, byte offset of entry k's first wire byte in that object)."""
        loc = self.cache.get(k)
        if loc is not None:
            return loc
        src, wire = self.sources[k], self.layout.wire_dtype[k]
        if isinstance(src, FileTensor):
            if src.dtype == wire:
                loc = ("file", src.path, src.offset)
            else:
                loc = ("bytes", byte_view(read_file_tensor(src, num_threads=self.read_threads).to(wire)), 0)
        elif src.dtype == wire and src.is_contiguous():
            st = src.untyped_storage()
            sb = self.storages.get(st.data_ptr())
            if sb is None or sb.device != src.device:
                sb = torch.empty(0, dtype=torch.uint8, device=src.device).set_(st)
                self.storages[st.data_ptr()] = sb
            loc = ("mem", sb, src.storage_offset() * src.element_size())
        else:
            loc = ("bytes", byte_view(src.to(wire)), 0)
        self.cache[k] = loc
        return loc

    def _segments(self, a: int, b: int, consume: bool = True) -> list[list]:
        """[start, end, kind, object, offset] pieces of [a, b), merged where contiguous at the source."""
        i = self.first
        while i < len(self.spans) and self.spans[i][1] <= a:
            i += 1
        self.first = i
        segs: list[list] = []
        while i < len(self.spans) and self.spans[i][0] < b:
            start, end, k = self.spans[i]
            kind, obj, off = self._locate(k)
            s, e = max(start, a), min(end, b)
            off += s - start
            last = segs[-1] if segs else None
            if (last is not None and last[2] == kind and last[3] is obj and kind != "bytes"
                    and 0 <= s - last[1] <= MAX_GAP and last[4] + (s - last[0]) == off):
                last[1] = e  # back to back at the source: one piece (the gap's bytes come along)
            else:
                segs.append([s, e, kind, obj, off])
            if end <= b and consume:
                self.cache.pop(k, None)  # its last piece: drop converted copies as we go
            i += 1
        return segs

    def direct_view(self, a: int, b: int) -> torch.Tensor | None:
        """The source bytes of [a, b) when they are one contiguous piece of memory (send, no copy)."""
        first = self.first
        segs = self._segments(a, b, consume=False)
        self.first = first
        if len(segs) == 1 and segs[0][0] == a and segs[0][1] == b and segs[0][2] != "file":
            _, _, _, obj, off = segs[0]
            view = obj[off:off + b - a]
            self._segments(a, b)  # consume
            return view
        return None  # not sendable as it is: pack() walks the same pieces

    def pack(self, a: int, b: int, dst: torch.Tensor, *, defer_device: bool = False) -> list:
        """Fill `dst` (uint8, covering [a, b)); with `defer_device`, return device pieces instead."""
        reads: dict[str, tuple[list, list, list]] = {}
        deferred = []
        self.wrote_host = False
        for s, e, kind, obj, off in self._segments(a, b):
            if kind == "file":
                fo, do, ln = reads.setdefault(obj, ([], [], []))
                fo.append(off)
                do.append(s - a)
                ln.append(e - s)
                continue
            piece = obj[off:off + e - s]
            if defer_device and piece.is_cuda:
                deferred.append((s, e, piece))
            else:
                dst[s - a:e - a].copy_(piece)
                self.wrote_host = True
        self.wrote_host |= bool(reads)
        for path, (fo, do, ln) in reads.items():
            ops.read_ranges(path, dst, fo, do, ln, num_threads=self.read_threads)
        return deferred


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
                   max_inflight: int = 4, progress: bool | None = None) -> None:
    """Fill every bucket's `target(a, b)` on every rank with src's bytes (collective).

    `target=None` on src means src keeps its own tensors (already on `device`): a bucket inside one
    tensor is sent straight from it, other buckets are packed into two reused staging buffers.
    """
    if is_src and target is None:
        return _send_kept(layout, packer, src=src, group=group, device=device,
                          max_inflight=max_inflight, progress=progress)
    cuda = device.type == "cuda"
    staging: list[torch.Tensor] = []
    events: list = [None, None]
    copy_stream = None
    if cuda and is_src:
        copy_stream = torch.cuda.Stream(device=device)
        copy_stream.wait_stream(torch.cuda.current_stream(device))
        biggest = max((b - a for a, b in layout.buckets), default=0)
        staging = [ops.alloc(biggest, "cpu", pin_memory=True) for _ in range(2)]
    show = _progress(layout.wire_total) if is_src and progress is not False else None
    t0 = time.perf_counter()
    inflight: deque = deque()
    for k, (a, b) in enumerate(layout.buckets):
        dst = target(a, b)
        if is_src:
            if cuda:
                _pack_cuda(dst, a, b, packer, staging[k % 2], events, k % 2, copy_stream, device)
            else:
                packer.pack(a, b, dst)
        while len(inflight) >= max_inflight:
            inflight.popleft().wait()
        inflight.append(dist.broadcast(dst, src=src, group=group, async_op=True))
        if show:
            show(b, t0)
    while inflight:
        inflight.popleft().wait()
    if cuda:
        torch.cuda.current_stream(device).synchronize()


def _pack_cuda(dst, a, b, packer, stage, events, slot, copy_stream, device) -> None:
    """Host data -> pinned staging -> device (side stream); device pieces copied device-to-device."""
    if events[slot] is not None:
        events[slot].synchronize()  # the copy that last read this staging buffer is done
    deferred = packer.pack(a, b, stage[:b - a], defer_device=True)
    with torch.cuda.stream(copy_stream):
        if packer.wrote_host:
            dst.copy_(stage[:b - a], non_blocking=True)
        for s, e, piece in deferred:
            dst[s - a:e - a].copy_(piece, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(copy_stream)
    events[slot] = ev
    torch.cuda.current_stream(device).wait_event(ev)  # NCCL orders itself after the current stream


def _send_kept(layout: Layout, packer: Packer, *, src, group, device, max_inflight, progress) -> None:
    show = _progress(layout.wire_total) if progress is not False else None
    t0 = time.perf_counter()
    inflight: deque = deque()
    biggest = max((b - a for a, b in layout.buckets), default=0)
    slots: list[torch.Tensor | None] = [None, None]  # staging, allocated on first use
    slot_work: list = [None, None]  # the broadcast that last read each staging buffer
    packed = 0
    for a, b in layout.buckets:
        buf = packer.direct_view(a, b)
        slot = None
        if buf is None:
            slot, packed = packed % 2, packed + 1
            if slot_work[slot] is not None:
                slot_work[slot].wait()
            if slots[slot] is None:
                slots[slot] = ops.alloc(biggest, device)
            buf = slots[slot][:b - a]
            packer.pack(a, b, buf)
        while len(inflight) >= max_inflight:
            inflight.popleft().wait()
        work = dist.broadcast(buf, src=src, group=group, async_op=True)
        inflight.append(work)
        if slot is not None:
            slot_work[slot] = work
        if show:
            show(b, t0)
    while inflight:
        inflight.popleft().wait()
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()

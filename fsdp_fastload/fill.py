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
from .layout import Layout
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

    A safetensors tensor already in its wire dtype is read straight into the destination with the
    `read_ranges` op (zero-copy on CPU targets); anything else is a tensor whose bytes are copied,
    converted to the wire dtype first where src must shrink it.
    """

    def __init__(self, sources: list, layout: Layout, *, read_threads: int = 4):
        self.layout, self.sources, self.read_threads = layout, sources, read_threads
        self.spans = sorted(
            (layout.wire[i], layout.wire[i] + _numel(s) * layout.wire_dtype[i].itemsize, i)
            for i, s in enumerate(sources) if layout.wire[i] is not None and _numel(s))
        self.views: dict[int, torch.Tensor | None] = {}
        self.first = 0

    def _bytes(self, i: int) -> torch.Tensor | None:
        """Byte view of entry i's wire data, or None when it is read straight from its file."""
        if i in self.views:
            return self.views[i]
        src, wire = self.sources[i], self.layout.wire_dtype[i]
        if isinstance(src, FileTensor):
            bv = None if src.dtype == wire else byte_view(
                read_file_tensor(src, num_threads=self.read_threads).to(wire))
        else:
            bv = byte_view(src if src.dtype == wire else src.to(wire))
        self.views[i] = bv
        return bv

    def direct_view(self, a: int, b: int) -> torch.Tensor | None:
        """The source bytes of [a, b) when they lie inside one source tensor (send without a copy)."""
        i = self.first
        while i < len(self.spans) and self.spans[i][1] <= a:
            i += 1
        if i < len(self.spans) and self.spans[i][0] <= a and b <= self.spans[i][1]:
            start, end, k = self.spans[i]
            bv = self._bytes(k)
            if bv is not None:
                return bv[a - start:b - start]
        return None

    def pack(self, a: int, b: int, dst: torch.Tensor, *, defer_device: bool = False) -> list:
        """Fill `dst` (uint8, covering [a, b)); with `defer_device`, return device pieces instead."""
        i = self.first
        while i < len(self.spans) and self.spans[i][1] <= a:
            i += 1
        self.first = i
        reads: dict[str, tuple[list, list, list]] = {}
        deferred = []
        self.wrote_host = False
        while i < len(self.spans) and self.spans[i][0] < b:
            start, end, k = self.spans[i]
            s, e = max(start, a), min(end, b)
            bv = self._bytes(k)
            if bv is None:
                ft = self.sources[k]
                fo, do, ln = reads.setdefault(ft.path, ([], [], []))
                fo.append(ft.offset + s - start)
                do.append(s - a)
                ln.append(e - s)
            elif defer_device and bv.is_cuda:
                deferred.append((s, e, bv[s - start:e - start]))
            else:
                dst[s - a:e - a].copy_(bv[s - start:e - start])
                self.wrote_host = True
            if end <= b:
                self.views.pop(k, None)
            i += 1
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

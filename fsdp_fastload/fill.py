"""Stage 4, fill: src packs bucket-sized byte ranges of its flat buffer; each is broadcast in place.

Receivers receive straight into their final storage (no unpack). On src, packing bucket k+1 overlaps
the (asynchronous) broadcast of bucket k. CUDA targets with host-resident sources pack into two pinned
staging buffers and copy host->device on a side stream, so the copy of bucket k+1 overlaps NCCL's
broadcast of bucket k. gloo and NCCL run the same code.
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
from .manifest import Entry


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The bytes of `t` as a 1-D uint8 tensor (a copy only if `t` is not contiguous)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8)


class Packer:
    """Copies the bytes of the source tensors that fall in a byte range [a, b) of the layout."""

    def __init__(self, sources: list[torch.Tensor], layout: Layout, entries: list[Entry]):
        self.spans = [(off, off + e.nbytes, t) for off, e, t in zip(layout.offsets, entries, sources)
                      if e.nbytes]
        self.views: dict[int, torch.Tensor] = {}
        self.first = 0  # spans before this index end at or before the last packed range

    def pieces(self, a: int, b: int):
        """(start, end, source bytes) for every source piece inside [a, b), in order."""
        i = self.first
        while i < len(self.spans) and self.spans[i][1] <= a:
            i += 1
        self.first = i
        while i < len(self.spans) and self.spans[i][0] < b:
            start, end, t = self.spans[i]
            bv = self.views.get(i)
            if bv is None:
                bv = self.views[i] = byte_view(t)
            s, e = max(start, a), min(end, b)
            yield s, e, bv[s - start:e - start]
            if end <= b:
                self.views.pop(i, None)
            i += 1


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


def broadcast_fill(flat: torch.Tensor, layout: Layout, *, is_src: bool, packer: Packer | None,
                   src: int, group, max_inflight: int = 4, progress: bool | None = None) -> None:
    """Fill `flat` on every rank with src's bytes, bucket by bucket (collective)."""
    cuda = flat.device.type == "cuda"
    staging: list[torch.Tensor] = []
    events: list = [None, None]
    copy_stream = None
    if cuda and is_src:
        copy_stream = torch.cuda.Stream(device=flat.device)
        copy_stream.wait_stream(torch.cuda.current_stream(flat.device))
        biggest = max((b - a for a, b in layout.buckets), default=0)
        staging = [ops.alloc(biggest, "cpu", pin_memory=True) for _ in range(2)]
    show = _progress(layout.total) if is_src and progress is not False else None
    t0 = time.perf_counter()
    inflight: deque = deque()
    for k, (a, b) in enumerate(layout.buckets):
        if is_src:
            if cuda:
                _pack_cuda(flat, a, b, packer, staging[k % 2], events, k % 2, copy_stream)
            else:
                for s, e, piece in packer.pieces(a, b):
                    flat[s:e].copy_(piece)
        while len(inflight) >= max_inflight:
            inflight.popleft().wait()
        inflight.append(dist.broadcast(flat[a:b], src=src, group=group, async_op=True))
        if show:
            show(b, t0)
    while inflight:
        inflight.popleft().wait()
    if cuda:
        torch.cuda.current_stream(flat.device).synchronize()


def _pack_cuda(flat, a, b, packer, stage, events, slot, copy_stream) -> None:
    """Host pieces -> pinned staging -> device (side stream); device pieces copied device-to-device."""
    if events[slot] is not None:
        events[slot].synchronize()  # the copy that last read this staging buffer is done
    host, dev = [], []
    for s, e, piece in packer.pieces(a, b):
        (dev if piece.is_cuda else host).append((s, e, piece))
    with torch.cuda.stream(copy_stream):
        if host:
            for s, e, piece in host:
                stage[s - a:e - a].copy_(piece)
            flat[a:b].copy_(stage[:b - a], non_blocking=True)
        for s, e, piece in dev:
            flat[s:e].copy_(piece, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(copy_stream)
    events[slot] = ev
    torch.cuda.current_stream(flat.device).wait_event(ev)  # NCCL orders itself after the current stream

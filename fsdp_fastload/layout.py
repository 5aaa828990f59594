"""Stage 2, layout: one aligned byte offset per tensor in one flat buffer, and the broadcast buckets.

Every rank computes the same layout from the same manifest and the same plan (which src shares
as wire dtypes), so no offsets are exchanged. The main buffer holds, in order:
  [tensors sent as they are | final storage of converted tensors | buffers recomputed locally].
Tensors sent in a smaller dtype than the module's ("send bf16, upcast after") travel in a separate
wire buffer that is freed after conversion. Buckets are byte ranges of the virtual wire space
[0, direct) -> main[0:direct), [direct, total) -> wire buffer; no bucket crosses `direct`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .manifest import Entry

ALIGN = 64  # bytes: >= every dtype's itemsize, and a cache line
DIRECT_CHUNK = 64 << 20  # a big tensor is broadcast in pieces of at most this (or the bucket size)


@dataclass(frozen=True)
class Layout:
    final: list[int]  # per entry: byte offset of its final storage in the main buffer
    main_total: int
    wire: list[int | None]  # per entry: offset in the virtual wire space (None: not sent)
    wire_dtype: list[torch.dtype | None]
    direct: int  # wire bytes living in the main buffer
    wire_total: int  # direct + bytes of the separate wire buffer
    buckets: list[tuple[int, int]]

    @property
    def sent_bytes(self) -> int:
        return self.wire_total


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def plan(entries: list[Entry], bucket_size: int, wire: list[torch.dtype | None] | None = None, *,
         direct_min: int | None = None) -> Layout:
    """`wire[i]`: dtype entry i travels in (None: recomputed locally); default: all sent as they are."""
    if wire is None:
        wire = [e.dtype for e in entries]
    n = len(entries)
    final: list[int] = [0] * n
    woff: list[int | None] = [None] * n
    off = 0
    direct_ids = [i for i in range(n) if wire[i] == entries[i].dtype]
    conv_ids = [i for i in range(n) if wire[i] is not None and wire[i] != entries[i].dtype]
    local_ids = [i for i in range(n) if wire[i] is None]
    for i in direct_ids:
        final[i] = woff[i] = off
        off = _align(off + entries[i].nbytes)
    direct = off
    for i in conv_ids + local_ids:
        final[i] = off
        off = _align(off + entries[i].nbytes)
    main_total = off
    w = direct
    for i in conv_ids:
        woff[i] = w
        w = _align(w + entries[i].numel * wire[i].itemsize)
    bucket_size = max(_align(int(bucket_size)), ALIGN)
    spans = [(woff[i], woff[i] + entries[i].numel * wire[i].itemsize) for i in direct_ids + conv_ids]
    direct_min = bucket_size // 2 if direct_min is None else max(int(direct_min), 1)
    buckets = _buckets([sp for sp in spans if sp[1] > sp[0]], bucket_size, direct, direct_min)
    return Layout(final=final, main_total=main_total, wire=woff, wire_dtype=list(wire), direct=direct,
                  wire_total=w, buckets=buckets)


def _buckets(spans: list[tuple[int, int]], size: int, boundary: int, direct_min: int) -> list[tuple[int, int]]:
    """Byte ranges to broadcast. A tensor of at least `direct_min` bytes gets buckets of its own (so
    src can send it straight from where it lives; pieces of up to DIRECT_CHUNK bytes); runs of
    smaller tensors share a bucket of at most `size` bytes, which src packs. No bucket crosses `boundary` (the end of the main buffer's wire part)."""
    out: list[tuple[int, int]] = []
    group: list[int] | None = None  # [start, end] of the open run of small tensors
    for s, e in spans:
        big = e - s >= direct_min
        if group is not None and (big or e - group[0] > size or (group[1] <= boundary < e)):
            out.append((group[0], group[1]))
            group = None
        if big:
            chunk = max(size, DIRECT_CHUNK)
            out.extend((a, min(a + chunk, e)) for a in range(s, e, chunk))
        elif group is None:
            group = [s, e]
        else:
            group[1] = e
    if group is not None:
        out.append((group[0], group[1]))
    return out

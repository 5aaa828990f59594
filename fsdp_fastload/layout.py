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


def plan(entries: list[Entry], bucket_size: int, wire: list[torch.dtype | None] | None = None) -> Layout:
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
    buckets = [(s, min(s + bucket_size, direct)) for s in range(0, direct, bucket_size)]
    buckets += [(s, min(s + bucket_size, w)) for s in range(direct, w, bucket_size)]
    return Layout(final=final, main_total=main_total, wire=woff, wire_dtype=list(wire), direct=direct,
                  wire_total=w, buckets=buckets)

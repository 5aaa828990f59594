"""Stage 2, layout: one aligned byte offset per tensor in one flat buffer, and its buckets.

Every rank computes the same layout from the same manifest, so no offsets are exchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

from .manifest import Entry

ALIGN = 64  # bytes: >= every dtype's itemsize, and a cache line


@dataclass(frozen=True)
class Layout:
    offsets: list[int]  # byte offset of each entry
    total: int  # bytes in the flat buffer (padded)
    buckets: list[tuple[int, int]]  # byte ranges [start, end) broadcast one at a time


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def plan(entries: list[Entry], bucket_size: int) -> Layout:
    offsets, off = [], 0
    for e in entries:
        offsets.append(off)
        off = _align(off + e.nbytes)
    total = off
    bucket_size = max(_align(int(bucket_size)), ALIGN)
    buckets = [(s, min(s + bucket_size, total)) for s in range(0, total, bucket_size)]
    return Layout(offsets=offsets, total=total, buckets=buckets)

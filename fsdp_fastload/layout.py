"""Stage 2, layout: one aligned byte offset per tensor in one flat buffer, and the broadcast buckets.

src plans the layout and ships it to every rank with one small broadcast (receivers never guess).
The main buffer holds, in order:
  [tensors sent as they are | final storage of converted tensors | buffers recomputed locally].
Tensors sent as they are follow src's own placement where it can: tensors that sit back to back in
src's memory (one storage, e.g. a model mmap-ed from safetensors) or in one safetensors file keep
their relative positions, so a whole run goes out in a few large broadcasts straight from src's
memory, or is read from the file with one `pread` per bucket. Tensors sent in a smaller dtype than
the module's ("send bf16, upcast after") travel in a separate wire buffer, freed after conversion.
Buckets are byte ranges of the virtual wire space [0, direct) -> main[0:direct),
[direct, wire_total) -> wire buffer; no bucket crosses `direct`.
"""
from __future__ import annotations

import bisect

from dataclasses import dataclass

import torch

from .manifest import Entry
from .source import FileTensor

ALIGN = 64  # bytes: >= every dtype's itemsize, and a cache line (CPU's allocator aligns to it too)
# CUDA: where the caching allocator puts every tensor allocated on its own (its blocks are multiples of
# 512 bytes). Kernels may choose by their operands' addresses (PyTorch hands cuBLASLt each matrix's
# alignment, up to 256 bytes, as a heuristic preference). On an H100 (torch 2.11) the tests' tiny
# models laid out at 64-byte offsets, from a CPU model or a checkpoint, failed the bit-exact comparison
# with `.to("cuda")` (logits included) while the flow that kept the allocator's placement passed; at
# 512 every flow passed. So on CUDA every tensor starts where the allocator would start it.
CUDA_ALIGN = 512
RUN_CHUNK = 4  # a run of back-to-back (or one big) tensors goes out in pieces of 4 buckets
MAX_GAP = 4096  # bytes between two tensors of one storage that still count as back to back
# Bytes between two CPU tensors of *different* storages that still count as back to back (each tensor
# of a model mmap-ed from safetensors has a storage of its own, with no byte between them). Any gap
# under a page between two mapped regions is itself mapped (it touches only their pages), so src can
# send the whole stretch as one piece; kept small so the receivers' copies of the gaps cost little.
CROSS_GAP = 512


@dataclass(frozen=True)
class Layout:
    final: list[int]  # per entry: byte offset of its final storage in the main buffer
    main_total: int
    wire: list[int]  # per entry: offset in the virtual wire space (-1: not sent)
    wire_dtype: list[torch.dtype | None]
    direct: int  # wire bytes living in the main buffer
    wire_total: int  # direct + bytes of the separate wire buffer
    buckets: list[tuple[int, int]]

    def encode(self) -> list[int]:
        from .ops import DTYPE_CODE

        codes = [-1 if d is None else DTYPE_CODE[d] for d in self.wire_dtype]
        flat = [b for ab in self.buckets for b in ab]
        return [self.main_total, self.direct, self.wire_total, len(self.final), len(self.buckets),
                *self.final, *self.wire, *codes, *flat]

    @staticmethod
    def decode(v: list[int]) -> "Layout":
        from .ops import _DTYPES

        main_total, direct, wire_total, n, nb = v[:5]
        final, wire, codes = v[5:5 + n], v[5 + n:5 + 2 * n], v[5 + 2 * n:5 + 3 * n]
        flat = v[5 + 3 * n:5 + 3 * n + 2 * nb]
        return Layout(final=list(final), main_total=main_total, wire=list(wire),
                      wire_dtype=[None if c < 0 else _DTYPES[c] for c in codes], direct=direct,
                      wire_total=wire_total, buckets=list(zip(flat[0::2], flat[1::2])))


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def device_align(device: torch.device) -> int:
    """The alignment of every tensor's offset in the flat buffer on `device` (see CUDA_ALIGN)."""
    return CUDA_ALIGN if device.type == "cuda" else ALIGN


_CPU = ("cpu",)


def memory_facts(sources: list) -> list:
    """Per source: (address, address of its storage's first byte, dtype, numel, device index or -1
    on CPU) for a contiguous tensor with memory; None for anything else (a file range, a meta,
    strided, or lazily conjugated/negated tensor). Gathered once per call for the layout and the
    packer: each attribute costs ~0.1-0.25 us from Python, ~0.1 s at 100k tensors when asked twice."""
    out: list = []
    tensor = torch.Tensor
    for s in sources:
        # (a lazy conjugate/negative view's storage holds other values than the tensor: not memory)
        if isinstance(s, tensor) and not s.is_meta and s.is_contiguous() and not (s.is_conj() or s.is_neg()):
            addr = s.data_ptr()
            out.append((addr, addr - s.storage_offset() * s.element_size(), s.dtype, s.numel(),
                        -1 if s.is_cpu else s.get_device()))
        else:
            out.append(None)
    return out


def _runs(entries: list[Entry], sources: list, ids: list[int], facts: list) -> list[list[tuple[int, int]]]:
    """Groups of two or more entries back to back at their source (one storage, one file, or CPU
    memory: see CROSS_GAP), each [(entry, byte address)] in address order; entries alone at their
    source are left out."""
    groups: dict = {}
    bases: dict[int, int] = {}  # entry -> address of its storage's first byte (memory sources)
    for i in ids:
        s = sources[i]
        if s is None:
            continue
        e = entries[i]
        if not e.nbytes:
            continue
        f = facts[i]
        if f is not None:
            addr, base, dtype, _, dev = f
            if dtype != e.dtype:
                continue
            bases[i] = base
            key = _CPU if dev < 0 else (dev, base)
        elif type(s) is FileTensor and s.dtype == e.dtype:
            key, addr = s.path, s.offset
        else:
            continue
        g = groups.get(key)
        if g is None:
            groups[key] = [(addr, i)]
        else:
            g.append((addr, i))
    runs: list[list[tuple[int, int]]] = []
    for g in groups.values():
        if len(g) < 2:
            continue
        g.sort()
        run: list[tuple[int, int]] = []
        end = prev_base = None
        for addr, i in g:
            base = bases.get(i)
            # across storages only over gaps of at most 1/64 of the tensor (the slack receivers allow
            # for): every byte of a gap is sent too, and malloc-ed tiny tensors sit 64-256 B apart
            if run and not (end <= addr <= end + MAX_GAP if base == prev_base
                            else end <= addr <= end + min(CROSS_GAP, entries[i].nbytes >> 6)):
                if len(run) > 1:
                    runs.append(run)
                run = []
            run.append((i, addr))
            end, prev_base = addr + entries[i].nbytes, base
        if len(run) > 1:
            runs.append(run)
    return runs


def plan(entries: list[Entry], *, bucket_size: int, direct_min: int,
         wire: list[torch.dtype | None] | None = None, sources: list | None = None,
         facts: list | None = None, align: int = ALIGN) -> Layout:
    """src's layout. `wire[i]`: dtype entry i travels in (None: recomputed locally; default: all
    sent as they are); `sources[i]`: where its bytes come from (tensor or FileTensor), if known;
    `facts`: `memory_facts(sources)` if already gathered; `align`: every tensor's offset a multiple
    of it (`device_align`), except that with the CPU's (ALIGN) a run of src's memory keeps src's own
    placement (each tensor at least at its dtype's alignment, as src's own)."""
    strict = align != ALIGN
    n = len(entries)
    if wire is None:
        wire = [e.dtype for e in entries]
    final, woff = [0] * n, [-1] * n
    direct_ids, conv_ids, local_ids = [], [], []
    for i, e in enumerate(entries):
        w = wire[i]
        # (a strided entry travels contiguous, in the wire buffer, and is copied into place after)
        (local_ids if w is None else direct_ids if w == e.dtype and e.strides is None else conv_ids).append(i)

    # Runs: entries back to back at their source keep their relative offsets (sent/read in one piece).
    spans: list[tuple[int, int, bool]] = []  # (start, end, sent as one piece at src), in offset order
    off = 0
    placed: set[int] = set()
    if sources is not None and facts is None:
        facts = memory_facts(sources)
    for run in (_runs(entries, sources, direct_ids, facts) if sources is not None else ()):
        start_addr = run[0][1]
        base = _align(off, align) + start_addr % align  # keep every member's alignment
        if any((base + a - start_addr) % (align if strict else entries[i].dtype.itemsize) for i, a in run):
            continue  # misaligned at its source: placed alone below
        for i, a in run:
            final[i] = woff[i] = base + a - start_addr
            placed.add(i)
        last_i, last_a = run[-1]
        off = base + last_a - start_addr + entries[last_i].nbytes
        start = final[run[0][0]]
        spans.append((start, off, off - start >= direct_min))  # a short run is packed with its neighbours
    mask = align - 1
    for i in direct_ids:
        if i in placed:
            continue
        nb = entries[i].nbytes
        final[i] = woff[i] = off = (off + mask) & ~mask
        if nb:
            spans.append((off, off + nb, nb >= direct_min))
            off += nb
    direct = off = _align(off, align)
    for i in conv_ids + local_ids:
        final[i] = off
        off = (off + entries[i].nbytes + mask) & ~mask
    main_total = off
    w = direct
    conv_spans = []
    for i in conv_ids:
        woff[i] = w
        nb = entries[i].numel * wire[i].itemsize
        if nb:
            conv_spans.append((w, w + nb, nb >= direct_min))
        w = (w + nb + mask) & ~mask
    bucket_size = max(_align(int(bucket_size), align), align)
    buckets = _buckets(spans, bucket_size) + _buckets(conv_spans, bucket_size)
    return Layout(final=final, main_total=main_total, wire=woff, wire_dtype=list(wire), direct=direct,
                  wire_total=w, buckets=buckets)


def _buckets(spans: list[tuple[int, int, bool]], size: int) -> list[tuple[int, int]]:
    """Byte ranges to broadcast. A run (or a tensor) of at least `direct_min` bytes gets buckets of
    its own, pieces of up to RUN_CHUNK buckets that src sends from where they live (the very first
    piece one bucket: nothing moves until src has read it); runs of smaller tensors share a bucket
    of at most `size` bytes, which src packs."""
    out: list[tuple[int, int]] = []
    group: list[int] | None = None  # [start, end] of the open group of small tensors
    for s, e, big in spans:
        if group is not None and (big or e - group[0] > size):
            out.append((group[0], group[1]))
            group = None
        if big:
            chunk = size * RUN_CHUNK
            if not out:  # the transfer's first bucket is one bucket: the pipeline starts (src reads it) sooner
                out.append((s, min(s + size, e)))
                s = min(s + size, e)
            out.extend((a, min(a + chunk, e)) for a in range(s, e, chunk))
        elif group is None:
            group = [s, e]
        else:
            group[1] = e
    if group is not None:
        out.append((group[0], group[1]))
    return out


def bucket_windows(buckets: list[tuple[int, int]], wire: list[int], sent: list[int], nbytes: list[int],
                   size: int) -> tuple[list[int], list[list[int]]]:
    """Runs of whole buckets holding about `size` entries each, for src's packers made a window at
    a time: (each bucket's window, each window's entries). `sent`: the entries that are sent, with
    wire offsets `wire[i]` and `nbytes[i]` wire bytes (none empty). An entry that straddles two
    windows is in both.

    Example::

        >>> bucket_windows([(0, 8), (8, 16)], wire=[0, 6, 12], sent=[0, 1, 2], nbytes=[6, 6, 4], size=1)
        ([0, 1], [[0, 1], [1, 2]])
    """
    order = sorted(sent, key=wire.__getitem__)  # (a sort by key and one list: ~0.5 us an entry)
    starts = [wire[i] for i in order]
    window_of: list[int] = []
    windows: list[list[int]] = []
    lo, first_a = 0, None  # first entry not yet in a closed window; that window's first byte
    for k, (a, b) in enumerate(buckets):
        if first_a is None:
            first_a = a
        window_of.append(len(windows))
        hi = bisect.bisect_left(starts, b)
        if hi - lo >= size or k == len(buckets) - 1:
            # and the entry before, if still going at the window's start (entries do not overlap:
            # no other one can be)
            j0 = lo - 1 if lo and starts[lo - 1] + nbytes[order[lo - 1]] > first_a else lo
            windows.append(order[j0:hi])
            lo, first_a = hi, None
    return window_of, windows

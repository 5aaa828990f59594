"""DTensor (FSDP2) parameters: every rank allocates and receives only its own local shard.

A model sharded with ``fully_shard`` on ``meta`` holds DTensor parameters whose local shard on each
rank is a box of the full tensor (``Shard(d)``: a ``torch.chunk`` piece; ``Replicate``: all of it;
FSDP2's ``_StridedShard`` over tensor parallelism: a chunk of a TP chunk). A DTensor on a sub-mesh
(FSDP2's ``dp`` part of a (dp, tp) mesh, flattened or not) has one copy per rank of the other
dimensions; each rank's box follows from its place in its own copy (`manifest.sub_frame`).
Each such entry gets one *slot* per rank, the same size on every rank (the largest local shard,
which is FSDP2's padded shard), and all slots live in a shard space laid out like the replicated
one (`layout.plan` over one virtual 1-D entry per slot). Bucket k of the shard space is moved with
one ``scatter``: src packs every rank's bytes of [a, b) (a contiguous piece of the checkpoint file
or of the full tensor for ``Shard(0)``) and each rank receives straight into its final storage, no
full tensor anywhere but on src, no second scatter. Afterwards the slot's tail past the local shard
is zeroed (FSDP2 pads with zeros) and the views are installed as DTensor parameters, FSDP2's
bookkeeping pointing at the same storage (no copy on its lazy init).
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from . import ops
from .fill import Meanwhile, _progress, staging_problem
from .layout import Layout, bucket_windows
from .manifest import Entry, owner_table
from .source import FileTensor


@dataclass(frozen=True)
class Geometry:
    """Where one DTensor entry's local shard lies on every rank of the group."""

    slot_numel: int  # elements per rank's slot: the largest local shard (FSDP2's padded shard)
    boxes: tuple  # per group rank index: (local shape, global offset per dim)
    me: int = 0  # this rank's index in the group
    starts: tuple = ()  # per box: its element offset in the row-major full tensor if contiguous, else None


def _box(shape: tuple, mesh_shape: tuple, coord: tuple, placements) -> tuple[tuple, tuple]:
    """Local shape and global offset at mesh coordinate `coord` (torch.chunk semantics per Shard)."""
    local, offset = list(shape), [0] * len(shape)
    for mesh_dim, p in enumerate(placements):
        if p.is_replicate():
            continue
        d, n, k = p.dim, mesh_shape[mesh_dim], coord[mesh_dim]
        chunk = -(-local[d] // n) if local[d] else 0
        start = min(k * chunk, local[d])
        offset[d] += start
        local[d] = max(0, min(chunk, local[d] - start))
    return tuple(local), tuple(offset)


def geometry(e: Entry, group_ranks: list[int], cache: dict) -> Geometry | str:
    """Every group rank's box of the DTensor entry `e`, or the reason it is not supported.

    Boxes follow DTensor's Shard semantics (`torch.chunk` per mesh dimension, left to right); the
    local shard's shape is checked on every entry, and once per (mesh, placements) against torch's
    own `compute_local_shape_and_global_offset`. `cache` is shared by one call's entries.
    """
    t = e.tensor
    # (the manifest gives the entries of one (placements, mesh) one `placement` tuple)
    key = ("geo", id(e.placement), e.shape)
    got = cache.get(key)
    if got is None:
        got = cache[key] = _geometry(e.shape, t.device_mesh, t.placements, group_ranks, cache)
    if isinstance(got, str):
        return got.replace("{name}", e.names[0])
    mine = got.boxes[got.me]
    if t._local_tensor.shape != mine[0]:
        if not e.numel:  # nothing to send (FSDP2 shapes an empty tensor's shards its own way): its shape
            local = tuple(t._local_tensor.shape)
            return Geometry(slot_numel=0, boxes=tuple((local, o) if r == got.me else (b, o)
                                                      for r, (b, o) in enumerate(got.boxes)),
                            me=got.me, starts=got.starts)
        name = e.names[0]
        return (f"not supported: '{name}' has a local shard of shape {tuple(t._local_tensor.shape)}, but "
                f"torch.chunk placement gives {mine[0]} at offset {mine[1]} (placements {t.placements}). "
                "Materialize the model before sharding it this way.")
    return got


def _fsdp_over_tp(i: int, placements, mesh_shape: tuple) -> bool:
    """Whether placement i is FSDP2's `_StridedShard` over tensor parallelism: dimension d split by
    the later mesh dimensions first (those that `Shard(d)`, `split_factor` ways in all), then each of
    those pieces by this one. Every rank's shard is then a chunk of a chunk: one box of the tensor."""
    p = placements[i]
    if type(p).__name__ != "_StridedShard" or not isinstance(getattr(p, "split_factor", None), int):
        return False
    from torch.distributed.tensor import Shard

    later = 1
    for j in range(i + 1, len(placements)):
        if type(placements[j]) is Shard and placements[j].dim == p.dim:
            later *= mesh_shape[j]
    return p.split_factor == later > 1


def _geometry(shape: tuple, mesh, placements, group_ranks: list[int], cache: dict) -> Geometry | str:
    """The boxes of one (global shape, mesh, placements), shared by every entry that has them
    (a model's layers repeat a handful of shapes); a message with '{name}' if not supported."""
    from torch.distributed.tensor import Replicate, Shard

    from .manifest import grid_coord, mesh_grid, sub_frame

    frame = sub_frame(mesh, cache)  # a sub-mesh (FSDP2's dp part of a (dp, tp) mesh): one copy per tp rank
    if frame is None:
        mesh_shape, ranks = mesh_grid(mesh, cache)
    else:
        mesh_shape, _, _, ranks, coords = frame
    strided = [i for i, p in enumerate(placements) if type(p) not in (Shard, Replicate)
               and _fsdp_over_tp(i, placements, mesh_shape)]
    odd = [repr(p) for i, p in enumerate(placements) if type(p) not in (Shard, Replicate) and i not in strided]
    if odd:
        return ("not supported: '{name}' is a DTensor with placements " + str(odd) + " (only Shard, Replicate "
                "and FSDP2's _StridedShard over tensor parallelism). Materialize the model before applying "
                "this parallelism, or use Shard/Replicate.")
    if sorted(ranks) != sorted(group_ranks):
        return (f"not supported: '{{name}}' lives on a device mesh of ranks {ranks[:8]} but materialize runs "
                f"over the group of ranks {group_ranks[:8]}. Pass group= covering exactly the mesh's ranks.")
    if frame is None:
        coords = cache.get(("coords", id(mesh)))
    if coords is None:
        coords = cache[("coords", id(mesh))] = {r: grid_coord(i, mesh_shape) for i, r in enumerate(ranks)}
    if strided:  # torch's own arithmetic for every rank (its `compute_local_shape_and_global_offset`, per coordinate)
        try:
            from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset as local_box

            boxes = tuple(tuple(map(tuple, local_box(shape, mesh_shape, list(coords[r]), placements)))
                          for r in group_ranks)
        except Exception as e:  # noqa: BLE001  (another torch's internals)
            return (f"not supported: '{{name}}' is sharded with {placements[strided[0]]!r} and this torch does not "
                    f"give each rank's shard ({type(e).__name__}: {e}). Materialize the model before sharding it.")
    else:
        boxes = tuple(_box(shape, mesh_shape, coords[r], placements) for r in group_ranks)
    me = group_ranks.index(dist.get_rank())
    key = ("checked", id(mesh), tuple(placements))
    if key not in cache:  # our chunk arithmetic against torch's own, once per (mesh, placements)
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        want = compute_local_shape_and_global_offset(shape, mesh, placements)
        if (tuple(want[0]), tuple(want[1])) != (tuple(boxes[me][0]), tuple(boxes[me][1])):
            return (f"not supported: '{{name}}': torch places its local shard at {tuple(want[0])}, offset "
                    f"{tuple(want[1])}, but torch.chunk placement gives {boxes[me][0]} at offset "
                    f"{boxes[me][1]} (placements {placements}). Materialize the model before sharding "
                    "it this way.")
        cache[key] = True
    slot = max((_numel(s) for s, _ in boxes), default=0)
    return Geometry(slot_numel=slot, boxes=boxes, me=me,
                    starts=tuple(_contiguous_start(shape, s, o) for s, o in boxes))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _strides(shape) -> list[int]:
    out, acc = [0] * len(shape), 1
    for d in range(len(shape) - 1, -1, -1):
        out[d] = acc
        acc *= shape[d]
    return out


def _contiguous_start(full: tuple, shape: tuple, offset: tuple) -> int | None:
    """Element offset of the box in the row-major full tensor if the box is one contiguous run:
    size 1 in every dimension before some dimension d, the full size in every one after it (the
    whole tensor, a block of rows, part of one row)."""
    if _numel(shape) == 0:
        return 0
    d = next((i for i in range(len(shape)) if shape[i] != 1), len(shape))
    if any(shape[i] != full[i] for i in range(d + 1, len(full))):
        return None
    return sum(o * s for o, s in zip(offset, _strides(full)))


class _LazySlice:
    """A box of a full source tensor that is not contiguous in it: materialized when packed."""

    def __init__(self, full: Callable[[], torch.Tensor], shape: tuple, offset: tuple, dtype: torch.dtype):
        self.full, self.shape, self.offset, self.dtype = full, shape, offset, dtype

    def is_contiguous(self) -> bool:
        return False

    def __call__(self) -> torch.Tensor:
        return box_of(self.full(), self.shape, self.offset)


def box_of(full: torch.Tensor, shape: tuple, offset: tuple) -> torch.Tensor:
    """The view of `full` that is the box of `shape` at `offset` (a rank's local shard)."""
    for d, (o, n) in enumerate(zip(offset, shape)):
        full = full.narrow(d, o, n)
    return full


def _loader(source, read_threads: int, uses: int) -> Callable[[], torch.Tensor]:
    """The full source tensor, made once for its `uses` pieces (each packer takes its piece once), then
    let go: src does not hold every converted or sliced tensor until the end."""
    cache: list = []
    taken = [0]

    def load() -> torch.Tensor:
        if not cache:
            from .fill import read_file_tensor

            if isinstance(source, FileTensor):
                cache.append(read_file_tensor(source, num_threads=read_threads))
            else:  # a tensor, or a source made when packed (source.HFConverted)
                cache.append(source.detach() if isinstance(source, torch.Tensor) else source())
        t = cache[0]
        taken[0] += 1
        if taken[0] % uses == 0:
            cache.clear()
        return t
    return load


def local_sources(source, e: Entry, geo: Geometry, *, read_threads: int = 4) -> list:
    """Per group rank: where its local shard's values come from (a FileTensor range, a 1-D slice of
    the flat source tensor: the packer sends bytes, so no reshape per piece; or a lazily sliced copy
    for boxes that are not contiguous in the full tensor, or of a source made when packed)."""
    plain_file = isinstance(source, FileTensor)
    sliceable = isinstance(source, torch.Tensor) and source.is_contiguous()
    lazy = sum(1 for (shape, _), start in zip(geo.boxes, geo.starts)  # (an empty box is never packed)
               if _numel(shape) and (start is None or not (plain_file or sliceable)))
    load = _loader(source, read_threads, max(lazy, 1))
    out, flat = [], None
    for (shape, offset), start in zip(geo.boxes, geo.starts):
        if start is not None and plain_file:
            item = source.dtype.itemsize
            out.append(FileTensor(source.path, source.offset + start * item, _numel(shape) * item,
                                  source.dtype, shape, source.file))
        elif start is not None and sliceable:
            if flat is None:
                flat = source.detach().reshape(-1)
            out.append(flat[start:start + _numel(shape)])
        else:
            out.append(_LazySlice(load, shape, offset, source.dtype))
    return out


def rank_packers(sources: list, entries: list[Entry], geos: list[Geometry], layout: Layout, *,
                 read_threads: int = 4, facts: list | None = None) -> RankPackers:
    """src's packer of each group rank's bytes of the shard space (`layout`), window by window
    (`facts`: `memory_facts(sources)` where the caller has them)."""
    return RankPackers(sources, entries, geos, layout, read_threads=read_threads, facts=facts)


class RankPackers:
    """src's packers, one per group rank, for the buckets of one window at a time (`for_bucket`).

    A window is a run of buckets holding about `WINDOW` entries; each rank's packer of a window
    covers only the entries whose slots meet its bytes, and is built when the scatters reach it.
    So src's first scatter waits for the first window's packers, not for a packer per rank of every
    tensor (O(world x tensors) in Python: ~11 ms at world 2 on 1,443 tensors, growing with world).

    A box that is one contiguous range of a full source already in its wire dtype (a ``Shard(0)``
    piece of a tensor or of a checkpoint file range) is addressed as (full source, byte offset,
    elements): no slice object per rank and parameter. Any other box is made by `local_sources`.
    """

    WINDOW = 128

    def __init__(self, sources: list, entries: list[Entry], geos: list[Geometry], layout: Layout, *,
                 read_threads: int = 4, facts: list | None = None):
        from .layout import memory_facts

        self.sources, self.geos, self.layout, self.read_threads = sources, geos, layout, read_threads
        self.world = len(geos[0].boxes) if geos else 0
        wire = layout.wire_dtype
        self.facts = facts = memory_facts(sources) if facts is None else facts
        self.odd: dict[int, list] = {}  # entry -> its per-rank sources from `local_sources`
        for i, (s, g) in enumerate(zip(sources, geos)):
            f = facts[i]
            plain = (f[2] == wire[i]) if f is not None else (type(s) is FileTensor and s.dtype == wire[i])
            if s is not None and (not plain or None in g.starts):  # (None: not sent, recomputed by every rank)
                self.odd[i] = local_sources(s, entries[i], g, read_threads=read_threads)
        self.names = [e.names[0] for e in entries]
        self.counts: dict = {}  # (geometry, rank) -> elements of that rank's box
        self.per_rank: dict[int, tuple[list, list]] = {}  # rank -> (sources, facts) with its odd pieces
        # windows: each bucket's window, and each window's entries (those meeting its buckets)
        sent = [i for i in range(len(sources)) if layout.wire[i] >= 0 and sources[i] is not None and geos[i].slot_numel]
        nbytes = [g.slot_numel * (d.itemsize if d is not None else 0) for g, d in zip(geos, wire)]
        self.window_of, self.windows = bucket_windows(layout.buckets, layout.wire, sent, nbytes, self.WINDOW)
        self.current, self.packers = -1, []

    def for_bucket(self, k: int) -> list:
        """Every group rank's packer for bucket k (built for its window on first use)."""
        w = self.window_of[k]
        if w != self.current:
            self.packers = [self._packer(r, self.windows[w]) for r in range(self.world)]
            self.current = w  # (only once every rank's packer is made: a failure is raised again)
        return self.packers

    def _packer(self, r: int, ids: list[int]):
        from .fill import Packer
        from .layout import memory_facts

        mine = self.per_rank.get(r)
        if mine is None:
            srcs, facts = self.sources, self.facts
            if self.odd:
                srcs, facts = list(srcs), list(facts)
                for i, per in self.odd.items():
                    srcs[i] = per[r]
                    facts[i] = memory_facts([per[r]])[0]
            mine = self.per_rank[r] = (srcs, facts)
        srcs, facts = mine
        wire, geos, counts = self.layout.wire_dtype, self.geos, self.counts
        skips: list = [None] * len(srcs)
        numels: list = [None] * len(srcs)
        for i in ids:
            if i in self.odd:
                continue
            g = geos[i]
            n = counts.get((id(g), r))
            if n is None:
                n = counts[(id(g), r)] = _numel(g.boxes[r][0])
            skips[i] = g.starts[r] * wire[i].itemsize
            numels[i] = n
        return Packer(srcs, self.layout, read_threads=self.read_threads, names=self.names, facts=facts,
                      pieces=(skips, numels), only=ids)


def slot_entries(entries: list[Entry], geos: list[Geometry]) -> list[Entry]:
    """One virtual 1-D entry per sharded entry: the slot every rank has for it."""
    return [Entry([e.names[0]], e.kind, True, e.dtype, (g.slot_numel,), e.requires_grad, "slot", None)
            for e, g in zip(entries, geos)]


def scatter_fill(target: Callable[[int, int], torch.Tensor], layout: Layout, *, is_src: bool,
                 packers: list | None, src: int, group, device: torch.device, sends,
                 progress: bool | None = None, meanwhile: Callable[[], object] | None = None) -> str | None:
    """Fill bucket k's `target(a, b)` on every rank with its own bytes of [a, b) (one scatter each).

    On src, `packers[i]` writes group rank i's bytes: the other ranks' pieces go into one of two
    reused staging buffers, so packing bucket k+1 overlaps scattering bucket k; on a CPU target
    src's own piece is packed straight into its final storage (which is also its scatter input).
    `meanwhile` (work that needs no values) runs in the time this rank would otherwise spend
    blocked on a scatter (see `fill.Meanwhile`). Returns this rank's own problem or None, like
    `fill.broadcast_fill`, for the caller to agree on.
    """
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    world, me = len(ranks), ranks.index(src)
    biggest = max((b - a for a, b in layout.buckets), default=0)
    cuda = device.type == "cuda"
    stages: list = [None, None]
    pinned: list = [None, None]
    copied: list = [None, None]  # CUDA: the event after the host->device copy out of each pinned buffer
    used: list = [None, None]  # the scatter that last read each staging buffer
    show = _progress(layout.wire_total * world) if is_src and progress is not False else None
    t0 = time.perf_counter()
    later = Meanwhile(meanwhile, sends)
    for k, (a, b) in enumerate(layout.buckets):
        out = target(a, b)
        pieces = None
        if is_src:
            slot = k % 2
            if used[slot] is not None:
                sends.wait(used[slot])
            if copied[slot] is not None:
                copied[slot].synchronize()
            if stages[slot] is None and sends.error is None:
                try:
                    stages[slot] = ops.alloc(world * biggest, device)
                    if cuda:
                        pinned[slot] = ops.alloc(world * biggest, "cpu", pin_memory=True)
                except RuntimeError as e:  # src still scatters (unpacked): every rank raises this after
                    sends.error = staging_problem(world * biggest * (4 if cuda else 2), e)  # 2 slots
            if stages[slot] is None:  # (see above) every rank's piece is `out`, as it is
                pieces, host = [out] * world, None
            else:
                host = pinned[slot] if cuda else stages[slot]
                pieces = [stages[slot][i * biggest:i * biggest + b - a] for i in range(world)]
            if not cuda:
                pieces[me] = out  # gloo copies src's own piece onto itself: the same bytes
            if sends.error is None:
                current = None
                try:
                    current = packers.for_bucket(k) if isinstance(packers, RankPackers) else packers
                    for i, packer in enumerate(current):
                        packer.pack(a, b, out if (i == me and not cuda) else host[i * biggest:i * biggest + b - a])
                    if cuda:
                        stages[slot].copy_(host, non_blocking=True)
                        copied[slot] = torch.cuda.Event()
                        copied[slot].record()
                except Exception as e:  # noqa: BLE001  src keeps sending; every rank raises it after the fill
                    sends.fail(k, e, current[0].describe(a, b) if current else "")
        sent = sends.send(k, out, scatter_list=pieces)
        if is_src:
            used[k % 2] = sent
        if show:
            show(b * world, t0)
    later.finish()
    sends.drain()
    if cuda:
        torch.cuda.current_stream(device).synchronize()
    return sends.error or later.problem()


def zero_padding(views: list[torch.Tensor], entries: list[Entry], geos: list[Geometry], me: int) -> None:
    """FSDP2 pads a shard with zeros: clear each slot's bytes past this rank's local shard."""
    for v, e, g in zip(views, entries, geos):
        n = _numel(g.boxes[me][0])
        if n < g.slot_numel:
            v[n:].zero_()


def _fsdp_params(module: nn.Module, entries: list[Entry]) -> dict[int, object]:
    """id(sharded parameter) -> its FSDPParam, for the DTensor `entries` that FSDP2 manages."""
    want = {id(e.tensor): e.tensor for e in entries}
    out: dict[int, object] = {}
    for state in _fsdp_states(module):
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            one = getattr(state, "_fsdp_param_group", None)
            groups = [one] if one is not None else []
        for g in groups:
            for fp in g.fsdp_params:
                p = fp.sharded_param
                if want.get(id(p)) is p:
                    out[id(p)] = fp
    return out


def _fsdp_states(module: nn.Module) -> list:
    """The composable-API states (FSDP2's among them) that may hold `module`'s parameters.

    torch keeps every such state in one registry, a handful per model (one per `fully_shard` call):
    reading it is ~10x cheaper than visiting every module (2,000 in a 1,400-tensor model); states
    of other models are filtered out by the caller, which keeps only its own parameters."""
    try:
        from torch.distributed._composable_state import _module_state_mapping

        refs = list(_module_state_mapping.values())
    except (ImportError, AttributeError):  # another torch: ask each module, as FSDP2 itself does
        return [m._get_fsdp_state() for m in module.modules()
                # on the class: a missing attribute on an instance costs nn.Module.__getattr__'s raise
                if getattr(type(m), "_get_fsdp_state", None) is not None]
    states = (r() if isinstance(r, weakref.ref) else r for r in refs)
    return [st for st in states if st is not None]


def prepare_shards(module: nn.Module, entries: list[Entry], slots: list[torch.Tensor],
                   local: list[torch.Tensor], out: list, piece: int = 192):
    """A generator appending to `out` the DTensor parameters over the local views (`local`: this
    rank's shard at the start of each slot), and FSDP2's state for each (checked), `piece` at a time
    between yields; made while the bytes arrive: nothing here reads a value or changes the module."""
    from torch.distributed.tensor import DTensor

    fsdp = _fsdp_params(module, entries)
    yield
    make = None  # DTensor's constructor: the full one until the first parameter shows __new__ is enough
    for i, (e, slot, view) in enumerate(zip(entries, slots, local)):
        old = e.tensor
        # The meta DTensor's spec (mesh, placements, global shape and stride) over the local view; a
        # fresh leaf, so marking it a parameter is what nn.Parameter(dt) does, minus its detach.
        rg = e.requires_grad and e.kind == "param"
        if make is None:
            new = DTensor(view, old._spec, requires_grad=rg)
            make = _dtensor_maker(new, view, old._spec, rg)
        else:
            new = make(DTensor, view, old._spec, requires_grad=rg)
        if e.kind == "param":
            new._is_param = True
        for k, val in getattr(old, "__dict__", {}).items():
            new.__dict__.setdefault(k, val)
        fp = fsdp.get(id(old))
        # FSDP2's padded shard: the slot (the largest shard in the group), or a prefix of it where
        # FSDP2 pads within a smaller group (its dp sub-mesh under tensor parallelism)
        if fp is not None and _numel(fp.padded_sharded_param_size) > slot.numel():
            raise RuntimeError(f"fsdp_fastload: FSDP2 pads '{e.names[0]}' to "
                               f"{tuple(fp.padded_sharded_param_size)} but its slot holds {slot.numel()} "
                               "elements; please report this with your torch version.")
        out.append((new, fp))
        if i % piece == piece - 1:
            yield


def _dtensor_maker(made, view, spec, requires_grad: bool):
    """How to make the other DTensors like `made` (made by `DTensor(view, spec, ...)`): DTensor's
    ``__new__`` alone when it gives the same object (in torch 2.13 ``__init__`` only calls the base
    class's, behind dynamo/export wrappers that cost ~4 us a call), else the full constructor."""
    from torch.distributed.tensor import DTensor

    try:  # another torch may spell __new__ differently: then the full constructor, as before
        other = DTensor.__new__(DTensor, view, spec, requires_grad=requires_grad)
        same = (type(other) is type(made) and other.__dict__.keys() == made.__dict__.keys()
                and other._spec is made._spec and other._local_tensor is made._local_tensor
                and other.requires_grad == made.requires_grad and other.shape == made.shape)
    except Exception:  # noqa: BLE001
        same = False
    return DTensor.__new__ if same else (lambda cls, *a, **k: cls(*a, **k))


def install_shards(entries: list[Entry], slots: list[torch.Tensor], prepared: list[tuple]) -> None:
    """Swap in the prepared DTensor parameters; FSDP2 keeps the padded slot as its storage.

    FSDP2's own `reset_sharded_param` (what it runs after `load_state_dict(assign=True)`), given the
    padded slot as its data beforehand, finds the local tensor already in that storage and only
    records the new parameter's spec (unless it must pin memory for CPU offload). That one assignment
    is done here (~6 us a call saved, per parameter, on every rank) once FSDP2's own reset of a first
    parameter is seen to change nothing else; after any difference every parameter goes through
    FSDP2's reset, and so does every parameter whose group offloads to pinned memory.
    """
    fast = None  # unknown until a first (unpinned) FSDPParam is reset by FSDP2 itself
    for e, slot, (new, fp) in zip(entries, slots, prepared):
        for mod, attr in e.owners:
            owner_table(mod, attr, e.kind)[attr] = new
        if fp is None:
            continue
        padded = _numel(fp.padded_sharded_param_size)
        if padded != slot.numel():
            slot = slot[:padded]
        fp._sharded_param_data = slot  # the padded shard (1-D): same storage, so no re-pad copy
        fp.sharded_param = new
        pinned = getattr(fp, "pin_memory", True)  # per fully_shard group: offload policies may differ
        if fast and not pinned:
            fp._sharding_spec = new._spec
        elif fast is None and not pinned and slot.numel():  # (an empty slot has no address: FSDP2's
            fast = _reset_is_spec_only(fp, new, slot)  # reset re-pads it, as it does its own empty ones)
        else:
            fp.reset_sharded_param()


def _reset_is_spec_only(fp, new, slot) -> bool:
    """Run FSDP2's reset on `fp` (its parameter and padded data already ours); whether all it did
    was record `new`'s spec, so that the same assignment can stand in for it on the others."""
    before, local = dict(fp.__dict__), new._local_tensor
    fp.reset_sharded_param()
    after = fp.__dict__
    if (before.keys() != after.keys() or new._local_tensor is not local
            or after.get("_sharding_spec") is not new._spec or after.get("_sharded_param_data") is not slot):
        return False
    return all(after[k] is v for k, v in before.items() if k != "_sharding_spec")


def _piece(source) -> torch.Tensor:
    """The values of one per-rank source (see `local_sources`) as a tensor."""
    from .fill import read_file_tensor

    if isinstance(source, FileTensor):
        return read_file_tensor(source)
    if isinstance(source, _LazySlice):
        return source()
    return source


def verify_shards(entries: list[Entry], slots: list[torch.Tensor], geos: list[Geometry], per_rank: list | None,
                  *, group, src: int, rank: int, comm_device: torch.device) -> None:
    """`verify=True` for shards: every rank's local shard checksum against what src computes from its
    source for that rank (src reads each piece once more); every rank raises naming any mismatch."""
    from .agree import MaterializeError
    from .verify import checksum

    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    me = ranks.index(rank)
    mine = torch.tensor([checksum(s[:_numel(g.boxes[me][0])]) for s, g in zip(slots, geos)], dtype=torch.int64,
                        device=comm_device)
    gathered = [torch.empty_like(mine) for _ in ranks]
    dist.all_gather(gathered, mine, group=group)
    bad: list = []
    if rank == src:
        for i, e in enumerate(entries):
            if per_rank[i] is None:  # recomputed on every rank, not sent
                continue
            for r_i, r in enumerate(ranks):
                # (on the slots' device: `checksum` sums on a GPU and CRCs on the host)
                want = checksum(_piece(per_rank[i][r_i]).to(slots[i].device, e.dtype).contiguous())
                if int(gathered[r_i][i]) != want:
                    bad.append(f"'{e.names[0]}' shard on rank {r}")
    box = [bad]
    dist.broadcast_object_list(box, src=src, group=group)
    if box[0]:
        raise MaterializeError(
            f"fsdp_fastload.materialize verify failed on all ranks (this is rank {rank}): {len(box[0])} "
            f"local shard(s) differ from what rank {src}'s source holds: {', '.join(box[0][:10])}"
            f"{' ...' if len(box[0]) > 10 else ''}. The scatter delivered different bytes; check the "
            "network/NCCL setup and report this as a bug.")

"""Stage 1, manifest: every unique tensor of a module (ties deduped by identity) with all its names.

The manifest is computed on every rank from its own module; its fingerprint is compared across
ranks before any data moves (see `agree.py`), and on mismatch `first_difference` spells out where.
"""
from __future__ import annotations

import array
import hashlib

import torch
from torch import nn

from .ops import contiguous_strides


class Entry:
    """One unique tensor: its names (the first is canonical), what it is, and where it lives.

    `kind` is "param" or "buffer"; `persistent` says whether it is in `state_dict()` (always True for
    parameters); `cls` is the Python class name (Parameter, Tensor, or an unsupported subclass);
    `tensor` is this rank's tensor (meta on receivers); `owners` are the (module, attribute) pairs
    that hold it.
    """

    __slots__ = ("names", "kind", "persistent", "dtype", "shape", "requires_grad", "cls", "tensor",
                 "owners", "numel", "nbytes", "placement", "strides")

    def __init__(self, names: list[str], kind: str, persistent: bool, dtype: torch.dtype,
                 shape: tuple[int, ...], requires_grad: bool, cls: str, tensor: torch.Tensor | None,
                 owners: list[tuple[nn.Module, str]] | None = None, numel: int | None = None):
        self.names, self.kind, self.persistent, self.dtype = names, kind, persistent, dtype
        self.shape, self.requires_grad, self.cls, self.tensor = shape, requires_grad, cls, tensor
        self.owners = [] if owners is None else owners
        # DTensor: (placements, mesh shape, mesh ranks), which must agree too; `shape` is global.
        self.placement = None
        # a dense tensor laid out in another order (channels_last, a transposed parameter): its strides,
        # which every rank's result keeps, as load_state_dict's in-place copy does; None: contiguous
        self.strides: tuple[int, ...] | None = None
        if numel is None:
            numel = 1
            for d in shape:
                numel *= d
        self.numel = numel
        self.nbytes = numel * dtype.itemsize

    def __repr__(self) -> str:
        return f"Entry({self.names}, {self.kind}, {self.dtype}, {list(self.shape)})"

    def carve_strides(self) -> tuple[int, ...] | list[int]:
        """The strides this tensor is made with on every rank: its skeleton's order, else contiguous."""
        return self.strides or contiguous_strides(self.shape)

    def describe(self) -> tuple:
        """What must agree across ranks (no local state: device, values, storage). Not
        `requires_grad`: every rank takes src's (it ships with the layout), since a model loaded by
        `from_pretrained` and the same architecture built on meta may differ in it (transformers 5
        drops `requires_grad=False` on load, e.g. Whisper's sinusoidal positions)."""
        return (tuple(self.names), self.kind, self.persistent, str(self.dtype), self.shape,
                self.cls, self.placement, self.strides)


def owner_table(mod: nn.Module, attr: str, kind: str) -> dict:
    """The dict of `mod` that holds `attr` for an entry of `kind`: a parameter's owners hold it in
    `_parameters`, except a module that registered that same tensor as a buffer."""
    if kind == "param":
        params = mod._parameters
        return params if attr in params else mod._buffers
    return mod._buffers


def mesh_grid(mesh, cache: dict) -> tuple[tuple[int, ...], list[int]]:
    """(shape, ranks in row-major order) of a DeviceMesh; `mesh.mesh` is rebuilt on every access in
    recent torch (~150 us), so it is read once per mesh and call."""
    got = cache.get(id(mesh))
    if got is None or got[0] is not mesh:
        grid = mesh.mesh
        got = cache[id(mesh)] = (mesh, tuple(grid.shape), grid.flatten().tolist())
    return got[1], got[2]


_NO_EXTRA_STATE = nn.Module.get_extra_state


def build_manifest(module: nn.Module, extra_state: list | None = None) -> list[Entry]:
    """Walk `module` once: parameters and buffers in registration order, ties folded into one entry.

    A module reached twice (a shared submodule) adds names to the entries of its tensors, not owners.
    `extra_state`, if given, collects (path, module) of the modules with extra state (a class that
    overrides `get_extra_state`: its state_dict has a `_extra_state` entry).
    A tensor that is a parameter anywhere is a parameter (and persistent); a buffer is persistent if
    any of its names is.
    """
    by_id: dict[int, Entry] = {}
    entries: list[Entry] = []
    seen: set[int] = set()
    meshes: dict = {}
    places: dict = {}
    get, add = by_id.get, entries.append

    # Depth first with an explicit stack, in registration order. (Not a recursive closure: the
    # closure would reference itself, a cycle holding every Entry, and src's old tensors, until the
    # garbage collector ran: ~0.1 s per 100k tensors, and memory held after the call.) Parameters and
    # buffers in loops of their own, names bound locally: this walk runs on every rank, ~2 us a tensor.
    stack: list[tuple[nn.Module, str]] = [(module, "")]
    pop, push = stack.pop, stack.extend
    while stack:
        mod, dot = pop()
        if extra_state is not None and type(mod).get_extra_state is not _NO_EXTRA_STATE:
            if not any(m is mod for _, m in extra_state):
                extra_state.append((dot[:-1], mod))
        params, buffers = mod._parameters, mod._buffers
        if params or buffers:
            first = id(mod) not in seen
            seen.add(id(mod))
            for attr, t in params.items():
                if t is None:
                    continue
                e = get(id(t))
                if e is None:
                    e = by_id[id(t)] = Entry([dot + attr], "param", True, t.dtype, tuple(t.shape), t.requires_grad,
                                             type(t).__name__, t, [(mod, attr)], t.numel())
                    add(e)
                    if e.cls == "DTensor":
                        e.placement = _placement(t, meshes, places)
                    elif not t.is_contiguous():
                        e.strides = dense_strides(t)
                    continue
                # a tie: the same tensor object under another name
                e.kind, e.persistent = "param", True
                e.names.append(dot + attr)
                if first:
                    e.owners.append((mod, attr))
            if buffers:
                non_persistent = mod._non_persistent_buffers_set
                for attr, t in buffers.items():
                    if t is None:
                        continue
                    e = get(id(t))
                    if e is None:
                        e = by_id[id(t)] = Entry([dot + attr], "buffer", attr not in non_persistent, t.dtype,
                                                 tuple(t.shape), t.requires_grad, type(t).__name__, t,
                                                 [(mod, attr)], t.numel())
                        add(e)
                        if e.cls == "DTensor":
                            e.placement = _placement(t, meshes, places)
                        elif not t.is_contiguous():
                            e.strides = dense_strides(t)
                        continue
                    if attr not in non_persistent:
                        e.persistent = True
                    e.names.append(dot + attr)
                    if first:
                        e.owners.append((mod, attr))
        children = mod._modules
        if children:
            push([(child, f"{dot}{name}.") for name, child in reversed(children.items()) if child is not None])
    return entries


def dense_strides(t: torch.Tensor) -> tuple[int, ...] | None:
    """`t`'s strides if it is dense and non-overlapping in some order of its dimensions (exactly
    `numel` elements, e.g. channels_last or transposed), else None: an expanded or overlapping
    tensor is materialized contiguous, as its values cannot be written in place anyway.

    Example::

        >>> dense_strides(torch.empty(3, 4).t()), dense_strides(torch.empty(3, 1).expand(3, 4))
        ((1, 4), None)
    """
    dims = sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1)
    expected = 1
    for st, n in dims:
        if st != expected:
            return None
        expected *= n
    return tuple(t.stride())


def _placement(t, meshes: dict, places: dict) -> tuple:
    """A DTensor's (placements spelled out, mesh shape, mesh ranks), plus for a sub-mesh (see
    `sub_frame`) the root dimensions each of its dimensions spans and the root's shape: the same on
    every rank. A model's DTensors share a handful of (placements, mesh) pairs: each is spelled out
    once per call, and its entries share the one tuple (~0.7 us a DTensor otherwise)."""
    pls, mesh = t.placements, t.device_mesh
    got = places.get((id(pls), id(mesh)))
    if got is None or got[0] is not pls or got[1] is not mesh:
        frame = sub_frame(mesh, meshes)
        if frame is None:
            shape, ranks = mesh_grid(mesh, meshes)
            spelled = (tuple(str(p) for p in pls), shape, tuple(ranks))
        else:
            shape, spans, root_shape, root_ranks, _ = frame
            spelled = (tuple(str(p) for p in pls), shape, tuple(root_ranks), spans, root_shape)
        got = places[(id(pls), id(mesh))] = (pls, mesh, spelled)
    return got[2]


def grid_coord(i: int, shape: tuple) -> tuple:
    """The coordinate of the i-th rank (row-major) of a mesh of `shape`."""
    out = []
    for n in reversed(shape):
        out.append(i % n)
        i //= n
    return tuple(reversed(out))


def sub_frame(mesh, cache: dict) -> tuple | None:
    """Where a sub-mesh sits in its root mesh, for every rank of the root, or None (a mesh that is
    its own root, covers all of the root's ranks, or is not a regular slice of it).

    A parameter that FSDP2 alone shards on the `dp` part of a (dp, tp) mesh lives on a 1-D mesh of
    the ranks of its own tp coordinate ([0, 2] on some ranks, [1, 3] on others; torchtitan flattens
    it under another name). Each rank knows only its own sub-mesh; every rank's place in its copy
    of that sub-mesh follows from the root: each sub-mesh dimension spans some root dimensions (one,
    or several flattened), found from this rank's sub-mesh and checked against all of it. Returns
    (sub-mesh shape, root dimensions per sub-mesh dimension, root shape, root ranks, rank -> its
    coordinate in its own copy of the sub-mesh)."""
    key = ("frame", id(mesh))
    if key in cache and cache[key][0] is mesh:
        return cache[key][1]
    got = _sub_frame(mesh, cache)
    cache[key] = (mesh, got)
    return got


def _sub_frame(mesh, cache: dict) -> tuple | None:
    get_root = getattr(mesh, "_get_root_mesh", None)
    root = get_root() if get_root is not None else None
    if root is None or root is mesh:
        return None
    shape, ranks = mesh_grid(mesh, cache)
    root_shape, root_ranks = mesh_grid(root, cache)
    if set(ranks) >= set(root_ranks) or not set(ranks) <= set(root_ranks):
        return None

    root_coord = {r: grid_coord(i, root_shape) for i, r in enumerate(root_ranks)}
    own = [grid_coord(i, shape) for i in range(len(ranks))]  # each sub-mesh rank's coordinate in it
    at = {c: r for c, r in zip(own, ranks)}
    spans = []
    for j, n in enumerate(shape):  # the root dimensions that change along sub-mesh dimension j
        line = [root_coord[at[tuple(k if d == j else 0 for d in range(len(shape)))]] for k in range(n)]
        spans.append(tuple(d for d in range(len(root_shape)) if len({c[d] for c in line}) > 1))
    used = [d for sp in spans for d in sp]
    if len(used) != len(set(used)):
        return None
    spans = tuple(spans)

    def place(r: int) -> tuple:
        c, out = root_coord[r], []
        for sp in spans:
            k = 0
            for d in sp:
                k = k * root_shape[d] + c[d]
            out.append(k)
        return tuple(out)

    me = root_coord[ranks[0]]
    rest = [d for d in range(len(root_shape)) if d not in used]
    for j, sp in enumerate(spans):
        size = 1
        for d in sp:
            size *= root_shape[d]
        if size != shape[j]:
            return None
    # every rank of this sub-mesh where `place` puts it, and the sub-mesh all the root's ranks that
    # share its coordinates outside the spanned dimensions: a regular slice (flattened or not)
    if any(place(r) != c or any(root_coord[r][d] != me[d] for d in rest) for r, c in zip(ranks, own)):
        return None
    if len(ranks) != sum(1 for r in root_ranks if all(root_coord[r][d] == me[d] for d in rest)):
        return None
    return shape, spans, root_shape, root_ranks, {r: place(r) for r in root_ranks}


def aliased(entries: list[Entry]) -> list[tuple[str, str]]:
    """Pairs of names of *distinct* tensors whose memory overlaps: one a view of the other (a buffer
    registered as `weight.detach().t()`), or both made from one tensor (`nn.Parameter(w.data)`). Not
    ties (one object under several names, which the manifest folds into one entry) but aliases, which
    materialize does not keep: every entry gets memory of its own. Plain tensors only (meta ones too:
    a view of a meta tensor shares its storage; dense ones: a sparse tensor has no storage). One
    storage id per tensor (~0.15 us): the spans are compared only where two entries share a storage."""
    storage_id = getattr(torch._C, "_storage_id", None) or (lambda t: t.untyped_storage()._cdata)
    plain, strided = _CLS, torch.strided  # (a sparse tensor has no storage to ask about)
    ids = [storage_id(e.tensor) if e.cls in plain and e.numel and e.tensor.layout is strided else None
           for e in entries]
    seen: dict = {}
    shared = set()
    for i, sid in enumerate(ids):
        if sid is not None and seen.setdefault(sid, i) != i:
            shared.add(sid)
    if not shared:
        return []
    spans: dict = {}
    for i, (e, sid) in enumerate(zip(entries, ids)):
        if sid in shared:
            t, size = e.tensor, e.tensor.element_size()
            start = t.storage_offset() * size
            end = start + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * size
            spans.setdefault(sid, []).append((start, end, i))
    pairs = []
    for group in spans.values():
        group.sort()
        reach, owner = -1, -1
        for start, end, i in group:
            if start < reach:
                pairs.append(tuple(sorted((owner, i))))
            if end > reach:
                reach, owner = end, i
    return [(entries[a].names[0], entries[b].names[0]) for a, b in sorted(pairs)]  # in the model's order


def summary(entries: list[Entry]) -> list[tuple]:
    """What must agree across ranks, one tuple per entry (see `Entry.describe`)."""
    return [e.describe() for e in entries]


_CLS = {"Parameter": 0, "Tensor": 1}


def fingerprint(entries: list[Entry], extra: tuple = ()) -> int:
    """A 63-bit hash of everything `summary` holds, and `extra` call arguments.

    Built from bytes, not from `summary`'s tuples (whose repr costs ~1 us per tensor): the names
    joined, the numeric fields as one int64 array, and the rare fields (other classes, DTensor
    placements) as text.
    """
    from .ops import DTYPE_CODE

    h = hashlib.blake2b(repr(extra).encode(), digest_size=8)
    h.update("\x00".join([n for e in entries for n in e.names]).encode())
    cls, codes = _CLS, DTYPE_CODE
    flat: list = []
    put = flat.extend  # (a plain loop: a generator of *-unpacked tuples was twice as slow)
    for e in entries:
        put((e.kind == "param", e.persistent, codes.get(e.dtype, -1), cls.get(e.cls, 2), len(e.names), len(e.shape)))
        put(e.shape)
    h.update(array.array("q", flat).tobytes())
    # other classes by name; DTensor placements as codes into the table of distinct ones (a model's
    # placements repeat: spelling each out cost ~1.5 us per DTensor)
    rare = [(i, e.cls) for i, e in enumerate(entries) if e.cls not in cls]
    rare += [(i, e.strides) for i, e in enumerate(entries) if e.strides is not None]
    table: dict = {}
    places = [table.setdefault(e.placement, len(table)) if e.placement else -1 for e in entries]
    h.update(array.array("q", places).tobytes())
    h.update(repr((rare, list(table))).encode())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


_FIELDS = ("kind", "persistent", "dtype", "shape", "class", "placement", "strides")


def first_difference(ref: list[tuple], ref_rank: int, other: list[tuple], other_rank: int) -> str:
    """A sentence naming the first tensor whose description differs between two ranks."""
    ref_by_name = {n: d for d in ref for n in d[0]}
    other_by_name = {n: d for d in other for n in d[0]}
    for d in ref:
        for name in d[0]:
            o = other_by_name.get(name)
            if o is None:
                return (f"'{name}' exists on rank {ref_rank} but not on rank {other_rank} "
                        f"(an extra layer, or a tensor registered on one rank only)")
            for i, fname in enumerate(_FIELDS, start=1):
                if d[i] != o[i]:
                    if fname == "persistent":
                        a, b = ("persistent" if v else "non-persistent" for v in (d[i], o[i]))
                        return (f"buffer '{name}' is {a} on rank {ref_rank} but {b} on rank "
                                f"{other_rank}")
                    if fname == "strides":  # None: contiguous
                        a, b = (f"strides {v}" if v else "contiguous layout" for v in (d[i], o[i]))
                        return (f"'{name}' has {a} on rank {ref_rank} but {b} on rank {other_rank} (a memory "
                                "format, e.g. channels_last, set on some ranks only)")
                    return f"'{name}' has {fname} {d[i]} on rank {ref_rank} but {o[i]} on rank {other_rank}"
            if set(d[0]) != set(o[0]):
                return (f"'{name}' is tied to {sorted(set(d[0]) - {name}) or 'nothing'} on rank {ref_rank} "
                        f"but to {sorted(set(o[0]) - {name}) or 'nothing'} on rank {other_rank} (a model "
                        "built under accelerate's init_empty_weights() loses its ties until model.tie_weights() "
                        "is called; transformers' from_pretrained unties them when its checkpoint holds "
                        "different values under both names: then build the other ranks' models untied too, "
                        "e.g. config.tie_word_embeddings=False)")
    for d in other:
        for name in d[0]:
            if name not in ref_by_name:
                return (f"'{name}' exists on rank {other_rank} but not on rank {ref_rank} "
                        f"(an extra layer, or a tensor registered on one rank only)")
    if ref != other:  # same names and fields, different order
        return f"tensors are registered in a different order on rank {ref_rank} and rank {other_rank}"
    return "no difference found"

"""Stage 6, buffers: non-persistent buffers nobody sent are recomputed locally, touching nothing loaded.

Initializers run on the modules that own such buffers; while they run, every tensor of those modules
and their children is swapped out for a `meta` placeholder, so an initializer that resets a whole
module (transformers' `_init_weights` on an embedding that owns a scale buffer) writes into nothing;
only the fresh, poisoned buffer storage is real (loaded values are in views not installed yet). Sources, in order, per owning module: transformers `PreTrainedModel._init_weights`; the
module's own `reset_parameters` / `init_weights`; the user's `buffer_init(module)`. A buffer that no
source wrote is an error naming it, never garbage. The model is restored as it was afterwards.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable

import torch
from torch import nn

from .fill import byte_view
from .manifest import Entry, owner_table

POISON = 0xFF


def _placeholder(e: Entry) -> torch.Tensor:
    t = torch.empty(e.shape, dtype=e.dtype, device="meta")
    return nn.Parameter(t, requires_grad=e.requires_grad) if e.kind == "param" else t


def _written(view: torch.Tensor, version: int) -> bool:
    if view.numel() == 0 or view._version != version:
        return True
    return not bool((byte_view(view) == POISON).all())


def _hf_owners(root: nn.Module, names: list[str]) -> dict[int, nn.Module]:
    """id(module) -> the innermost transformers PreTrainedModel containing it, for every module on the
    paths to the tensors `names` (dotted state_dict names, in the manifest's depth-first order, so a
    module reached by several paths takes its first, as a walk of the whole tree would: that walk
    cost ~3 ms on a 2,000-module model for the one or two buffers that need it). Empty without
    transformers."""
    tf = sys.modules.get("transformers")
    owners: dict[int, nn.Module] = {}
    if tf is None:
        return owners
    for name in names:
        mod, owner = root, None
        for part in name.split(".")[:-1] + [None]:
            if isinstance(mod, tf.PreTrainedModel):
                owner = mod
            if owner is not None:
                owners.setdefault(id(mod), owner)
            if part is None:
                break
            mod = mod._modules.get(part)
            if mod is None:
                break
    return owners


def _hf_init(hf: nn.Module, mod: nn.Module) -> Callable[[], None]:
    def run_hf():
        guard = getattr(sys.modules.get("transformers.initialization"), "guard_torch_init_functions", None)
        if guard is not None:
            with guard():
                hf._init_weights(mod)
        else:
            hf._init_weights(mod)
    return run_hf


def _sources(hf: nn.Module | None, mod: nn.Module, buffer_init: Callable | None):
    if hf is not None and hasattr(hf, "_init_weights"):
        yield f"{type(hf).__name__}._init_weights({type(mod).__name__})", _hf_init(hf, mod)
    for hook in ("reset_parameters", "init_weights"):
        fn = getattr(mod, hook, None)
        if callable(fn):
            yield f"{type(mod).__name__}.{hook}()", fn
    if buffer_init is not None:
        yield "buffer_init(module)", lambda: buffer_init(mod)


def recompute(root: nn.Module, entries: list[Entry], views: list[torch.Tensor], local: list[int],
              buffer_init: Callable | None) -> str | None:
    """Fill `views[i]` for i in `local` by running initializers; None or an error text. Restores the model.

    First each owning module's own initializers (see `_sources`); then, for what is still unwritten,
    transformers' `_init_weights` on the owner's ancestors, innermost first (FalconH1 sets every
    mixer's `mup_vector` from `_init_weights(FalconH1Model)`)."""
    by_module: dict[int, tuple[nn.Module, list[int]]] = {}
    for i in local:
        for mod, _ in entries[i].owners:
            by_module.setdefault(id(mod), (mod, []))[1].append(i)
    versions = {i: views[i]._version for i in local}
    tried: dict[int, list[str]] = {}
    done: set[int] = set()
    try:
        hf_owners = _hf_owners(root, [n for i in local for n in entries[i].names])
        with _swapped(entries, views, local, [mod for mod, _ in by_module.values()]):
            for mod, ids in by_module.values():
                for what, fn in _sources(hf_owners.get(id(mod)), mod, buffer_init):
                    if all(i in done for i in ids):
                        break
                    _run(fn, what, entries, views, ids, versions, tried, done)
        left = [i for i in local if i not in done]
        if left:
            for anc, ids in _ancestors(root, entries, left):
                hf = hf_owners.get(id(anc))
                ids = [i for i in ids if i not in done]
                if not ids or hf is None or not hasattr(hf, "_init_weights"):
                    continue
                with _swapped(entries, views, local, [anc]):
                    _run(_hf_init(hf, anc), f"{type(hf).__name__}._init_weights({type(anc).__name__})",
                         entries, views, ids, versions, tried, done)
    except Exception as ex:
        return f"recomputing non-persistent buffers failed: {type(ex).__name__}: {ex}"
    missing = [i for i in local if i not in done]
    if missing:
        desc = [f"'{entries[i].names[0]}' ({entries[i].dtype}, {list(entries[i].shape)}; tried: "
                f"{', '.join(tried.get(i, [])) or 'nothing'})" for i in missing[:5]]
        what = ("non-persistent buffer(s)" if all(entries[i].kind == "buffer" for i in missing) else
                "tensor(s) absent from the checkpoint (non-persistent buffers, parameters it leaves out)")
        return (f"{len(missing)} {what} were neither sent by src nor written by any "
                f"initializer: {'; '.join(desc)}. Pass buffer_init=fn(module) that sets them, include "
                "them in state_dict, or let src hold their values (materialize the src model).")
    return None


def _run(fn, what: str, entries, views, ids, versions, tried, done) -> None:
    for i in ids:
        tried.setdefault(i, []).append(what)
    with torch.no_grad():
        fn()
    _absorb(entries, views, ids)
    done.update(i for i in ids if _written(views[i], versions[i]))


@contextlib.contextmanager
def _swapped(entries: list[Entry], views: list[torch.Tensor], local: list[int], roots: list[nn.Module]):
    """While inside, every tensor of `roots` and their children is swapped out: the `local` ones for
    their fresh views, every other one (loaded values, or src's own tensors) for a `meta` placeholder,
    so initializers (which may recurse into children) write only into the fresh views. Restored after."""
    reach = {id(m) for r in roots for m in r.modules()}
    touched = []
    for i, e in enumerate(entries):  # (a plain loop: a generator per entry cost ~1 us each)
        for mod, _ in e.owners:
            if id(mod) in reach:
                touched.append(i)
                break
    saved = [(table, attr, table[attr]) for i in touched for mod, attr in entries[i].owners
             for table in (owner_table(mod, attr, entries[i].kind),)]
    local_set = set(local)
    try:
        for i in touched:
            e = entries[i]
            t = views[i] if i in local_set else _placeholder(e)
            for mod, attr in e.owners:
                owner_table(mod, attr, e.kind)[attr] = t
        yield
    finally:
        for table, attr, t in saved:
            table[attr] = t


def _ancestors(root: nn.Module, entries: list[Entry], ids: list[int]) -> list[tuple[nn.Module, list[int]]]:
    """(ancestor module, the entries `ids` below it) for every module strictly above the entries'
    owners on the path of their first name, innermost first."""
    found: dict[int, tuple[int, nn.Module, list[int]]] = {}
    for i in ids:
        path, mod = [root], root
        for part in entries[i].names[0].split(".")[:-1]:
            mod = mod._modules.get(part)
            if mod is None:
                break
            path.append(mod)
        for depth, anc in enumerate(path[:-1]):
            found.setdefault(id(anc), (depth, anc, []))[2].append(i)
    return [(anc, ids) for _, anc, ids in sorted(found.values(), key=lambda x: -x[0])]


def _absorb(entries: list[Entry], views: list[torch.Tensor], ids: list[int]) -> None:
    """An initializer that assigned a new tensor (`self.buf = f(...)`) instead of writing in place."""
    for i in ids:
        e = entries[i]
        for mod, attr in e.owners:
            cur = mod._buffers.get(attr)
            if cur is not None and cur is not views[i]:
                if tuple(cur.shape) != e.shape:
                    raise ValueError(f"initializer set buffer '{e.names[0]}' to shape {tuple(cur.shape)}, "
                                     f"expected {e.shape}")
                views[i].copy_(cur)
                mod._buffers[attr] = views[i]

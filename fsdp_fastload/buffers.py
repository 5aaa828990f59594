"""Stage 6, buffers: non-persistent buffers nobody sent are recomputed locally, touching nothing loaded.

Initializers run on the modules that own such buffers; while they run, every tensor of those modules
and their children is swapped out for a `meta` placeholder, so an initializer that resets a whole
module (transformers' `_init_weights` on an embedding that owns a scale buffer) writes into nothing;
only the fresh, poisoned buffer storage is real (loaded values are in views not installed yet). Sources, in order, per owning module: transformers `PreTrainedModel._init_weights`; the
module's own `reset_parameters` / `init_weights`; the user's `buffer_init(module)`. A buffer that no
source wrote is an error naming it, never garbage. The model is restored as it was afterwards.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn

from .fill import byte_view
from .manifest import Entry

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


def _sources(hf: nn.Module | None, mod: nn.Module, buffer_init: Callable | None):
    if hf is not None and hasattr(hf, "_init_weights"):
        def run_hf():
            guard = getattr(sys.modules.get("transformers.initialization"), "guard_torch_init_functions", None)
            if guard is not None:
                with guard():
                    hf._init_weights(mod)
            else:
                hf._init_weights(mod)
        yield f"{type(hf).__name__}._init_weights", run_hf
    for hook in ("reset_parameters", "init_weights"):
        fn = getattr(mod, hook, None)
        if callable(fn):
            yield f"{type(mod).__name__}.{hook}()", fn
    if buffer_init is not None:
        yield "buffer_init(module)", lambda: buffer_init(mod)


def recompute(root: nn.Module, entries: list[Entry], views: list[torch.Tensor], local: list[int],
              buffer_init: Callable | None) -> str | None:
    """Fill `views[i]` for i in `local` by running initializers; None or an error text. Restores the model."""
    by_module: dict[int, tuple[nn.Module, list[int]]] = {}
    for i in local:
        for mod, _ in entries[i].owners:
            by_module.setdefault(id(mod), (mod, []))[1].append(i)
    # Initializers run on these modules (and may recurse into their children): every tensor there is
    # swapped out, so they write only into the fresh buffer views.
    reach = {id(m) for mod, _ in by_module.values() for m in mod.modules()}
    touched = []
    for i, e in enumerate(entries):  # (a plain loop: a generator per entry cost ~1 us each)
        for mod, _ in e.owners:
            if id(mod) in reach:
                touched.append(i)
                break
    saved = [(mod, attr, entries[i].kind,
              (mod._parameters if entries[i].kind == "param" else mod._buffers)[attr])
             for i in touched for mod, attr in entries[i].owners]
    local_set = set(local)
    try:
        with torch.no_grad():
            for i in touched:
                e = entries[i]
                t = views[i] if i in local_set else _placeholder(e)
                for mod, attr in e.owners:
                    (mod._parameters if e.kind == "param" else mod._buffers)[attr] = t
            versions = {i: views[i]._version for i in local}
            tried: dict[int, list[str]] = {}
            hf_owners = _hf_owners(root, [n for i in local for n in entries[i].names])
            done: set[int] = set()
            for mod, ids in by_module.values():
                for what, fn in _sources(hf_owners.get(id(mod)), mod, buffer_init):
                    if all(i in done for i in ids):
                        break
                    for i in ids:
                        tried.setdefault(i, []).append(what)
                    fn()
                    _absorb(entries, views, ids)
                    done.update(i for i in ids if _written(views[i], versions[i]))
    except Exception as ex:
        return f"recomputing non-persistent buffers failed: {type(ex).__name__}: {ex}"
    finally:
        for mod, attr, kind, t in saved:
            (mod._parameters if kind == "param" else mod._buffers)[attr] = t
    missing = [i for i in local if i not in done]
    if missing:
        desc = [f"'{entries[i].names[0]}' ({entries[i].dtype}, {list(entries[i].shape)}; tried: "
                f"{', '.join(tried.get(i, [])) or 'nothing'})" for i in missing[:5]]
        return (f"{len(missing)} non-persistent buffer(s) were neither sent by src nor written by any "
                f"initializer: {'; '.join(desc)}. Pass buffer_init=fn(module) that sets them, include "
                "them in state_dict, or let src hold their values (materialize the src model).")
    return None


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

"""Stage 1, manifest: every unique tensor of a module (ties deduped by identity) with all its names.

The manifest is computed on every rank from its own module; its fingerprint is compared across
ranks before any data moves (see `agree.py`), and on mismatch `first_difference` spells out where.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Entry:
    """One unique tensor: its names (the first is canonical), what it is, and where it lives."""

    names: list[str]
    kind: str  # "param" or "buffer"
    persistent: bool  # in state_dict(); always True for parameters
    dtype: torch.dtype
    shape: tuple[int, ...]
    requires_grad: bool
    cls: str  # the Python class (Parameter, Tensor, or an unsupported subclass)
    tensor: torch.Tensor = field(repr=False)  # this rank's tensor (meta on receivers)
    owners: list[tuple[nn.Module, str]] = field(repr=False, default_factory=list)

    def __post_init__(self):
        n = 1
        for s in self.shape:
            n *= s
        self.numel = n
        self.nbytes = n * self.dtype.itemsize

    def describe(self) -> tuple:
        """What must agree across ranks (no local state: device, values, storage)."""
        return (tuple(self.names), self.kind, self.persistent, str(self.dtype), self.shape,
                self.requires_grad, self.cls)


def build_manifest(module: nn.Module) -> list[Entry]:
    """Walk `module` once: parameters and buffers in registration order, ties folded into one entry."""
    by_id: dict[int, Entry] = {}
    entries: list[Entry] = []
    seen_owner: set[tuple[int, str]] = set()
    for prefix, mod in module.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        non_persistent = getattr(mod, "_non_persistent_buffers_set", set())
        for kind, table in (("param", mod._parameters), ("buffer", mod._buffers)):
            for attr, t in table.items():
                if t is None:
                    continue
                e = by_id.get(id(t))
                if e is None:
                    persistent = kind == "param" or attr not in non_persistent
                    e = Entry(names=[], kind=kind, persistent=persistent, dtype=t.dtype,
                              shape=tuple(t.shape), requires_grad=bool(t.requires_grad),
                              cls=type(t).__name__, tensor=t)
                    by_id[id(t)] = e
                    entries.append(e)
                else:  # a tie: the same tensor object under another name
                    if kind == "param":
                        e.kind = "param"
                    if kind == "buffer" and attr not in non_persistent:
                        e.persistent = True
                e.names.append(dot + attr)
                if (id(mod), attr) not in seen_owner:
                    seen_owner.add((id(mod), attr))
                    e.owners.append((mod, attr))
    return entries


def fingerprint(entries: list[Entry], extra: tuple = ()) -> int:
    """A 63-bit hash of what must agree across ranks (the manifest, and `extra` call arguments)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr(extra).encode())
    for e in entries:
        h.update(repr(e.describe()).encode())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def summary(entries: list[Entry]) -> list[tuple]:
    return [e.describe() for e in entries]


_FIELDS = ("kind", "persistent", "dtype", "shape", "requires_grad", "class")


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
                    return f"'{name}' has {fname} {d[i]} on rank {ref_rank} but {o[i]} on rank {other_rank}"
            if set(d[0]) != set(o[0]):
                return (f"'{name}' is tied to {sorted(set(d[0]) - {name}) or 'nothing'} on rank {ref_rank} "
                        f"but to {sorted(set(o[0]) - {name}) or 'nothing'} on rank {other_rank}")
    for d in other:
        for name in d[0]:
            if name not in ref_by_name:
                return (f"'{name}' exists on rank {other_rank} but not on rank {ref_rank} "
                        f"(an extra layer, or a tensor registered on one rank only)")
    if ref != other:  # same names and fields, different order
        return f"tensors are registered in a different order on rank {ref_rank} and rank {other_rank}"
    return "no difference found"

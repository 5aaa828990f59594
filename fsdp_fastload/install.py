"""Stage 5, install: swap the carved views into the modules; every owner of a tie gets one object."""
from __future__ import annotations

import torch
from torch import nn

from .manifest import Entry, owner_table


def prepare(entries: list[Entry], views: list[torch.Tensor]) -> list[torch.Tensor]:
    """The objects to install: `nn.Parameter`s over the views of parameters (same `requires_grad`,
    and the attributes libraries hang on parameters, e.g. transformers' `_is_hf_initialized`), the
    views themselves for buffers. Values are not read: this can run while the bytes still arrive."""
    make, param = torch.Tensor._make_subclass, nn.Parameter  # what nn.Parameter(view) does, minus a frame
    out = []
    for e, v in zip(entries, views):
        if e.kind == "param":
            new = make(param, v, e.requires_grad)
            old = getattr(e.tensor, "__dict__", None)
            if old:
                for k, val in old.items():
                    new.__dict__.setdefault(k, val)
            out.append(new)
        else:  # a buffer (requires_grad as on src: a float buffer may require it)
            out.append(v.requires_grad_() if e.requires_grad else v)
    return out


def commit(entries: list[Entry], new: list[torch.Tensor]) -> None:
    """Swap the prepared objects into their modules; every owner of a tie gets the same object, in
    the table it holds it in (a parameter another module registered as a buffer stays its buffer)."""
    for e, t in zip(entries, new):
        kind = e.kind
        for mod, attr in e.owners:
            owner_table(mod, attr, kind)[attr] = t

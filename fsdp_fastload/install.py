"""Stage 5, install: swap the carved views into the modules; every owner of a tie gets one object."""
from __future__ import annotations

import torch
from torch import nn

from .manifest import Entry


def install(entries: list[Entry], views: list[torch.Tensor]) -> None:
    """Parameters become `nn.Parameter`s over their views (same `requires_grad`, and the attributes
    libraries hang on parameters, e.g. transformers' `_is_hf_initialized`); buffers are the views."""
    make, param = torch.Tensor._make_subclass, nn.Parameter  # what nn.Parameter(view) does, minus a frame
    for e, v in zip(entries, views):
        if e.kind == "param":
            new = make(param, v, e.requires_grad)
            old = getattr(e.tensor, "__dict__", None)
            if old:
                for k, val in old.items():
                    new.__dict__.setdefault(k, val)
            for mod, attr in e.owners:
                mod._parameters[attr] = new
        else:
            for mod, attr in e.owners:
                mod._buffers[attr] = v

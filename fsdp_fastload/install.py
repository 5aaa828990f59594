"""Stage 5, install: swap the carved views into the modules; every owner of a tie gets one object."""
from __future__ import annotations

import torch
from torch import nn

from .manifest import Entry


def install(entries: list[Entry], views: list[torch.Tensor]) -> None:
    for e, v in zip(entries, views):
        old = e.tensor
        if e.kind == "param":
            new = nn.Parameter(v, requires_grad=e.requires_grad)
            # Attributes libraries hang on parameters (e.g. transformers' `_is_hf_initialized`).
            for k, val in getattr(old, "__dict__", {}).items():
                new.__dict__.setdefault(k, val)
            for mod, attr in e.owners:
                mod._parameters[attr] = new
        else:
            for mod, attr in e.owners:
                mod._buffers[attr] = v

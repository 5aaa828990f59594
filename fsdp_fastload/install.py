"""Stage 5, install: swap the carved views into the modules; every owner of a tie gets one object."""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .layout import _align, device_align
from .manifest import Entry, owner_table

# Devices whose buffers get an allocation of their own after the transfer (see `own_buffers`).
OWN_BUFFERS_ON = ("cuda",)


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


def own_buffers(entries: list[Entry], prepared: list[torch.Tensor], device: torch.device) -> None:
    """Move the prepared buffers into one small allocation of their own (copies, on `device`), when
    they are small next to the parameters: on CUDA the load's block is only freed with its last
    tensor, so buffers left in it would keep the whole model's memory once the parameters are
    replaced (FSDP1 flattening them, fully_shard after the load). On CPU a dead tensor's pages are
    returned anyway. Best effort: without memory for it the buffers stay where they are."""
    if device.type not in OWN_BUFFERS_ON:
        return
    idx = [i for i, e in enumerate(entries) if e.kind == "buffer" and e.nbytes]
    if not idx:
        return
    offsets, total, align = [], 0, device_align(device)
    for i in idx:
        offsets.append(total)
        total += _align(entries[i].nbytes, align)
    if total * 16 > sum(e.nbytes for e in entries):  # big buffers: a second copy would cost more
        return
    try:
        new = ops.carve_owned(ops.alloc(total, device), ops.encode_spec(
            [entries[i].dtype for i in idx], offsets, [entries[i].shape for i in idx],
            [entries[i].carve_strides() for i in idx]))
    except RuntimeError:  # out of memory: keep them in the load's block
        return
    for i, t in zip(idx, new):
        t.copy_(prepared[i].detach())
        prepared[i] = t.requires_grad_() if entries[i].requires_grad else t

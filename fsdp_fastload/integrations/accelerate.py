"""accelerate / HF Trainer: make FSDP2's cpu-RAM-efficient loading use `materialize`.

With ``FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=True)`` accelerate
(1.15) moves the model to ``meta``, applies ``fully_shard``, then calls
``accelerate.utils.fsdp_utils.fsdp2_load_full_state_dict``, which broadcasts every tensor in full
and scatters it again (``distribute_tensor``), one tensor at a time. After ``enable()``:

- that call is ``materialize(model, device, state_dict=<rank 0's full state dict>)``: each rank
  receives only its shards, in bucket-sized scatters; non-persistent buffers come from rank 0 too;
- ``accelerator.prepare`` first gives every rank rank 0's non-persistent buffers (one small
  ``materialize`` of just those buffers). Without it a rank that built its model on ``meta`` crashes
  in accelerate itself ("Cannot copy out of meta tensor"): accelerate deep-copies the
  non-persistent buffers before sharding and re-registers the copies with ``.to(device)`` after;
- ``accelerator.prepare(model, optimizer)`` maps the optimizer's parameters to the sharded ones by
  ``data_ptr()``, which is 0 for every ``meta`` parameter, so on a rank holding ``meta`` every
  optimizer slot silently became the same parameter. During ``prepare`` each parameter whose
  ``data_ptr()`` is 0 answers a unique stand-in instead (its ``id``), so the mapping is by identity.

Kept from accelerate: its mixed-precision upcast (trainable parameters become fp32 before the full
state dict is captured; the sharded model's dtypes win), CPU offload (shards end on CPU), its
re-registration of non-persistent buffers and its ``tie_weights()`` calls (a tied weight stays one
DTensor ``nn.Parameter`` under both names, in one FSDP group). Falls back to accelerate's own loader
where ``materialize`` does not apply: a state dict holding DTensors (tensor parallelism) or a
parameter whose device mesh does not span every rank.

Example::

    import fsdp_fastload.integrations.accelerate as fastload_accelerate
    fastload_accelerate.enable()          # before accelerator.prepare(...) / Trainer(...).train()
"""
from __future__ import annotations

import functools
import logging
import weakref

import torch
from torch import nn

logger = logging.getLogger("fsdp_fastload")

_ORIGINAL: dict = {}
# model -> {name: tensor} of rank 0's non-persistent buffers, from prepare to the loader.
_BUFFERS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _targets():
    """(namespace, attribute, replacement) for every name accelerate 1.15 looks these up under."""
    import accelerate.accelerator as acc_mod
    import accelerate.utils as acc_utils
    from accelerate.utils import fsdp_utils

    out = [(fsdp_utils, "fsdp2_load_full_state_dict", load_full_state_dict),  # called by fsdp2_prepare_model
           (acc_utils, "fsdp2_load_full_state_dict", load_full_state_dict)]
    for ns in (fsdp_utils, acc_utils, acc_mod):  # acc_mod imported the name: patch it there too
        out.append((ns, "fsdp2_prepare_model", prepare_model))
    out.append((acc_mod.Accelerator, "_prepare_fsdp2", _prepare_fsdp2))
    return out


def enable() -> None:
    """Route accelerate's FSDP2 full-state-dict loading through `materialize` (idempotent)."""
    if _ORIGINAL:
        return
    targets = _targets()
    missing = [f"{getattr(ns, '__name__', ns)}.{attr}" for ns, attr, _ in targets if not hasattr(ns, attr)]
    if missing:
        import accelerate

        raise RuntimeError(f"fsdp_fastload.integrations.accelerate: accelerate {accelerate.__version__} has no "
                           f"{missing}; this integration is written against accelerate 1.15.")
    for ns, attr, new in targets:
        _ORIGINAL[(ns, attr)] = getattr(ns, attr)
        setattr(ns, attr, new)


def disable() -> None:
    """Restore accelerate's own functions (idempotent)."""
    while _ORIGINAL:
        (ns, attr), fn = _ORIGINAL.popitem()
        setattr(ns, attr, fn)


def is_enabled() -> bool:
    return bool(_ORIGINAL)


def _original(attr: str):
    """accelerate's own function (or method) that `attr` replaced."""
    import accelerate.accelerator as acc_mod
    from accelerate.utils import fsdp_utils

    ns = acc_mod.Accelerator if attr == "_prepare_fsdp2" else fsdp_utils
    fn = _ORIGINAL.get((ns, attr))
    if fn is None:
        raise RuntimeError("fsdp_fastload.integrations.accelerate is not enabled (call enable() first)")
    return fn


def _prepare_fsdp2(self, *args):
    """``Accelerator._prepare_fsdp2`` with ``data_ptr()`` made unique for parameters that have none."""
    from torch.distributed.tensor import DTensor

    patched = []
    try:
        for obj in args:
            if isinstance(obj, nn.Module):
                for p in obj.parameters():
                    if not isinstance(p, DTensor) and p.data_ptr() == 0 and "data_ptr" not in p.__dict__:
                        p.data_ptr = functools.partial(int, id(p))
                        patched.append(p)
        return _original("_prepare_fsdp2")(self, *args)
    finally:
        for p in patched:
            p.__dict__.pop("data_ptr", None)


def prepare_model(accelerator, model: nn.Module) -> nn.Module:
    """accelerate's ``fsdp2_prepare_model``, after every rank got rank 0's non-persistent buffers."""
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "cpu_ram_efficient_loading", False) and not _is_fsdp(model):
        _BUFFERS[model] = _share_non_persistent_buffers(model, accelerator.device)
    return _original("fsdp2_prepare_model")(accelerator, model)


def load_full_state_dict(accelerator, model: nn.Module, full_sd: dict, cpu_offload: bool = False) -> nn.Module:
    """Drop-in for ``fsdp2_load_full_state_dict``: rank 0's ``full_sd`` onto every rank's shards."""
    import torch.distributed as dist

    from ..api import materialize

    buffers = _BUFFERS.pop(model, None) or {}
    why = _unsupported(model, full_sd)
    if why:
        logger.info("fsdp_fastload: accelerate's own loader is used: %s", why)
        return _original("fsdp2_load_full_state_dict")(
            accelerator, model, full_sd, cpu_offload=cpu_offload)
    device = torch.device(accelerator.device)
    if cpu_offload and "gloo" in str(dist.get_backend()):
        device = torch.device("cpu")  # the shards' final place, and gloo moves CPU tensors
    sd = None
    if accelerator.is_main_process:
        sd = dict(full_sd)
        for name, t in buffers.items():
            sd.setdefault(name, t)
    # (activation checkpointing: the keys lack "_checkpoint_wrapped_module.", which materialize's
    # matching leaves out where the module's own paths have it)
    materialize(model, device, src=0, state_dict=sd)
    if cpu_offload and device.type != "cpu":
        model.to("cpu")  # FSDP2's `_apply` re-registers (and pins) the shards on CPU
    return model


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or isinstance(getattr(model, "_orig_mod", None), FSDPModule)


def _unsupported(model: nn.Module, full_sd: dict) -> str | None:
    """Why materialize cannot do this load (the same answer on every rank), or None."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    if any(isinstance(v, DTensor) for v in full_sd.values()):
        return "the full state dict holds DTensors (tensor parallelism)"
    world = sorted(range(dist.get_world_size()))
    for name, p in model.named_parameters():
        if isinstance(p, DTensor) and sorted(p.device_mesh.mesh.flatten().tolist()) != world:
            return f"'{name}' lives on a device mesh that does not span every rank"
    return None


def _share_non_persistent_buffers(model: nn.Module, device) -> dict:
    """Every rank gets rank 0's non-persistent buffers (one small collective); {name: tensor}."""
    from ..api import materialize

    owners: dict[int, list] = {}
    tensors: dict[int, torch.Tensor] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for attr in mod._non_persistent_buffers_set:
            t = mod._buffers.get(attr)
            if t is not None:
                owners.setdefault(id(t), []).append((mod, attr, f"{mod_name}.{attr}" if mod_name else attr))
                tensors[id(t)] = t
    if not owners:
        return {}
    holder = nn.Module()
    for k, key in enumerate(owners):
        holder.register_buffer(f"b{k}", tensors[key], persistent=False)
    materialize(holder, device, src=0)
    out = {}
    for k, key in enumerate(owners):
        new = holder._buffers[f"b{k}"]
        for mod, attr, name in owners[key]:
            mod._buffers[attr] = new
            out[name] = new
    return out

"""`materialize`: rank src's model onto every rank (manifest -> layout -> alloc -> fill -> install)."""
from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist
from torch import nn

from . import ops
from .agree import MaterializeError, agree
from .fill import Packer, broadcast_fill
from .install import install
from .layout import plan
from .manifest import Entry, build_manifest, fingerprint, summary
from .verify import verify as _verify

logger = logging.getLogger("fsdp_fastload")

_TUNING = {
    "bucket_size": 32 << 20,  # bytes per broadcast
    "max_inflight": 4,  # broadcasts in flight before waiting on the oldest
    "poison": False,  # fill fresh storage with 0xFF first (NaN in floats): proves every byte is written
    "progress": None,  # None: a progress line on src for loads > 1 GiB on a terminal; False: never
}
_SUPPORTED_CLASSES = ("Parameter", "Tensor")

last_stats: dict = {}  # timings of the most recent call on this rank (for the CLI and benchmarks)


def materialize(module: nn.Module, device: torch.device | str | None = None, *, src: int = 0,
                group: dist.ProcessGroup | None = None, state_dict=None, verify: bool = False,
                **tuning) -> nn.Module:
    """Give every rank rank `src`'s parameters and buffers, on `device`, in one collective call.

    On rank ``src`` the values come from ``module`` itself (real tensors on CPU, mmap-backed is fine,
    or on a device); on every other rank ``module`` is the same architecture built on ``meta``.
    Afterwards, on every rank: every parameter and buffer (non-persistent ones included) is on
    ``device`` and bit-identical to src's; ties are one object under every name; ``nn.Parameter`` and
    ``requires_grad`` are kept. Ranks whose models differ raise on every rank before any data moves.

    Args:
        module: the model (modified in place and returned).
        device: target device; ``None`` means ``cuda:<LOCAL_RANK>`` under NCCL, else ``cpu``.
        src: global rank holding the values.
        group: process group (default: the world). Without an initialised process group the call
            works locally (``src`` must be 0).
        state_dict: reserved for the checkpoint source; not supported yet (must be ``None``).
        verify: all-gather per-tensor checksums afterwards and raise naming any tensor that differs.
        **tuning: ``bucket_size`` (bytes, default 32 MiB), ``max_inflight`` (4), ``poison`` (False),
            ``progress`` (None: auto).

    Example::

        >>> import torch, torch.distributed as dist
        >>> from fsdp_fastload import materialize
        >>> rank = dist.get_rank() if dist.is_initialized() else 0
        >>> if rank == 0:
        ...     model = torch.nn.Linear(4, 2)            # or from_pretrained(...)
        ... else:
        ...     with torch.device("meta"):
        ...         model = torch.nn.Linear(4, 2)
        >>> model = materialize(model, "cpu")
        >>> model.weight.device
        device(type='cpu')
    """
    unknown = set(tuning) - set(_TUNING)
    if unknown:
        raise TypeError(f"materialize() got unknown tuning option(s) {sorted(unknown)}; "
                        f"known: {sorted(_TUNING)}")
    opts = {**_TUNING, **tuning}
    t_start = time.perf_counter()

    distributed = dist.is_available() and dist.is_initialized()
    if not distributed:
        if group is not None:
            raise MaterializeError("fsdp_fastload.materialize: a group was given but torch.distributed "
                                   "is not initialised. Call dist.init_process_group first.")
        if src != 0:
            raise MaterializeError(f"fsdp_fastload.materialize: src={src} without an initialised process "
                                   "group; a single process is rank 0. Pass src=0.")
        rank, is_src, backend = 0, True, ""
    else:
        rank = dist.get_rank()
        ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
        if src not in ranks:
            raise MaterializeError(
                f"fsdp_fastload.materialize (rank {rank}): src={src} is not in the process group "
                f"(its global ranks are {ranks[:8]}{'...' if len(ranks) > 8 else ''}). "
                "Pass the global rank of a group member as src.")
        if rank not in ranks:
            raise MaterializeError(f"fsdp_fastload.materialize (rank {rank}): this rank is not in the "
                                   "given group; call materialize only on the group's members.")
        is_src, backend = rank == src, str(dist.get_backend(group))

    error: str | None = None
    try:
        device = _resolve_device(device, backend)
    except ValueError as e:
        error, device = str(e), torch.device("cpu")
    comm_device = torch.device("cpu") if "gloo" in backend or not backend else device
    if error is None and distributed and device.type == "cpu" and "gloo" not in backend:
        error = (f"backend '{backend}' cannot broadcast CPU tensors (device={device}). "
                 "Use a gloo process group for CPU targets, or pass a CUDA device.")

    entries = build_manifest(module)
    if error is None:
        error = _check_local(entries, is_src=is_src, state_dict=state_dict, device=device)

    if distributed:
        agree(group=group, src=src, rank=rank, comm_device=comm_device,
              fp=fingerprint(entries) ^ src, summary=summary(entries), error=error)
    elif error:
        raise MaterializeError(f"fsdp_fastload.materialize: {error}")
    t_agree = time.perf_counter()

    layout = plan(entries, opts["bucket_size"])
    flat = ops.alloc(layout.total, device)
    if opts["poison"]:
        ops.poison_(flat)
    spec = ops.encode_spec([e.dtype for e in entries], layout.offsets, [e.shape for e in entries])
    views = ops.carve(flat, spec)
    t_alloc = time.perf_counter()

    packer = Packer([e.tensor for e in entries], layout, entries) if is_src else None
    if distributed:
        broadcast_fill(flat, layout, is_src=is_src, packer=packer, src=src, group=group,
                       max_inflight=opts["max_inflight"], progress=opts["progress"])
    else:
        for s, e, piece in packer.pieces(0, layout.total):
            flat[s:e].copy_(piece)
    t_fill = time.perf_counter()

    if verify and distributed:
        _verify(entries, views, group=group, src=src, rank=rank, comm_device=comm_device)
    install(entries, views)
    t_end = time.perf_counter()

    _log(rank=rank, is_src=is_src, entries=entries, layout=layout, device=device,
         phases={"agree": t_agree - t_start, "alloc": t_alloc - t_agree, "fill": t_fill - t_alloc,
                 "install": t_end - t_fill})
    return module


def _resolve_device(device, backend: str) -> torch.device:
    if device is None:
        if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("device='meta' is not a place to load to. Pass 'cpu' or 'cuda:<local rank>'.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device} but CUDA is not available on this rank. "
                             "Pass device='cpu' (with a gloo process group) or run on a GPU machine.")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _check_local(entries: list[Entry], *, is_src: bool, state_dict, device: torch.device) -> str | None:
    """Problems this rank can see alone; reported to every rank through `agree`."""
    odd = [e.names[0] + f" ({e.cls})" for e in entries if e.cls not in _SUPPORTED_CLASSES]
    if odd:
        return (f"not supported: tensor subclasses {odd[:5]}{' ...' if len(odd) > 5 else ''} "
                "(quantized or sharded parameters such as DTensor). Materialize the plain model "
                "first, then shard or quantize it.")
    if not is_src:
        return None
    if state_dict is not None:
        return ("state_dict= is not supported yet; load the model on src (e.g. from_pretrained) "
                "and call materialize(model) instead.")
    meta = [e.names[0] for e in entries if e.tensor.is_meta]
    if meta:
        return (f"src holds {len(meta)} tensor(s) on the meta device, e.g. {meta[:10]}. "
                "src must hold the real values: load the model on src (from_pretrained or "
                "load_state_dict(assign=True)) before calling materialize.")
    return None


def _log(*, rank, is_src, entries, layout, device, phases) -> None:
    total = sum(phases.values())
    nbytes = sum(e.nbytes for e in entries)
    last_stats.clear()
    last_stats.update(rank=rank, bytes=nbytes, tensors=len(entries), buckets=len(layout.buckets),
                      device=str(device), seconds=total, **{f"{k}_s": v for k, v in phases.items()})
    if is_src and logger.isEnabledFor(logging.INFO):
        fill = phases["fill"]
        logger.info(
            "fsdp_fastload.materialize: %.1f MB, %d tensors, %d buckets to %s in %.3f s "
            "(agree %.3f, alloc %.3f, fill %.3f at %.2f GB/s, install %.3f)",
            nbytes / 1e6, len(entries), len(layout.buckets), device, total, phases["agree"],
            phases["alloc"], fill, nbytes / fill / 1e9 if fill > 0 else float("inf"), phases["install"])

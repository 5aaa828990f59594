"""The benchmark's methods: ways of getting rank src's weights onto every rank, one function each.

Adding a method: write ``fn(model, rank, ctx) -> module | None`` (return the module only if it is a
new object) and decorate it with ``@method("name", setup=...)``; see ``Ctx`` for what it gets.
``setup`` chooses what ``model`` is when ``fn`` is called:

* ``"plain"``: rank ``src`` holds the real model (``from_pretrained``, or a filled synthetic module
  in the sweep), every other rank the same architecture on ``meta``;
* ``"meta"``:  every rank holds a meta model (rank ``src`` can read ``ctx.ckpt_dir`` /
  ``ctx.ckpt_file``); checkpoint models only, so not in the sweep;
* ``"fsdp2"``: every rank holds a meta model, ``fully_shard``-ed per layer and at the root on a CPU
  gloo mesh; rank ``src`` also has ``ctx.full_sd`` (the real model's state dict).

Everything heavy (torch.distributed, transformers, accelerate) is imported inside the functions, in
the worker processes, so importing this module costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SETUPS = ("plain", "meta", "fsdp2")


@dataclass
class Ctx:
    """What a method gets besides ``model`` and ``rank``."""

    rank: int
    world_size: int
    src: int
    group: Any  # the default ProcessGroup
    ckpt_dir: Path | None  # checkpoint models: the directory; synthetic sweep models: None
    ckpt_file: Path | None  # the single model.safetensors if there is exactly one, else None
    nbytes: int  # bytes of all unique params + buffers (ties counted once)
    src_model: Any = None  # rank src: the real model (setups "plain", "fsdp2")
    full_sd: dict | None = None  # rank src: src_model.state_dict() (setup "fsdp2")
    state: dict = field(default_factory=dict)  # scratch for prepare() -> fn()


@dataclass
class Method:
    """One row of the benchmark: ``fn`` is timed, ``prepare`` (same arguments) runs untimed before."""

    name: str
    fn: Callable[..., Any]
    setup: str = "plain"
    prepare: Callable[..., None] | None = None
    check: bool = True  # compare params/buffers with src's afterwards
    requires: tuple[str, ...] = ()  # "module" or "module:attr"; the row is skipped if one is missing
    end_to_end: bool = False  # timed phase includes reading the checkpoint (else: the transfer only)
    note: str = ""


METHODS: dict[str, Method] = {}


def method(name: str, **kw):
    """Register ``fn`` as the method ``name`` (keyword arguments: the fields of ``Method``)."""
    if kw.get("setup", "plain") not in SETUPS:
        raise ValueError(f"method {name!r}: setup {kw['setup']!r} is not one of {SETUPS}")

    def deco(fn):
        METHODS[name] = Method(name=name, fn=fn, **kw)
        return fn

    return deco


def _retie(model):
    if hasattr(model, "tie_weights"):
        model.tie_weights()


# -- floor ------------------------------------------------------------------------------------------


def _floor_prepare(model, rank, ctx):
    import torch

    if rank == ctx.src:
        ctx.state["buf"] = torch.empty(ctx.nbytes, dtype=torch.uint8).fill_(0x5A)


@method("floor", prepare=_floor_prepare, check=False,
        note="one flat dist.broadcast of the same bytes into fresh torch.empty memory")
def m_floor(model, rank, ctx):
    import torch
    import torch.distributed as dist

    if rank != ctx.src:
        ctx.state["buf"] = torch.empty(ctx.nbytes, dtype=torch.uint8)
    dist.broadcast(ctx.state["buf"], src=ctx.src)


def _limit_prepare(model, rank, ctx):
    import torch

    ctx.state["buf"] = torch.empty(ctx.nbytes, dtype=torch.uint8).fill_(0x5A if rank == ctx.src else 0)


@method("limit", prepare=_limit_prepare, check=False,
        note="the floor's broadcast into receiver memory already faulted in (not a real loader)")
def m_limit(model, rank, ctx):
    import torch.distributed as dist

    dist.broadcast(ctx.state["buf"], src=ctx.src)


@method("install_bound", check=False,
        note="a lower bound, not a loader: each rank only visits every parameter and buffer once, and "
             "the receivers install a fresh tensor (an nn.Parameter for parameters) over one flat "
             "uninitialized buffer: all tensors from one C++ carve call (each a storage of its own over the "
             "buffer, as ours), the cheapest Parameter "
             "constructor, the garbage collector paused; no communication, no planning, no values (src "
             "keeps its tensors, as ours does). The per-tensor Python that any loader handing back "
             "modules full of torch tensors pays")
def m_install_bound(model, rank, ctx):
    import gc

    import torch
    from torch import nn

    from fsdp_fastload import ops

    gc.disable()
    try:
        slots, dtypes, offsets, shapes, off = [], [], [], [], 0
        for mod in model.modules():
            for table in (mod._parameters, mod._buffers):
                for name, t in table.items():
                    if t is not None:
                        slots.append((table, name, t))
                        dtypes.append(t.dtype)
                        offsets.append(off)
                        shapes.append(t.shape)
                        off += (t.numel() * t.element_size() + 63) & ~63
        if rank == ctx.src:  # src sends from its own tensors: it has nothing to install
            return
        views = ops.carve_owned(ops.alloc(off, torch.device("cpu")), ops.encode_spec(dtypes, offsets, shapes))
        make, param = torch.Tensor._make_subclass, nn.Parameter
        for (table, name, t), v in zip(slots, views):
            table[name] = make(param, v, t.requires_grad) if type(t) is param else v
    finally:
        gc.enable()


# -- ours -------------------------------------------------------------------------------------------


@method("ours", note="fsdp_fastload.materialize(model, cpu, src=0)")
def m_ours(model, rank, ctx):
    import torch

    from fsdp_fastload import materialize

    return materialize(model, torch.device("cpu"), src=ctx.src)


@method("ours_sd", setup="meta", end_to_end=True,
        note="every rank meta; materialize(model, cpu, state_dict=<checkpoint dir> on rank 0): "
             "reads safetensors on rank 0, pipelined into the broadcast (end to end)")
def m_ours_sd(model, rank, ctx):
    import torch

    from fsdp_fastload import materialize

    return materialize(model, torch.device("cpu"), src=ctx.src,
                       state_dict=str(ctx.ckpt_dir) if rank == ctx.src else None)


def _read_floor_prepare(model, rank, ctx):
    from fsdp_fastload.source import checkpoint_files, parse_header

    ctx.state["ranges"] = {f: sorted((t.offset, t.nbytes) for t in parse_header(f).values())
                           for f in checkpoint_files(str(ctx.ckpt_dir))}


@method("read_floor", setup="meta", prepare=_read_floor_prepare, check=False, end_to_end=True,
        note="rank 0 only reads every tensor's bytes from the safetensors files into fresh memory "
             "(read_ranges op, no broadcast): with `floor`, ours_sd's own floor is max(read, floor)")
def m_read_floor(model, rank, ctx):
    from fsdp_fastload import ops

    if rank != ctx.src:
        return
    for f, rs in ctx.state["ranges"].items():
        buf = ops.alloc(sum(n for _, n in rs), "cpu")
        dst, do = [], 0
        for _, n in rs:
            dst.append(do)
            do += n
        ops.read_ranges(f, buf, [o for o, _ in rs], dst, [n for _, n in rs], num_threads=4)
        ctx.state.setdefault("bufs", []).append(buf)


def _read_bcast_prepare(model, rank, ctx):
    from fsdp_fastload.api import _auto_bucket

    _read_floor_prepare(model, rank, ctx)
    spans = [(f, rs[0][0], rs[-1][0] + rs[-1][1]) for f, rs in ctx.state["ranges"].items() if rs]
    size = _auto_bucket(sum(b - a for _, a, b in spans))
    pieces, at = [], 0  # (file, file offset, buffer offset, bytes): each file's data in bucket-sized pieces
    for f, a, b in spans:
        for o in range(a, b, size):
            n = min(size, b - o)
            pieces.append((f, o, at, n))
            at += n
    ctx.state["pieces"], ctx.state["total"] = pieces, at


@method("read_bcast_bound", setup="meta", prepare=_read_bcast_prepare, check=False, end_to_end=True,
        note="ours_sd's transfer with nothing else, not a loader (nor a strict lower bound: ours' schedule "
             "can beat its plain one): rank 0 reads each file's data section in pieces "
             "of ours' bucket size (read_ranges op, 4 threads) and broadcasts each piece as soon as it "
             "is read (4 in flight), rank 1 receives into one flat buffer; no model, no planning. What "
             "reading and broadcasting cost together when they share this machine's CPUs (read_floor "
             "and floor each have them alone)")
def m_read_bcast_bound(model, rank, ctx):
    from fsdp_fastload import ops

    buf = ops.alloc(ctx.state["total"], "cpu")
    _read_and_broadcast(buf, rank, ctx)
    ctx.state["buf"] = buf


def _read_and_broadcast(buf, rank, ctx) -> None:
    """The bounds' transfer: rank src reads each piece of `ctx.state["pieces"]` into `buf` and
    broadcasts it at once, 4 broadcasts in flight; every rank ends with the data sections in `buf`."""
    import collections

    import torch.distributed as dist

    from fsdp_fastload import ops

    inflight: collections.deque = collections.deque()
    for f, fo, do, n in ctx.state["pieces"]:
        if len(inflight) >= 4:
            inflight.popleft().wait()
        if rank == ctx.src:
            ops.read_ranges(f, buf, [fo], [do], [n], num_threads=4)
        inflight.append(dist.broadcast(buf[do:do + n], src=ctx.src, async_op=True))
    for w in inflight:
        w.wait()


def _sd_bound_prepare(model, rank, ctx):
    from fsdp_fastload.source import checkpoint_files, parse_header

    _read_bcast_prepare(model, rank, ctx)
    where, base = {}, 0  # checkpoint name -> byte offset in the concatenated data sections
    for f in checkpoint_files(str(ctx.ckpt_dir)):
        fts = parse_header(f)
        if fts:
            first = min(t.offset for t in fts.values())
            where.update((name, base + t.offset - first) for name, t in fts.items())
            base += max(t.offset + t.nbytes for t in fts.values()) - first
    ctx.state["where"] = where


@method("sd_bound", setup="meta", prepare=_sd_bound_prepare, check=False, end_to_end=True,
        note="the least work a loader from a checkpoint does, with a plain schedule (not a strict lower "
             "bound: ours' schedule can beat it): read_bcast_bound (receivers fault their buffer "
             "in on a thread first, as ours does) plus the per-tensor work no loader from a checkpoint "
             "can skip: rank 0 parses the headers, and every rank walks its model once and installs "
             "an nn.Parameter (a plain tensor for buffers) over each checkpoint tensor's bytes (one C++ carve "
             "call, install_bound's loop). No agreement, no checks, no plan, no buffers recomputed")
def m_sd_bound(model, rank, ctx):
    import gc

    import torch
    from torch import nn

    from fsdp_fastload import ops
    from fsdp_fastload.source import checkpoint_files, parse_header

    gc.disable()
    try:
        buf = ops.alloc(ctx.state["total"], "cpu")
        faulting = ops.Prefault(buf) if rank != ctx.src else None
        if rank == ctx.src:
            for f in checkpoint_files(str(ctx.ckpt_dir)):
                parse_header(f)
        _read_and_broadcast(buf, rank, ctx)
        where, slots, dtypes, offsets, shapes = ctx.state["where"], [], [], [], []
        for prefix, mod in model.named_modules():
            dot = prefix + "." if prefix else ""
            for table in (mod._parameters, mod._buffers):
                for name, t in table.items():
                    off = where.get(dot + name)
                    if t is not None and off is not None:
                        slots.append((table, name, t))
                        dtypes.append(t.dtype)
                        offsets.append(off)
                        shapes.append(t.shape)
        views = ops.carve_owned(buf, ops.encode_spec(dtypes, offsets, shapes))
        make, param = torch.Tensor._make_subclass, nn.Parameter
        for (table, name, t), v in zip(slots, views):
            table[name] = make(param, v, t.requires_grad) if type(t) is param else v
        if faulting is not None:
            faulting.join()
    finally:
        gc.enable()


# -- transformers -----------------------------------------------------------------------------------


@method("hf_every_rank", setup="meta", end_to_end=True,
        note="transformers from_pretrained on every rank (whole load, no broadcast; end to end)")
def m_hf_every_rank(model, rank, ctx):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ctx.ckpt_dir, dtype=torch.bfloat16)


@method("hf0_ddp_sync", setup="meta", end_to_end=True,
        note="end to end: from_pretrained on rank 0, then the DDP/FSDP1 sync (the best correct peer "
             "broadcast)")
def m_hf0_ddp_sync(model, rank, ctx):
    import torch
    from transformers import AutoModelForCausalLM

    if rank == ctx.src:
        model = AutoModelForCausalLM.from_pretrained(ctx.ckpt_dir, dtype=torch.bfloat16)
    else:
        model.to_empty(device="cpu")
        _retie(model)
    _ddp_sync(model, ctx)
    return model


# -- DDP / FSDP1 ------------------------------------------------------------------------------------


def _ddp_sync(model, ctx):
    from torch.distributed.utils import _sync_module_states

    _sync_module_states(model, ctx.group, 250 * 1024 * 1024, ctx.src,
                        params_and_buffers_to_ignore=set(), broadcast_buffers=True)


@method("ddp_sync", note="to_empty + tie_weights on receivers, then torch.distributed.utils."
                         "_sync_module_states (250 MB buckets, buffers too)")
def m_ddp_sync(model, rank, ctx):
    if rank != ctx.src:
        model.to_empty(device="cpu")
        _retie(model)
    _ddp_sync(model, ctx)


# -- torch DCP --------------------------------------------------------------------------------------


def _dcp_opts():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


@method("dcp_full", note="to_empty + tie_weights on receivers, then set_model_state_dict("
                         "full_state_dict=True, broadcast_from_rank0=True); rank 0 passes "
                         "model.state_dict(), others {}")
def m_dcp_full(model, rank, ctx):
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if rank != ctx.src:
        model.to_empty(device="cpu")
        _retie(model)
    sd = model.state_dict() if rank == ctx.src else {}
    set_model_state_dict(model, sd, options=_dcp_opts())


@method("dcp_fsdp2", setup="fsdp2",
        note="set_model_state_dict(broadcast_from_rank0=True) on an FSDP2-sharded meta model")
def m_dcp_fsdp2(model, rank, ctx):
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, ctx.full_sd if rank == ctx.src else {}, options=_dcp_opts())


# -- accelerate -------------------------------------------------------------------------------------


@method("accelerate_fsdp2", setup="fsdp2", requires=("accelerate",),
        note="accelerate.utils.fsdp_utils.fsdp2_load_full_state_dict(acc, model, full_sd) on an "
             "FSDP2-sharded meta model (acc: stub with is_main_process)")
def m_accelerate_fsdp2(model, rank, ctx):
    from types import SimpleNamespace

    from accelerate.utils.fsdp_utils import fsdp2_load_full_state_dict

    acc = SimpleNamespace(is_main_process=(rank == 0))  # the only attribute the function reads
    return fsdp2_load_full_state_dict(acc, model, ctx.full_sd if rank == ctx.src else {})


# -- ours on FSDP2 and DDP --------------------------------------------------------------------------


@method("ours_fsdp2", setup="fsdp2",
        note="materialize(model, cpu, state_dict=<full state dict> on rank 0) on an FSDP2-sharded meta "
             "model: every rank allocates and receives only its shards (bucketed scatters)")
def m_ours_fsdp2(model, rank, ctx):
    import torch
    from fsdp_fastload import materialize

    materialize(model, torch.device("cpu"), src=ctx.src, state_dict=ctx.full_sd if rank == ctx.src else None)


@method("ours_fsdp2_sd", setup="fsdp2", end_to_end=True,
        note="the same, rank 0 passing the checkpoint directory: reads safetensors on rank 0, pipelined "
             "into the scatters (end to end)")
def m_ours_fsdp2_sd(model, rank, ctx):
    import torch
    from fsdp_fastload import materialize

    materialize(model, torch.device("cpu"), src=ctx.src,
                state_dict=str(ctx.ckpt_dir) if rank == ctx.src else None)


def _ddp(model, init_sync: bool):
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, init_sync=init_sync)


@method("ours_ddp", note="materialize, then DistributedDataParallel(model, init_sync=False): DDP skips "
                         "its own re-broadcast of what materialize just delivered")
def m_ours_ddp(model, rank, ctx):
    import torch
    from fsdp_fastload import materialize

    materialize(model, torch.device("cpu"), src=ctx.src)
    ctx.state["ddp"] = _ddp(model, init_sync=False)  # kept alive; `model` is still the module checked


@method("ours_ddp_sync", note="materialize, then DistributedDataParallel(model) with its default init "
                              "sync (what init_sync=False saves)")
def m_ours_ddp_sync(model, rank, ctx):
    import torch
    from fsdp_fastload import materialize

    materialize(model, torch.device("cpu"), src=ctx.src)
    ctx.state["ddp"] = _ddp(model, init_sync=True)


DEFAULT_METHODS = ["floor", "limit", "ours", "ours_sd", "read_floor", "read_bcast_bound", "sd_bound", "ours_fsdp2", "ours_fsdp2_sd",
                   "ours_ddp", "ours_ddp_sync", "ddp_sync", "dcp_full", "dcp_fsdp2", "accelerate_fsdp2",
                   "hf_every_rank", "hf0_ddp_sync"]
DEFAULT_SWEEP_METHODS = ["floor", "ours", "install_bound"]

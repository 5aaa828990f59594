#!/usr/bin/env python
"""Benchmark the *distribution phase* of CPU-RAM-efficient model loading on 2 gloo ranks.

Rank 0 loads a bf16 Llama checkpoint with ``from_pretrained``; rank 1 builds the same model on the
``meta`` device. After a ``dist.barrier()`` each method moves the weights from rank 0 to rank 1; we
time that phase (max over ranks), record rank 1's peak RSS growth during it, and check afterwards
whether rank 1's parameters match the checkpoint and whether its non-persistent buffers (rotary
``inv_freq``) equal rank 0's.

Every (model, method, run) executes in two fresh processes (this script re-invoked with
``--_worker``), ``OMP_NUM_THREADS=1``, with a timeout so that a hang fails loudly.

Adding a method: write a small function ``fn(model, rank, ctx) -> module | None`` and decorate it with
``@method("name", setup=...)``; see ``Ctx`` for what it gets. ``setup`` chooses what ``model`` is:

* ``"plain"``: rank ``src`` gets the ``from_pretrained`` model, other ranks a meta model;
* ``"meta"``:  every rank gets a meta model (rank ``src`` can read ``ctx.ckpt_file`` / ``ctx.ckpt_dir``);
* ``"fsdp2"``: every rank gets a meta model, ``fully_shard``-ed per decoder layer and at the root on a
  CPU gloo mesh; rank ``src`` also has ``ctx.full_sd`` (the ``from_pretrained`` state dict).

Usage::

    python benchmarks/bench_materialize.py            # medium + deep, all methods, 3 runs each
    python benchmarks/bench_materialize.py --quick    # deep only, 1 run
    python benchmarks/bench_materialize.py --models deep --methods floor,ours --runs 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------

_COMMON = dict(tie_word_embeddings=False, max_position_embeddings=2048, rms_norm_eps=1e-5)
MODELS: dict[str, dict[str, Any]] = {
    # 245.9M params, 147 tensors, 492 MB in bf16
    "medium": dict(hidden_size=1024, num_hidden_layers=16, vocab_size=32000, intermediate_size=2304,
                   num_attention_heads=16, num_key_value_heads=16, **_COMMON),
    # 29.2M params, 1,443 tensors, 58 MB in bf16
    "deep": dict(hidden_size=128, num_hidden_layers=160, vocab_size=4000, intermediate_size=288,
                 num_attention_heads=2, num_key_value_heads=2, **_COMMON),
}


def ensure_checkpoint(cache: Path, name: str) -> Path:
    """Build ``cache/name`` once (bf16 LlamaForCausalLM from a config, ``save_pretrained``)."""
    ckpt = cache / name
    spec = json.dumps(MODELS[name], sort_keys=True)
    marker = ckpt / "bench_spec.json"
    if marker.is_file() and marker.read_text() == spec:
        return ckpt
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"[build] {name}: creating checkpoint in {ckpt} ...", flush=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = LlamaConfig(**MODELS[name])
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    ckpt.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(ckpt, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    nt = len(model.state_dict())
    del model
    marker.write_text(spec)
    print(f"[build] {name}: {n / 1e6:.1f}M params, {nt} tensors, {time.perf_counter() - t0:.1f} s",
          flush=True)
    return ckpt


# --------------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What a method gets besides ``model`` and ``rank``."""

    rank: int
    world_size: int
    src: int
    group: Any  # the default ProcessGroup
    ckpt_dir: Path
    ckpt_file: Path | None  # single model.safetensors if there is one, else None
    nbytes: int  # bytes of all unique params + buffers (ties counted once)
    src_model: Any = None  # rank src: the from_pretrained model (setups "plain", "fsdp2")
    full_sd: dict | None = None  # rank src: src_model.state_dict() (setup "fsdp2")
    state: dict = field(default_factory=dict)  # scratch for prepare() -> fn()


@dataclass
class Method:
    name: str
    fn: Callable[..., Any]
    setup: str = "plain"
    prepare: Callable[..., None] | None = None  # (model, rank, ctx) -> None, untimed, before barrier
    check: bool = True  # run the param/buffer checks afterwards
    requires: tuple[str, ...] = ()  # "module" or "module:attr"; the row is skipped if one is missing
    note: str = ""


METHODS: dict[str, Method] = {}


def method(name: str, **kw):
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


# -- ours -------------------------------------------------------------------------------------------


def _ours_prepare(model, rank, ctx):
    import fsdp_fastload  # noqa: F401  (import cost not timed)


@method("ours", prepare=_ours_prepare, requires=("fsdp_fastload:materialize",),
        note="fsdp_fastload.materialize(model, cpu, src=0)")
def m_ours(model, rank, ctx):
    import torch
    from fsdp_fastload import materialize

    return materialize(model, torch.device("cpu"), src=ctx.src)


@method("ours_sd", setup="meta", prepare=_ours_prepare, requires=("fsdp_fastload:materialize",),
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


@method("read_floor", setup="meta", prepare=_read_floor_prepare, check=False,
        requires=("fsdp_fastload:materialize",),
        note="rank 0 only reads every tensor's bytes from the safetensors files into fresh memory "
             "(read_ranges op, no broadcast): with `floor`, ours_sd's own floor is max(read, floor)")
def m_read_floor(model, rank, ctx):
    import torch
    from fsdp_fastload import ops

    if rank != ctx.src:
        return
    for f, rs in ctx.state["ranges"].items():
        total = sum(n for _, n in rs)
        buf = ops.alloc(total, "cpu")
        dst, do = [], 0
        for _, n in rs:
            dst.append(do)
            do += n
        ops.read_ranges(f, buf, [o for o, _ in rs], dst, [n for _, n in rs], num_threads=4)
        ctx.state.setdefault("bufs", []).append(buf)


@method("hf_every_rank", setup="meta", note="transformers from_pretrained on every rank (whole load, no "
                                             "broadcast; end to end)")
def m_hf_every_rank(model, rank, ctx):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ctx.ckpt_dir, dtype=torch.bfloat16)


@method("hf0_ddp_sync", setup="meta", note="end to end: from_pretrained on rank 0, then the DDP/FSDP1 "
                                            "sync (the best correct peer broadcast)")
def m_hf0_ddp_sync(model, rank, ctx):
    import torch
    import torch.distributed as dist
    from torch.distributed.utils import _sync_module_states
    from transformers import AutoModelForCausalLM

    if rank == ctx.src:
        model = AutoModelForCausalLM.from_pretrained(ctx.ckpt_dir, dtype=torch.bfloat16)
    else:
        model.to_empty(device="cpu")
        _retie(model)
    _sync_module_states(model, dist.distributed_c10d._get_default_group(), 250 * 1024 * 1024, ctx.src,
                        params_and_buffers_to_ignore=set(), broadcast_buffers=True)
    return model


# -- DDP / FSDP1 ------------------------------------------------------------------------------------


@method("ddp_sync", note="to_empty + tie_weights on receivers, then torch.distributed.utils."
                         "_sync_module_states (250 MB buckets, buffers too)")
def m_ddp_sync(model, rank, ctx):
    from torch.distributed.utils import _sync_module_states

    if rank != ctx.src:
        model.to_empty(device="cpu")
        _retie(model)
    _sync_module_states(model, ctx.group, 250 * 1024 * 1024, ctx.src,
                        params_and_buffers_to_ignore=set(), broadcast_buffers=True)


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


DEFAULT_METHODS = ["floor", "limit", "ours", "ddp_sync", "dcp_full", "dcp_fsdp2", "accelerate_fsdp2"]

# --------------------------------------------------------------------------------------------------
# worker (one rank of one run)
# --------------------------------------------------------------------------------------------------


class RssSampler:
    """Peak RSS of this process: a background thread reads /proc/self/statm every ``interval`` s."""

    def __init__(self, interval: float):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.fd = os.open("/proc/self/statm", os.O_RDONLY)
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = None

    def rss(self) -> int:
        return int(os.pread(self.fd, 128, 0).split()[1]) * self.page

    def start(self):
        self.peak = self.rss()
        if self.interval > 0:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            r = self.rss()
            self.samples += 1
            if r > self.peak:
                self.peak = r
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.rss())
        return self.peak


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _unique_nbytes(model) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def _crc(t) -> int:
    import zlib

    import torch

    return zlib.crc32(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _non_persistent_buffers(model):
    for mname, mod in model.named_modules():
        for b in sorted(mod._non_persistent_buffers_set):
            t = mod._buffers.get(b)
            if t is not None:
                yield (f"{mname}.{b}" if mname else b), t


def worker(cfg: dict) -> None:
    import gc

    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    src = 0
    m = METHODS[cfg["method"]]
    ckpt = Path(cfg["ckpt"])
    out: dict[str, Any] = {"rank": rank, "method": m.name, "notes": []}
    torch.set_num_threads(1)

    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.bfloat16

    def load_pretrained():
        return AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, device_map=None)

    def meta_model():
        config = AutoConfig.from_pretrained(ckpt)
        with torch.device("meta"):
            mdl = AutoModelForCausalLM.from_config(config, dtype=dtype)
        _retie(mdl)
        return mdl

    src_model = None
    if rank == src and m.setup in ("plain", "fsdp2"):
        t0 = time.perf_counter()
        src_model = load_pretrained()
        out["from_pretrained_s"] = time.perf_counter() - t0

    from datetime import timedelta

    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=cfg["timeout"]))
    group = dist.distributed_c10d._get_default_group()

    if m.setup == "plain":
        model = src_model if rank == src else meta_model()
    elif m.setup in ("meta", "fsdp2"):
        model = meta_model()
    else:
        raise ValueError(f"unknown setup {m.setup!r}")
    nbytes = _unique_nbytes(model)
    if m.setup == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    files = sorted(ckpt.glob("*.safetensors"))
    ctx = Ctx(rank=rank, world_size=world, src=src, group=group, ckpt_dir=ckpt,
              ckpt_file=files[0] if len(files) == 1 else None, nbytes=nbytes,
              src_model=src_model,
              full_sd=src_model.state_dict() if (src_model is not None and m.setup == "fsdp2") else None)
    if m.prepare is not None:
        m.prepare(model, rank, ctx)

    gc.collect()
    sampler = RssSampler(cfg["rss_interval_ms"] / 1000.0)
    rss0 = sampler.rss()
    maxrss0 = _maxrss_bytes()
    sampler.start()
    dist.barrier()
    t0 = time.perf_counter()
    ret = m.fn(model, rank, ctx)
    t1 = time.perf_counter()
    peak = sampler.stop()
    maxrss1 = _maxrss_bytes()
    if ret is not None:
        model = ret

    el = torch.tensor([t1 - t0], dtype=torch.float64)
    dist.all_reduce(el, op=dist.ReduceOp.MAX)
    out.update(
        local_s=t1 - t0,
        elapsed_s=float(el.item()),
        rss_sampled_growth=peak - rss0,
        rss_maxrss_growth=max(0, maxrss1 - maxrss0),
        rss_growth=max(peak - rss0, maxrss1 - maxrss0, 0),
        rss_samples=sampler.samples,
        nbytes=nbytes,
    )

    if m.check and cfg["check"]:
        out.update(_check(model, rank, src, load_pretrained, src_model))
    dist.barrier()
    dist.destroy_process_group()
    Path(cfg["result"] + f".rank{rank}.json").write_text(json.dumps(out))


def _check(model, rank, src, load_pretrained, src_model) -> dict:
    """Compare every rank's state_dict (full tensors) and non-persistent buffers with rank src's
    ``from_pretrained`` model. Collective; runs after the timed phase."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    ref = None
    if rank == src:
        refm = src_model if src_model is not None else load_pretrained()
        ref = {
            "sd": {k: _crc(v) for k, v in refm.state_dict().items()},
            "np": {k: v.detach().cpu().clone() for k, v in _non_persistent_buffers(refm)},
        }
    lst = [ref]
    dist.broadcast_object_list(lst, src=src)
    ref = lst[0]

    sd = model.state_dict()
    keys = sorted(sd)

    def is_meta(t):
        return (t.to_local() if isinstance(t, DTensor) else t).is_meta

    flags = [[is_meta(sd[k]) for k in keys]]
    allflags = [None] * dist.get_world_size()
    dist.all_gather_object(allflags, flags[0])
    # same key list on all ranks is a precondition of every method; guard anyway
    n_meta, n_bad, n_missing = 0, 0, 0
    first_bad = None
    for i, k in enumerate(keys):
        t = sd[k]
        if any(f[i] for f in allflags if len(f) == len(keys)):
            n_meta += int(is_meta(t))
            continue
        if isinstance(t, DTensor):
            t = t.full_tensor()  # collective, same order on every rank
        if k not in ref["sd"]:
            n_missing += 1
            continue
        if _crc(t) != ref["sd"][k]:
            n_bad += 1
            first_bad = first_bad or k
    n_missing += len(set(ref["sd"]) - set(keys))
    if n_meta:
        params = f"{n_meta} on meta"
    elif n_bad or n_missing:
        params = f"MISMATCH ({n_bad} differ, first {first_bad}; {n_missing} missing)"
    else:
        params = "ok"

    mine = dict(_non_persistent_buffers(model))
    states = []
    for k, rt in ref["np"].items():
        t = mine.get(k)
        if t is None:
            states.append("missing")
            continue
        if isinstance(t, DTensor):
            t = t.to_local()
        if t.is_meta:
            states.append("meta")
        elif t.shape == rt.shape and t.dtype == rt.dtype and torch.equal(t.cpu(), rt):
            states.append("correct")
        else:
            states.append("garbage")
    bufs = "/".join(sorted(set(states))) if states else "-"
    return {"params": params, "buffers": bufs, "buffer_detail": dict(zip(ref["np"], states))}


# --------------------------------------------------------------------------------------------------
# orchestration
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _importable(req: str) -> tuple[bool, str]:
    """``req`` is "module" or "module:attr"; checked in a fresh interpreter (the parent stays clean)."""
    mod, _, attr = req.partition(":")
    code = f"from {mod} import {attr}" if attr else f"import {mod}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=300)
    return r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1]


def prefault(gb: float) -> None:
    avail = int(open("/proc/meminfo").read().split("MemAvailable:")[1].split()[0]) * 1024
    n = int(min(gb * 1e9, avail - 3e9) // 1e9)
    print(f"[prefault] touching {n} GB once ...", flush=True)
    t0 = time.perf_counter()
    code = ("import torch; keep=[torch.empty(10**9, dtype=torch.uint8).fill_(1) for _ in range(%d)]" % n)
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    print(f"[prefault] {time.perf_counter() - t0:.1f} s", flush=True)


def fresh_touch_rate() -> float:
    """s/GB to allocate + first-touch 256 MB in a fresh process (context for the floor row)."""
    code = ("import torch,time; t=time.perf_counter(); b=torch.empty(256*2**20, dtype=torch.uint8)"
            ".fill_(1); print(time.perf_counter()-t)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    return float(r.stdout.split()[-1]) / (256 * 2**20 / 1e9)


def run_once(args, model_name: str, ckpt: Path, mname: str, tmp: Path, tag: str) -> dict:
    """Launch 2 fresh ranks for one (model, method) run; return rank 1's result (+ rank 0's)."""
    res = tmp / tag
    cfg = dict(method=mname, ckpt=str(ckpt), result=str(res), timeout=args.timeout,
               rss_interval_ms=args.rss_interval_ms, check=not args.no_check)
    port = _free_port()
    procs, logs = [], []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        log = open(tmp / f"{tag}.rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(cfg)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + args.timeout
    error = None
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                error = f"TIMEOUT after {args.timeout}s (hang?)"
                break
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(2.0)  # give the peer a moment to report its own error, then kill
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
        for f in logs:
            f.close()
    outs = {}
    for rank in range(2):
        f = Path(f"{res}.rank{rank}.json")
        if f.is_file():
            outs[rank] = json.loads(f.read_text())
    if error is None and len(outs) < 2:
        codes = [p.returncode for p in procs]
        error = f"failed (exit codes {codes})"
    if error is not None:
        tails = []
        for rank in range(2):
            lines = (tmp / f"{tag}.rank{rank}.log").read_text(errors="replace").strip().splitlines()
            errs = [ln for ln in lines if "Error" in ln or "error" in ln]
            tails.append(f"rank{rank}: " + (errs[-1] if errs else (lines[-1] if lines else "")))
        return {"error": error, "detail": tails, "logs": str(tmp / f"{tag}.rank*.log")}
    r = dict(outs[1])
    r["sender_rss_growth"] = outs[0]["rss_growth"]
    r["rank0_params"] = outs[0].get("params")
    r["from_pretrained_s"] = outs[0].get("from_pretrained_s")
    return r


def _fmt_s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def summarize(model_name: str, methods: list[str], rows: dict, skipped: dict) -> str:
    MB = 1e6
    floor = rows.get("floor")
    floor_t = statistics.median(r["elapsed_s"] for r in floor) if floor else None
    floor_m = statistics.median(r["rss_growth"] for r in floor) if floor else None
    cfg = MODELS[model_name]
    first = next((v[0] for v in rows.values() if v), None)
    size = f", {first['nbytes'] / MB:.0f} MB moved" if first else ""
    lines = [
        f"### {model_name}: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
        f"vocab {cfg['vocab_size']}{size}",
        "",
        "| method | median s | range s | ×floor | receiver peak RSS growth MB | ×floor-RSS "
        "| non-persistent buffers (rank 1) | params (rank 0 / rank 1) | sender peak RSS growth MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mname in methods:
        if mname in skipped:
            lines.append(f"| {mname} | – | – | – | – | – | {skipped[mname]} | | |")
            continue
        rs = rows.get(mname, [])
        ok = [r for r in rs if "error" not in r]
        if not ok:
            err = rs[0]["error"] + ": " + "; ".join(rs[0]["detail"]) if rs else "no runs"
            err = err.replace("|", "/")[:300]
            lines.append(f"| {mname} | – | – | – | – | – | ERROR: {err} | | |")
            continue
        ts = [r["elapsed_s"] for r in ok]
        med = statistics.median(ts)
        rss = statistics.median(r["rss_growth"] for r in ok)
        srss = statistics.median(r["sender_rss_growth"] for r in ok)
        xf = f"{med / floor_t:.1f}×" if floor_t else "–"
        xr = f"{rss / floor_m:.2f}×" if floor_m else "–"
        bufs = "/".join(sorted({r.get("buffers", "–") for r in ok}))
        params = "/".join(sorted({f"{r.get('rank0_params') or '–'} / {r.get('params') or '–'}"
                                  for r in ok}))
        if mname in ("floor", "limit"):
            params = "–"
        nerr = len(rs) - len(ok)
        extra = f" ({nerr} runs failed)" if nerr else ""
        lines.append(
            f"| {mname}{extra} | {_fmt_s(med)} | {_fmt_s(min(ts))}–{_fmt_s(max(ts))} | {xf} "
            f"| {rss / MB:.0f} | {xr} | {bufs} | {params} | {srss / MB:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Time the distribution phase (rank 0 from_pretrained -> rank 1 meta model) of "
                    "several loaders on 2 gloo ranks; each run in fresh processes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="medium,deep", help=f"comma list from {list(MODELS)}")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list from {list(METHODS)}")
    p.add_argument("--runs", type=int, default=3, help="runs per (model, method)")
    p.add_argument("--quick", action="store_true", help="1 run, deep only")
    p.add_argument("--cache", type=Path, default=Path("/tmp/fsdp_fastload_bench"),
                   help="where the checkpoints are built (once)")
    p.add_argument("--out", type=Path, default=HERE / "results.md", help="markdown output")
    p.add_argument("--timeout", type=int, default=240, help="seconds per run before both ranks are killed")
    p.add_argument("--rss-interval-ms", type=float, default=1.0,
                   help="RSS sampling period of the background thread (0: ru_maxrss delta only)")
    p.add_argument("--warmup", type=int, default=1,
                   help="discarded runs of the first method per model (cold page cache / imports)")
    p.add_argument("--prefault-gb", type=float, default=0.0,
                   help="before the runs, touch (then free) this many GB in a child process. On a VM, "
                        "guest pages never used since boot cost ~2 s/GB to first-touch (host backing) "
                        "vs ~0.3 s/GB for recycled ones; this makes 'fresh memory' mean the latter")
    p.add_argument("--no-check", action="store_true",
                   help="skip the post-run param/buffer comparison (saves a few s per run)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker:
        worker(json.loads(args._worker))
        return

    if args.quick:
        args.runs, args.models = 1, "deep"
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}")
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}")
    if "floor" in methods:  # ratios are relative to it; run it first
        methods = ["floor"] + [m for m in methods if m != "floor"]

    skipped = {}
    for m in methods:
        for req in METHODS[m].requires:
            ok, why = _importable(req)
            if not ok:
                skipped[m] = f"(not available: {why})".replace("|", "/")
                print(f"[skip] {m}: {skipped[m]}", flush=True)

    ckpts = {m: ensure_checkpoint(args.cache, m) for m in models}
    if args.prefault_gb > 0:
        prefault(args.prefault_gb)
    touch = fresh_touch_rate()
    print(f"[info] first touch of fresh memory in a new process: {touch:.2f} s/GB", flush=True)
    import torch  # noqa: E402 (versions for the report only)
    import transformers

    try:
        import accelerate
        acc_v = accelerate.__version__
    except Exception:  # pragma: no cover
        acc_v = "n/a"

    tmp = Path(tempfile.mkdtemp(prefix="bench_materialize_"))
    t_start = time.perf_counter()
    sections = []
    for model_name in models:
        rows: dict[str, list] = {m: [] for m in methods}
        todo = [m for m in methods if m not in skipped]
        for w in range(args.warmup if todo else 0):
            r = run_once(args, model_name, ckpts[model_name], todo[0], tmp, f"{model_name}-warmup-{w}")
            print(f"[{model_name}] warm-up ({todo[0]}): "
                  + (r["error"] if "error" in r else f"{r['elapsed_s']:.3f} s (discarded)"), flush=True)
        for run in range(args.runs):  # interleave methods so drift hits all of them alike
            for mname in todo:
                tag = f"{model_name}-{mname}-{run}"
                w0 = time.perf_counter()
                r = run_once(args, model_name, ckpts[model_name], mname, tmp, tag)
                rows[mname].append(r)
                wall = time.perf_counter() - w0
                if "error" in r:
                    print(f"[{model_name}] {mname:<17} run {run + 1}/{args.runs}: {r['error']} "
                          f"{r['detail']} (logs: {r['logs']})", flush=True)
                else:
                    print(f"[{model_name}] {mname:<17} run {run + 1}/{args.runs}: "
                          f"{r['elapsed_s']:.3f} s, rank-1 peak RSS +{r['rss_growth'] / 1e6:.0f} MB, "
                          f"buffers {r.get('buffers', '–')}, params {r.get('params', '–')} "
                          f"({wall:.1f} s wall)", flush=True)
        sections.append(summarize(model_name, methods, rows, skipped))

    notes = "\n".join(f"- `{m}`: {METHODS[m].note}" for m in methods if METHODS[m].note)
    header = (
        f"## bench_materialize — {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\n"
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, accelerate {acc_v}. "
        f"2 gloo ranks, OMP_NUM_THREADS=1, fresh processes per run, {args.runs} run(s) per row. "
        f"First touch of fresh memory (256 MB, new process, before the runs): {touch:.2f} s/GB"
        f"{f'; {args.prefault_gb:g} GB prefaulted first' if args.prefault_gb else ''}.\n"
        "Timed: after `dist.barrier()`, the method only (receiver-side `to_empty`/re-tie included "
        "where a method needs it), max over ranks. Receiver RSS growth: peak over the timed phase "
        f"minus RSS just before it, on rank 1; peak = max(background thread reading /proc/self/statm "
        f"every {args.rss_interval_ms:g} ms, ru_maxrss delta) — both are lower bounds. "
        "Buffers: rank 1's non-persistent buffers vs rank 0's `from_pretrained` ones. "
        "Params: every state_dict tensor (full tensor for FSDP2 shards) vs the `from_pretrained` model, "
        "bitwise (crc32). Rank 0's `from_pretrained` tensors are mmap-backed (safetensors file, page "
        "cache warm): the sender's RSS growth includes faulting those file pages in (~model size) for "
        "every method that reads the weights; `floor`/`limit` read an anonymous filled buffer.\n\n" + notes + "\n"
    )
    text = header + "\n" + "\n\n".join(sections) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"[done] {time.perf_counter() - t_start:.0f} s; written to {args.out}; logs in {tmp}")


if __name__ == "__main__":
    main()

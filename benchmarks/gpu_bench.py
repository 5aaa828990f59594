#!/usr/bin/env python
"""One GPU, one NCCL rank: how fast each way of loading a checkpoint gets a model onto the GPU.

With one GPU there is nothing to broadcast to (NCCL puts one rank on a GPU), so this measures src's
side of the CUDA path: host -> pinned staging -> device on a side stream, ordered before NCCL, and for
FSDP2 the shards' install, side by side with what a one-GPU user runs today and with the floor (one
flat host -> device copy of the same bytes). Every method's first run is checked bit for bit against
``from_pretrained`` on CPU. bf16 Llama checkpoints are built from configs into --cache.

    python benchmarks/gpu_bench.py --models medium,1b --runs 3
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's package, if not installed

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fsdp_fastload.bench.models import MODELS  # noqa: E402
from fsdp_fastload.bench.worker import RssSampler  # noqa: E402

SIZES = dict(MODELS)
# 1.1B params, 201 tensors, 2.2 GB in bf16
SIZES["1b"] = dict(hidden_size=2048, num_hidden_layers=22, vocab_size=32000, intermediate_size=5632,
                   num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
                   max_position_embeddings=2048, rms_norm_eps=1e-5)


def build_checkpoint(cache: Path, name: str) -> Path:
    """A bf16 LlamaForCausalLM from a config, random weights (filled fast: no init kernels), saved once."""
    import transformers

    path = cache / f"gpu-{name}"
    if (path / "config.json").is_file():
        return path
    cfg = transformers.LlamaConfig(**{k: v for k, v in SIZES[name].items() if k != "arch"})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # (the rotary inv_freq is not saved: no need to fill it)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02))
    model.save_pretrained(path)
    return path


def sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------- methods
# Each method: prepare(ctx) -> state (untimed), run(state, ctx) -> model (timed, ends synchronized).

def _hf(path, **kw):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kw)


def _meta(path):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


def _fsdp2(model, ctx):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=ctx["mesh"])
    fully_shard(model, mesh=ctx["mesh"])
    return model


def _full_sd(path):
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def _floor(pinned):
    def prepare(ctx):
        from fsdp_fastload import ops

        buf = ops.alloc(ctx["bytes"], "cpu", pin_memory=pinned)
        buf.fill_(7)  # touched: no page faults inside the timing
        return buf

    def run(buf, ctx):
        out = torch.empty(buf.numel(), dtype=torch.uint8, device=ctx["dev"])  # (CPU dry run: a memcpy)
        out.copy_(buf, non_blocking=pinned)
        sync()
        return None
    return prepare, run


def _materialize(**kw):
    from fsdp_fastload import materialize

    tuning = {k: v for k, v in kw.items() if k != "state_dict"}

    def run(model, ctx):
        sd = kw.get("state_dict")
        materialize(model, ctx["dev"], state_dict=ctx[sd] if sd else None, **tuning)
        sync()
        return model
    return run


def _dcp(model_sd, ctx):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model, sd = model_sd
    # (broadcast_from_rank0 at world 1 raises inside DCP: "c10d.broadcast_.default does not have a
    # sharding strategy registered", torch 2.13)
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True,
                                                             broadcast_from_rank0=dist.get_world_size() > 1))
    sync()
    return model


def _accelerate(model_sd, ctx):
    from types import SimpleNamespace

    from accelerate.utils.fsdp_utils import fsdp2_load_full_state_dict

    model, sd = model_sd
    fsdp2_load_full_state_dict(SimpleNamespace(is_main_process=True), model, sd)
    sync()
    return model


def _one_thread(fn):
    def run(state, ctx):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(state, ctx)
        finally:
            torch.set_num_threads(threads)
    return run


def _synced(fn):
    def run(state, ctx):
        out = fn(state, ctx)
        sync()
        return out
    return run


METHODS = {
    # name: (prepare, run, what)
    "floor_pinned": (*_floor(True), "one flat pinned host -> device copy of the same bytes"),
    "floor_pageable": (*_floor(False), "one flat pageable host -> device copy of the same bytes"),
    "to_cuda": (lambda ctx: _hf(ctx["path"]), _synced(lambda m, ctx: m.to(ctx["dev"])),
                "from_pretrained on CPU (untimed), then model.to(cuda)"),
    "ours": (lambda ctx: _hf(ctx["path"]), _materialize(),
             "from_pretrained on CPU (untimed), then materialize(model, cuda): src reads the tensors from "
             "the files they are mapped from (read_mapped's default onto a device)"),
    "ours_no_read_mapped": (lambda ctx: _hf(ctx["path"]), _materialize(read_mapped=False),
                            "the same, src copying its tensors out of their mapping (read_mapped=False)"),
    "ours_1thread": (lambda ctx: _hf(ctx["path"]), _one_thread(_materialize()),
                     "the same with torch.set_num_threads(1): src packs its staging buffers on one core"),
    "hf_device_map": (lambda ctx: None, _synced(lambda _, ctx: _hf(ctx["path"], device_map=str(ctx["dev"]))),
                      "from_pretrained(dir, device_map=cuda), end to end"),
    "hf_cpu_to": (lambda ctx: None, _synced(lambda _, ctx: _hf(ctx["path"]).to(ctx["dev"])),
                  "from_pretrained(dir) on CPU, then .to(cuda), end to end"),
    "ours_sd": (lambda ctx: _meta(ctx["path"]), _materialize(state_dict="path_str"),
                "meta model, materialize(state_dict=<dir>), end to end"),
    "ours_fsdp2_sd": (lambda ctx: _fsdp2(_meta(ctx["path"]), ctx), _materialize(state_dict="path_str"),
                      "FSDP2 meta model, materialize(state_dict=<dir>), end to end"),
    "ours_fsdp2": (lambda ctx: _fsdp2(_meta(ctx["path"]), ctx), _materialize(state_dict="full_sd"),
                   "FSDP2 meta model, materialize(state_dict=<full CPU state dict>), its tensors mapped "
                   "from the files (safetensors' load_file) read from them (read_mapped's default)"),
    "ours_fsdp2_no_read_mapped": (lambda ctx: _fsdp2(_meta(ctx["path"]), ctx),
                                  _materialize(state_dict="full_sd", read_mapped=False),
                                  "the same, copied out of their mapping (read_mapped=False)"),
    # (a copy of the dict each run: set_model_state_dict replaces the caller's values with its DTensors
    # on the device, so the next run would start from GPU memory)
    "dcp_fsdp2": (lambda ctx: (_fsdp2(_meta(ctx["path"]), ctx).to_empty(device=ctx["dev"]), dict(ctx["full_sd"])), _dcp,
                  "FSDP2 meta model, to_empty(cuda), set_model_state_dict(<full CPU state dict>, full_state_dict)"),
    "accelerate_fsdp2": (lambda ctx: (_fsdp2(_meta(ctx["path"]), ctx), dict(ctx["full_sd"])), _accelerate,
                         "FSDP2 meta model, accelerate fsdp2_load_full_state_dict(<full CPU state dict>)"),
}


ctx_dev = [None]


def check(model, ref: dict) -> str:
    """'ok' when every tensor of `model` equals `ref` (from_pretrained on CPU) bit for bit."""
    from torch.distributed.tensor import DTensor

    got = dict(model.state_dict())
    got.update({n: b for n, b in model.named_buffers()})
    if set(got) != set(ref):
        return f"DIFF names {sorted(set(got) ^ set(ref))[:3]}"
    for n, t in got.items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if t.device != ctx_dev[0] or t.dtype != ref[n].dtype or not torch.equal(t.cpu(), ref[n]):
            return f"DIFF {n}"
    return "ok"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="medium,1b")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", default="/tmp/fsdp_fastload_gpu_bench")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script (gloo)")
    args = ap.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    cuda = args.device == "cuda"
    dev = ctx_dev[0] = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=dev)
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (1,))
    card = torch.cuda.get_device_name(dev) if cuda else "CPU (dry run)"
    lines = [f"{card}, torch {torch.__version__}, {'NCCL' if cuda else 'gloo'} world 1, "
             f"{args.runs} runs per row (median), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    for name in args.models.split(","):
        path = build_checkpoint(Path(args.cache), name)
        ref_model = _hf(path)
        ref = {n: t.detach().clone() for n, t in ref_model.state_dict().items()}
        ref.update({n: b.detach().clone() for n, b in ref_model.named_buffers()})
        del ref_model
        total = sum(t.numel() * t.element_size() for t in _full_sd(path).values())
        ctx = dict(dev=dev, mesh=mesh, path=path, path_str=str(path), bytes=total, full_sd=_full_sd(path))
        rows = []
        for m in args.methods.split(","):
            prepare, run, what = METHODS[m]
            times, status, peak, phases, host = [], "-", 0, [], 0
            if m == "floor_pinned" and not cuda:
                continue
            try:
                for i in range(args.runs):
                    if not all(type(t) is torch.Tensor and t.is_cpu for t in ctx["full_sd"].values()):
                        raise RuntimeError("the shared full state dict no longer holds CPU tensors")
                    state = prepare(ctx)
                    gc.collect()
                    sync()
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(dev)
                        base = torch.cuda.memory_allocated(dev)
                    rss = RssSampler(0.0)  # the kernel's peak RSS (VmHWM), reset here
                    rss0 = rss.rss()
                    rss.start()
                    t0 = time.perf_counter()
                    model = run(state, ctx)
                    times.append(time.perf_counter() - t0)
                    host = max(host, rss.stop() - rss0)
                    if m.startswith("ours"):  # where materialize's own time went (this rank's phases)
                        from fsdp_fastload import api
                        phases.append("/".join(f"{api.last_stats.get(k + '_s', float('nan')):.3f}"
                                               for k in ("agree", "alloc", "fill", "install")))
                    if cuda:
                        peak = torch.cuda.max_memory_allocated(dev) - base
                    if i == 0 and model is not None:
                        status = check(model, ref)
                    del state, model
                    gc.collect()
                    if cuda:
                        torch.cuda.empty_cache()
            except Exception as e:  # a peer that fails here is reported, not fatal
                status = f"raised {type(e).__name__}: {str(e)[:80]}"
            med = statistics.median(times) if times else float("nan")
            phase = phases[times.index(med)] if phases and med in times else (phases[0] if phases else "")
            rows.append((m, med, min(times) if times else float("nan"), peak, host, status, phase, what))
            print(f"[{name}] {m}: {med:.3f} s  {status}", flush=True)
        floor = next((r[1] for r in rows if r[0] == ("floor_pinned" if cuda else "floor_pageable")), float("nan"))
        lines += [f"### {name}: {total / 1e9:.2f} GB bf16", "",
                  f"| method | median s | min s | GB/s | x {'floor_pinned' if cuda else 'floor_pageable'} | GPU peak GB "
                  "| host RSS peak GB | check | agree/alloc/fill/install s | what |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for m, med, mn, peak, host, status, phase, what in rows:
            lines.append(f"| {m} | {med:.3f} | {mn:.3f} | {total / med / 1e9:.1f} | {med / floor:.2f} | "
                         f"{peak / 1e9:.2f} | {host / 1e9:.2f} | {status} | {phase} | {what} |")
        from fsdp_fastload import source
        lines += ["read_mapped's mapping lookup in this process: "
                  + ("the PROCMAP_QUERY ioctl" if source._procmap_query_ok else "/proc/self/maps (no PROCMAP_QUERY)")
                  + f", {sum(1 for _ in open('/proc/self/maps'))} mappings, kernel {os.uname().release}", ""]
        if args.out:  # after each model: a run cut short keeps what it measured
            Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

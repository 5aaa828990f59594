"""`python -m fsdp_fastload demo`: the main job on an embedded default, verified, with a short table.

Builds a small transformers model from a config (or takes ``--model PATH``), starts ``--nproc`` local
ranks with torch.distributed's own launcher (torchrun's ``elastic_launch``; under torchrun it runs as
a normal distributed program instead), and on every rank loads it twice with ``materialize``:
1. src-model flow: rank 0 ``from_pretrained``, the others a ``meta`` skeleton;
2. checkpoint flow: every rank a ``meta`` skeleton, rank 0 passes the checkpoint directory.
Every tensor and the logits are compared bit for bit with single-process ``from_pretrained``.
"""
from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import tempfile
import time
import uuid


def _build_default(root: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = os.path.join(root, "demo-llama")
    if not os.path.exists(os.path.join(path, "config.json")):
        config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=4, vocab_size=16000,
                             tie_word_embeddings=True, max_position_embeddings=512)
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def _auto_cls(path: str):
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    for arch in config.architectures or []:
        if hasattr(transformers, arch):
            return getattr(transformers, arch), config
    return transformers.AutoModelForCausalLM, config


def _skeleton(path: str):
    import torch

    cls, config = _auto_cls(path)
    with torch.device("meta"):
        model = cls._from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    return model.eval()


def _compare(model, ref) -> list[str]:
    import torch

    bad = []
    got = dict(model.named_parameters(remove_duplicate=False))
    got.update(model.named_buffers(remove_duplicate=False))
    want = dict(ref.named_parameters(remove_duplicate=False))
    want.update(ref.named_buffers(remove_duplicate=False))
    if set(got) != set(want):
        bad.append("names differ")
    for n in set(got) & set(want):
        g, w = got[n].detach().cpu(), want[n]
        if g.dtype != w.dtype or g.shape != w.shape or not torch.equal(g, w):
            bad.append(n)
    return bad


def _logits(model, device):
    import torch

    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(2 * 16, device=device).reshape(2, 16) * 7919) % vocab
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def rank_main(path: str, device_kind: str) -> dict:
    """One rank of the demo (collective). Returns this rank's results."""
    import torch
    import torch.distributed as dist

    from . import api
    from .api import materialize

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    rank = dist.get_rank()
    if device_kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, dist.get_world_size())))
    cls, _ = _auto_cls(path)
    ref = cls.from_pretrained(path).eval()
    # single-process loading onto this rank's device: the same kernels as the loaded model's
    ref_logits = _logits(copy.deepcopy(ref).to(device), device)
    out = {"rank": rank, "flows": {}}
    for flow in ("src-model", "checkpoint"):
        if flow == "src-model" and rank == 0:
            model = cls.from_pretrained(path).eval()
        else:
            model = _skeleton(path)
        dist.barrier()
        t0 = time.perf_counter()
        materialize(model, device, state_dict=path if (flow == "checkpoint" and rank == 0) else None,
                    verify=True)
        seconds = time.perf_counter() - t0
        bad = _compare(model, ref)
        same_logits = torch.equal(_logits(model, device), ref_logits)
        out["flows"][flow] = dict(api.last_stats, seconds=seconds, mismatches=bad[:5],
                                  logits_equal=bool(same_logits))
        del model
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _report(results: list[dict], path: str) -> bool:
    ok = True
    print(f"\nfsdp_fastload demo: {path}, {len(results)} ranks")
    print(f"{'flow':<11} {'rank':>4} {'MB':>8} {'tensors':>7} {'agree s':>8} {'alloc s':>8} "
          f"{'fill s':>8} {'GB/s':>6} {'install s':>9} {'total s':>8} {'peak RSS MB':>11}  check")
    for flow in ("src-model", "checkpoint"):
        for r in sorted(results, key=lambda r: r["rank"]):
            f = r["flows"][flow]
            good = not f["mismatches"] and f["logits_equal"]
            ok &= good
            rate = f["sent_bytes"] / f["fill_s"] / 1e9 if f["fill_s"] > 0 else float("inf")
            print(f"{flow:<11} {r['rank']:>4} {f['bytes'] / 1e6:>8.1f} {f['tensors']:>7} "
                  f"{f['agree_s']:>8.3f} {f['alloc_s']:>8.3f} {f['fill_s']:>8.3f} {rate:>6.2f} "
                  f"{f['install_s']:>9.3f} {f['seconds']:>8.3f} {r['peak_rss_mb']:>11.0f}  "
                  + ("identical" if good else f"DIFFERS {f['mismatches']} logits_equal={f['logits_equal']}"))
    print("\nVERIFIED: every rank's parameters, buffers and logits are identical to single-process "
          "from_pretrained." if ok else "\nFAILED: some rank differs from single-process from_pretrained.")
    return ok


def _launched(path: str, device_kind: str) -> dict:
    return rank_main(path, device_kind)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fsdp_fastload demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local transformers checkpoint directory (default: build a small "
                                   "Llama from a config into a temp dir)")
    p.add_argument("--nproc", type=int, default=2, help="local ranks to start (default 2)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: gloo; cuda: NCCL, one rank per GPU")
    args = p.parse_args(argv)
    if args.model and not os.path.isfile(os.path.join(args.model, "config.json")):
        print(f"--model {args.model}: not a transformers checkpoint directory (no config.json there). "
              "Pass a directory written by save_pretrained, or leave --model out for the built-in "
              "example.", file=sys.stderr)
        return 2
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch.distributed as dist

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: a normal program
        path = args.model or _build_default(os.path.join(tempfile.gettempdir(), "fsdp_fastload_demo"))
        res = rank_main(path, args.device)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, res)
        ok = _report(gathered, path) if dist.get_rank() == 0 else True
        dist.destroy_process_group()
        return 0 if ok else 1

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = args.nproc
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: CUDA is not available here. Run with --device cpu.", file=sys.stderr)
            return 2
        nproc = min(nproc, torch.cuda.device_count())
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or _build_default(tmp)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              monitor_interval=0.1, start_method="spawn")
        results = elastic_launch(config, entrypoint=_launched)(path, args.device)
        return 0 if _report(list(results.values()), path) else 1

"""`python -m fsdp_fastload bench`: the side-by-side benchmark and the scaling sweep, in one command.

1. Checkpoint models (bf16 Llama, built once into --cache): our paths (``ours``: rank 0's
   ``from_pretrained`` model -> meta ranks; ``ours_sd``: every rank meta, rank 0 streams the
   checkpoint) vs the floor (one flat broadcast of the same bytes) and the peers (DDP/FSDP1
   ``_sync_module_states``, DCP ``set_model_state_dict(broadcast_from_rank0=True)`` full and
   FSDP2, accelerate ``fsdp2_load_full_state_dict``, ``from_pretrained`` on every rank).
2. The scaling sweep on plain synthetic modules: (a) tensor count at fixed bytes, (b) bytes at a
   fixed count; ``materialize`` vs the floor, ratio to one tensor of the same bytes.

Every run is 2 fresh gloo ranks (``OMP_NUM_THREADS=1``) with a timeout; medians over --runs.
Writes DIR/bench.md (tables, machine, the command), DIR/sweep.png (with matplotlib),
DIR/results.json (every run) and DIR/logs/ (every rank's output).

Examples::

    python -m fsdp_fastload bench                       # everything (~20 min on 2 cores)
    python -m fsdp_fastload bench --quick               # deep model, 1 run, small sweep (~3 min)
    python -m fsdp_fastload bench --models deep --methods floor,ours,ddp_sync --runs 5 --no-sweep
    python -m fsdp_fastload bench --sweep --sweep-counts 1000,100000 --sweep-sizes 1G
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from . import sweep
from .methods import DEFAULT_METHODS, DEFAULT_SWEEP_METHODS, METHODS
from .models import MODELS, ensure_checkpoint
from .report import document, model_table
from .runner import Job, Settings, fresh_touch_rate, importable, prefault, run_jobs

# (full, --quick) defaults of the options --quick changes; an explicit option always wins
DEFAULTS = {"runs": (3, 1), "models": ("medium,deep", "deep"),
            "sweep_counts": ("100,1000,10000,100000", "100,1000,10000,100000"),
            "sweep_bytes": ("64M", "16M"), "sweep_sizes": ("64M,256M,1G,2G", "16M,64M"),
            "sweep_count": (1000, 1000)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fsdp_fastload bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: deep model only, 1 run, small sweep (16 MB points)")
    p.add_argument("--models", help=f"comma list from {sorted(MODELS)}, or 'none' "
                                    f"(default {DEFAULTS['models'][0]})")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list from {sorted(METHODS)} "
                                                                        "(default: %(default)s)")
    p.add_argument("--runs", type=int, help="runs per row (default 3; --quick 1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sweep", action="store_true", help="run only the scaling sweep (no model tables)")
    g.add_argument("--no-sweep", action="store_true", help="skip the scaling sweep")
    p.add_argument("--sweep-counts", help="(a) tensor counts; 1 is always added "
                                          f"(default {DEFAULTS['sweep_counts'][0]})")
    p.add_argument("--sweep-bytes", help=f"(a) total bytes (default {DEFAULTS['sweep_bytes'][0]}; "
                                         "decimal K/M/G)")
    p.add_argument("--sweep-sizes", help=f"(b) total bytes (default {DEFAULTS['sweep_sizes'][0]})")
    p.add_argument("--sweep-count", type=int, help=f"(b) tensor count (default {DEFAULTS['sweep_count'][0]})")
    p.add_argument("--sweep-methods", default=",".join(DEFAULT_SWEEP_METHODS),
                   help="methods with setup plain/fsdp2; floor is always run (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="output directory (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/fsdp_fastload_bench"),
                   help="where the checkpoints are built, once (default: %(default)s)")
    p.add_argument("--timeout", type=int, default=240, help="seconds per run before both ranks are killed")
    p.add_argument("--rss", choices=("kernel", "thread"), default="kernel",
                   help="how a rank's peak RSS over the timed call is found: the kernel's own peak "
                        "(VmHWM, reset before the call: exact; falls back to the thread where Linux "
                        "does not allow the reset) or a background thread sampling it (a lower "
                        "bound: peaks shorter than its period are missed). Default %(default)s")
    p.add_argument("--rss-interval-ms", type=float, default=1.0,
                   help="--rss thread: the sampling period (0: ru_maxrss delta only)")
    p.add_argument("--warmup", type=int, default=1,
                   help="discarded runs of the first row, per model and for the sweep (default 1)")
    p.add_argument("--prefault-gb", type=float, default=0.0,
                   help="before the runs, touch (then free) this many GB in a child process. On a VM, "
                        "guest pages never used since boot cost ~2 s/GB to first-touch (host backing) vs "
                        "~0.3 s/GB for recycled ones; this makes 'fresh memory' mean the latter")
    p.add_argument("--no-check", action="store_true", help="skip the post-run param/buffer comparison")
    return p


def _names(text: str) -> list[str]:
    return [] if text.strip().lower() == "none" else [x for x in text.split(",") if x.strip()]


def _resolve(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill --quick-dependent defaults, split the lists, and reject what cannot run."""
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.models = [] if args.sweep else _names(args.models)
    args.methods = _names(args.methods)
    args.sweep_methods = _names(args.sweep_methods)
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; known: {sorted(MODELS)}")
    for m in args.methods + args.sweep_methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; known: {sorted(METHODS)}")
    bad = [m for m in args.sweep_methods if METHODS[m].setup == "meta"]
    if bad:
        p.error(f"--sweep-methods: {bad} read a checkpoint (setup 'meta'); the sweep's synthetic modules "
                "have none. Use methods with setup 'plain' or 'fsdp2'.")
    if "floor" in args.methods:  # ratios are relative to it; run it first
        args.methods = ["floor"] + [m for m in args.methods if m != "floor"]
    if args.runs < 1:
        p.error("--runs must be at least 1")
    try:
        args.plan = None if args.no_sweep else sweep.plan(
            [int(c) for c in _names(args.sweep_counts)], sweep.parse_bytes(args.sweep_bytes),
            [sweep.parse_bytes(s) for s in _names(args.sweep_sizes)], args.sweep_count, args.sweep_methods)
    except ValueError as e:
        p.error(str(e))
    if not args.models and args.plan is None:
        p.error("nothing to run: no models and --no-sweep")
    return args


def _skipped(methods: list[str]) -> dict[str, str]:
    """Methods whose requirements are missing here, with why."""
    out = {}
    for m in dict.fromkeys(methods):
        for req in METHODS[m].requires:
            ok, why = importable(req)
            if not ok:
                out[m] = f"(not available: {why})".replace("|", "/")
                print(f"[skip] {m}: {out[m]}", flush=True)
    return out


def _run_models(args, settings: Settings, skipped: dict) -> tuple[list[str], dict]:
    sections, raw = [], {}
    todo = [m for m in args.methods if m not in skipped]
    for name in args.models:
        ckpt = ensure_checkpoint(args.cache, name)
        jobs = [Job(key=(name, m), label=f"[{name}] {m:<17}", method=m,
                    model={"kind": "checkpoint", "path": str(ckpt)}) for m in todo]
        results = run_jobs(jobs, args.runs, settings, warmup=args.warmup)
        sections.append(model_table(name, args.methods, results, skipped))
        raw.update({f"{k[0]}/{k[1]}": v for k, v in results.items()})
    return sections, raw


def _run_sweep(args, settings: Settings, skipped: dict) -> tuple[str, dict, str | None]:
    plan = args.plan
    plan.methods = [m for m in plan.methods if m not in skipped]
    results = run_jobs(sweep.jobs(plan), args.runs, settings, warmup=args.warmup)
    note = sweep.plot(plan, results, args.out / "sweep.png")
    if note:
        print(f"[plot] {note}", flush=True)
    raw = {"/".join(map(str, k)): v for k, v in results.items()}
    return sweep.tables(plan, results), raw, note


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = _parser()
    args = _resolve(p, p.parse_args(argv))
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    settings = Settings(logdir=args.out / "logs", timeout=args.timeout,
                        rss_interval_ms=args.rss_interval_ms, rss=args.rss, check=not args.no_check)
    skipped = _skipped((args.methods if args.models else []) + (args.sweep_methods if args.plan else []))
    if args.prefault_gb > 0:
        prefault(args.prefault_gb)
    touch = fresh_touch_rate()
    print(f"[info] first touch of fresh memory in a new process: {touch:.2f} s/GB", flush=True)

    t0 = time.perf_counter()
    sections, raw = _run_models(args, settings, skipped)
    sweep_md, plot_note = None, None
    if args.plan is not None:
        sweep_md, sweep_raw, plot_note = _run_sweep(args, settings, skipped)
        raw.update({f"sweep/{k}": v for k, v in sweep_raw.items()})

    text = document(commands="python -m fsdp_fastload bench " + shlex.join(argv), runs=args.runs,
                    touch=touch, prefault_gb=args.prefault_gb, model_sections=sections,
                    model_methods=args.methods, sweep_section=sweep_md,
                    sweep_methods=args.plan.methods if args.plan else [], plot_note=plot_note)
    (args.out / "bench.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(raw, indent=1))
    failed = sum("error" in r for rs in raw.values() for r in rs)
    print("\n" + text)
    print(f"[done] {time.perf_counter() - t0:.0f} s, {failed} failed run(s); written to "
          f"{args.out / 'bench.md'}; logs in {settings.logdir}", flush=True)
    return 0

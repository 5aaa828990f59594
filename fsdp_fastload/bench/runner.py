"""Runs: each one in 2 fresh worker processes with a timeout; series of runs; their medians.

A worker is ``python -m fsdp_fastload.bench --_worker CONFIG`` (the installed package, no script path),
``OMP_NUM_THREADS=1``, in its own session so that a hang is killed whole.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import fsdp_fastload

WORLD = 2
PKG_ROOT = str(Path(fsdp_fastload.__file__).resolve().parent.parent)


@dataclass
class Settings:
    """What every run of one benchmark invocation shares."""

    logdir: Path
    timeout: int
    rss_interval_ms: float
    check: bool
    rss: str = "kernel"


@dataclass
class Job:
    """One row's worth of runs: ``key`` indexes the results, ``label`` prefixes the progress lines."""

    key: tuple
    label: str
    method: str
    model: dict  # a model spec (see models.open_source)


def child_env(**extra) -> dict:
    """The environment of a child process: one thread, and the package importable as it is here."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               **extra)
    if PKG_ROOT != sysconfig.get_paths()["purelib"]:  # a checkout, not site-packages
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: Job, settings: Settings, tag: str) -> dict:
    """Run ``job`` once on 2 fresh ranks; rank 1's result (plus rank 0's essentials), or an error."""
    res = settings.logdir / tag
    cfg = dict(method=job.method, model=job.model, result=str(res), timeout=settings.timeout,
               rss_interval_ms=settings.rss_interval_ms, rss=settings.rss, check=settings.check)
    port = _free_port()
    procs, logs = [], []
    try:
        for rank in range(WORLD):
            env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                            LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            logs.append(open(settings.logdir / f"{tag}.rank{rank}.log", "w"))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fsdp_fastload.bench", "--_worker", json.dumps(cfg)],
                env=env, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True))
        error = _wait(procs, settings.timeout)
    finally:
        for p in procs:
            _kill(p)
        for f in logs:
            f.close()
    outs = {r: json.loads(f.read_text()) for r in range(WORLD)
            if (f := Path(f"{res}.rank{r}.json")).is_file()}
    if error is None and len(outs) < WORLD:
        error = f"failed (exit codes {[p.returncode for p in procs]})"
    if error is not None:
        return {"error": error, "detail": [_log_tail(settings.logdir / f"{tag}.rank{r}.log", r)
                                           for r in range(WORLD)],
                "logs": str(settings.logdir / f"{tag}.rank*.log")}
    return dict(outs[1], sender_rss_growth=outs[0]["rss_growth"], rank0_params=outs[0].get("params"),
                src_load_s=outs[0].get("src_load_s"), sender_cpu_s=outs[0].get("cpu_s"))


def _wait(procs, timeout: float) -> str | None:
    """Wait for every process; a timeout message, or None. A failed rank's peers get 2 s to report."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            return f"TIMEOUT after {timeout}s (hang?)"
        if any(p.poll() not in (None, 0) for p in procs):
            time.sleep(2.0)
            return None
        time.sleep(0.05)
    return None


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()


def _log_tail(path: Path, rank: int) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    return f"rank{rank}: " + (errs[-1] if errs else (lines[-1] if lines else "(no output)"))


def run_jobs(jobs: list[Job], runs: int, settings: Settings, warmup: int = 0) -> dict[tuple, list]:
    """``runs`` rounds over ``jobs`` (interleaved, so drift hits every row alike), a progress line per
    run; first ``warmup`` discarded runs of ``jobs[0]`` (cold page cache, imports)."""
    results: dict[tuple, list] = {j.key: [] for j in jobs}
    for w in range(warmup if jobs else 0):
        r = launch(jobs[0], settings, f"{_slug(jobs[0].label)}-warmup-{w}")
        print(f"{jobs[0].label} warm-up: "
              + (r["error"] if "error" in r else f"{r['elapsed_s']:.3f} s (discarded)"), flush=True)
    for run in range(runs):
        for job in jobs:
            t0 = time.perf_counter()
            r = launch(job, settings, f"{_slug(job.label)}-{run}")
            results[job.key].append(r)
            print(f"{job.label} run {run + 1}/{runs}: {progress(r)} "
                  f"({time.perf_counter() - t0:.1f} s wall)", flush=True)
    return results


def progress(r: dict) -> str:
    """One run, in a few words."""
    if "error" in r:
        return f"{r['error']} {r['detail']} (logs: {r['logs']})"
    return (f"{r['elapsed_s']:.3f} s, rank-1 peak RSS +{r['rss_growth'] / 1e6:.0f} MB, "
            f"buffers {r.get('buffers', '–')}, params {r.get('params', '–')}")


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-")


def stats(rs: list[dict]) -> dict | None:
    """Medians over the successful runs of one row (None if none succeeded)."""
    ok = [r for r in rs if "error" not in r]
    if not ok:
        return None
    ts = [r["elapsed_s"] for r in ok]
    return dict(median=statistics.median(ts), lo=min(ts), hi=max(ts), runs=len(ok), failed=len(rs) - len(ok),
                rss=statistics.median(r["rss_growth"] for r in ok),
                sender_rss=statistics.median(r["sender_rss_growth"] for r in ok),
                nbytes=ok[0]["nbytes"], buffers="/".join(sorted({r.get("buffers") or "–" for r in ok})),
                params="/".join(sorted({r.get("params") or "–" for r in ok})),
                rank0_params="/".join(sorted({r.get("rank0_params") or "–" for r in ok})),
                cpu=_median_of(ok, "sender_cpu_s"), receiver_cpu=_median_of(ok, "cpu_s"))


def _median_of(rs: list[dict], key: str) -> float | None:
    """The median of `key` over runs that have it (results written before it was measured lack it)."""
    vals = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def first_error(rs: list[dict]) -> str:
    """The first failed run's message, one table cell long."""
    if not rs:
        return "no runs"
    r = next(r for r in rs if "error" in r)
    return (r["error"] + ": " + "; ".join(r["detail"])).replace("|", "/")[:300]


def importable(req: str) -> tuple[bool, str]:
    """``req`` is "module" or "module:attr"; checked in a fresh interpreter (the parent stays lean)."""
    mod, _, attr = req.partition(":")
    code = f"from {mod} import {attr}" if attr else f"import {mod}"
    r = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True,
                       timeout=300)
    return r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1]


def prefault(gb: float) -> None:
    """Touch (then free) up to ``gb`` GB in a child, so "fresh memory" means recycled guest pages."""
    avail = int(open("/proc/meminfo").read().split("MemAvailable:")[1].split()[0]) * 1024
    n = int(min(gb * 1e9, avail - 3e9) // 1e9)
    print(f"[prefault] touching {n} GB once ...", flush=True)
    t0 = time.perf_counter()
    code = f"import torch; keep=[torch.empty(10**9, dtype=torch.uint8).fill_(1) for _ in range({n})]"
    subprocess.run([sys.executable, "-c", code], check=True, env=child_env())
    print(f"[prefault] {time.perf_counter() - t0:.1f} s", flush=True)


def fresh_touch_rate() -> float:
    """s/GB to allocate + first-touch 256 MB in a fresh process (context for the floor row)."""
    code = ("import torch,time; t=time.perf_counter(); b=torch.empty(256*2**20, dtype=torch.uint8)"
            ".fill_(1); print(time.perf_counter()-t)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(),
                       check=True)
    return float(r.stdout.split()[-1]) / (256 * 2**20 / 1e9)

"""The markdown report: the machine, the commands to reproduce, the model tables, the sweep."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess

from .methods import METHODS
from .models import describe
from .runner import PKG_ROOT, first_error, stats


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _ram_gb() -> str:
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1])
        return f"{kb / 1e6:.0f} GB RAM"
    except (OSError, StopIteration):
        return "RAM unknown"


def _git_commit() -> str:
    try:
        r = subprocess.run(["git", "-C", PKG_ROOT, "describe", "--always", "--dirty"], capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> str:
    """One paragraph: where and with what these numbers were measured."""
    import torch

    import fsdp_fastload

    commit = _git_commit()
    return (f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {platform.node()}: {_cpu_model()}, "
            f"{os.cpu_count()} cores, {_ram_gb()}; Python {platform.python_version()}, torch "
            f"{torch.__version__}, transformers {_version('transformers')}, accelerate "
            f"{_version('accelerate')}; fsdp_fastload {fsdp_fastload.__version__}"
            f"{f' ({commit})' if commit else ''}, C++ extension "
            f"{'in use' if fsdp_fastload.extension_available() else 'NOT in use (pure-PyTorch fallback)'}.")


def method_notes(methods: list[str]) -> str:
    return "\n".join(f"- `{m}`: {METHODS[m].note}" for m in methods if METHODS[m].note)


def _fmt_s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def model_table(model_name: str, methods: list[str], results: dict, skipped: dict) -> str:
    """One checkpoint model: a row per method, ratios vs the floor row."""
    rows = {m: results.get((model_name, m), []) for m in methods}
    floor = stats(rows["floor"]) if "floor" in rows else None
    first = next((s for s in map(stats, rows.values()) if s), None)
    size = f", {first['nbytes'] / 1e6:.0f} MB moved" if first else ""
    lines = [
        f"### {model_name}: {describe(model_name)}{size}",
        "",
        "| method | timed | median s | range s | ×floor | receiver peak RSS growth MB | ×floor-RSS "
        "| non-persistent buffers (rank 1) | params (rank 0 / rank 1) | sender peak RSS growth MB "
        "| CPU s (rank 0 / rank 1) | ×floor-CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        timed = "end to end" if METHODS[m].end_to_end else "transfer"
        if m in skipped:
            lines.append(f"| {m} | {timed} | – | – | – | – | – | {skipped[m]} | | | | |")
            continue
        st = stats(rows[m])
        if st is None:
            lines.append(f"| {m} | {timed} | – | – | – | – | – | ERROR: {first_error(rows[m])} | | | | |")
            continue
        xf = f"{st['median'] / floor['median']:.1f}×" if floor else "–"
        xr = f"{st['rss'] / floor['rss']:.2f}×" if floor and floor["rss"] > 0 else "–"
        params = "–" if not METHODS[m].check else f"{st['rank0_params']} / {st['params']}"
        failed = f" ({st['failed']} runs failed)" if st["failed"] else ""
        lines.append(
            f"| {m}{failed} | {timed} | {_fmt_s(st['median'])} | {_fmt_s(st['lo'])}–{_fmt_s(st['hi'])} "
            f"| {xf} | {st['rss'] / 1e6:.0f} | {xr} | {st['buffers']} | {params} | {st['sender_rss'] / 1e6:.0f} "
            f"| {_cpu(st)} | {_cpu_ratio(st, floor)} |")
    return "\n".join(lines)


def _cpu(st: dict) -> str:
    if st["cpu"] is None or st["receiver_cpu"] is None:
        return "–"
    return f"{_fmt_s(st['cpu'])} / {_fmt_s(st['receiver_cpu'])}"


def _cpu_ratio(st: dict, floor: dict | None) -> str:
    """Both ranks' CPU time against the floor's: what a method costs the machine, not only the clock."""
    if floor is None or None in (st["cpu"], st["receiver_cpu"], floor["cpu"], floor["receiver_cpu"]):
        return "–"
    base = floor["cpu"] + floor["receiver_cpu"]
    return f"{(st['cpu'] + st['receiver_cpu']) / base:.1f}×" if base > 0 else "–"


MODELS_INTRO = (
    "Rank 0 loads a bf16 Llama checkpoint with `from_pretrained` (setups `plain`, `fsdp2`) or builds it "
    "on `meta` like rank 1 (setup `meta`: the method reads the checkpoint itself). Timed: after "
    "`dist.barrier()`, the method only (receiver-side `to_empty`/re-tie included where a method needs "
    "it), max over ranks; `timed = end to end` rows include reading the checkpoint, `transfer` rows do "
    "not. Receiver RSS growth: peak over the timed phase minus RSS just before it, on rank 1 (the "
    "kernel's own peak, VmHWM, reset just before the call through /proc/self/clear_refs: nothing runs "
    "beside the timed call; where a process may not reset it, a background thread reading "
    "/proc/self/statm and the ru_maxrss delta, both lower bounds). Buffers: "
    "rank 1's non-persistent buffers vs rank 0's `from_pretrained` ones. Params: every state_dict "
    "tensor (the full tensor for FSDP2 shards) vs the `from_pretrained` model, bitwise (crc32). Rank "
    "0's `from_pretrained` tensors are mmap-backed (page cache warm): the sender's RSS growth includes "
    "faulting those pages in for every method that reads the weights; `floor`/`limit` read an "
    "anonymous filled buffer. CPU: each rank's process CPU time over the timed phase (every thread, "
    "kernel time included: page faults, socket copies; with `--rss thread` the sampling thread's too), "
    "median over the runs; ×floor-CPU: both ranks' medians together against the floor's. Two ranks on C cores take at least (their CPU) / C of wall time: "
    "where that is near the timed column, the method is CPU-bound on this machine.")

SWEEP_INTRO = (
    "Plain `nn.Module` trees (float32 parameters of equal size, blocks of 100; no transformers), src-model "
    "flow: rank 0 holds the filled module, rank 1 the same on `meta`; `ours` = `materialize(model, "
    "\"cpu\")`, `floor` = one flat `dist.broadcast` of the same bytes into fresh `torch.empty` memory "
    "(measured once per byte total). Seconds: median over the runs (range in brackets), max over "
    "ranks. ×1 tensor: the same method on one tensor of the same bytes (per-tensor overhead). "
    "Receiver peak RSS growth: rank 1, during the timed phase. Params: rank 1's tensors vs rank 0's, "
    "bitwise.")


def document(*, commands: str, runs: int, touch: float, prefault_gb: float, model_sections: list[str],
             model_methods: list[str], sweep_section: str | None, sweep_methods: list[str],
             plot_note: str | None) -> str:
    """The whole markdown file."""
    out = [
        "# fsdp_fastload benchmark", "",
        machine(), "",
        f"2 gloo ranks on this machine, `OMP_NUM_THREADS=1`, 2 fresh processes per run, {runs} run(s) per "
        f"row. First touch of fresh memory (256 MB, new process, before the runs): {touch:.2f} s/GB"
        f"{f'; {prefault_gb:g} GB prefaulted first' if prefault_gb else ''}.", "",
        "Reproduce:", "", "```bash", commands, "```", "",
    ]
    if model_sections:
        out += ["## Checkpoint models: our paths vs the floor and the peers", "", MODELS_INTRO, "",
                method_notes(model_methods), "", "\n\n".join(model_sections), ""]
    if sweep_section is not None:
        out += ["## Scaling sweep", "", SWEEP_INTRO, "", method_notes(sweep_methods), "", sweep_section, ""]
        out += [f"_{plot_note}_" if plot_note else "![sweep](sweep.png)", ""]
    return "\n".join(out)

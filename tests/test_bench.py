"""`python -m fsdp_fastload bench`: the sweep's arithmetic and tables, a failing run reported (not hung),
and one tiny end-to-end invocation (a tiny checkpoint model and one sweep point, real 2-rank runs)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from fsdp_fastload.bench import cli, report, sweep
from fsdp_fastload.bench.runner import Job, Settings, launch


def test_import_stays_lean():
    code = ("import sys, fsdp_fastload.bench; "
            "print([m for m in ('transformers', 'accelerate', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_sizes_and_points():
    assert sweep.parse_bytes("64M") == 64_000_000 and sweep.parse_bytes("2GB") == 2 * 10**9
    assert sweep.parse_bytes("4000") == 4000
    with pytest.raises(ValueError, match="not a size"):
        sweep.parse_bytes("lots")
    with pytest.raises(ValueError, match="multiple of 400"):
        sweep.Point(100, 1001)
    assert sweep.Point(100_000, 64_000_000).model == {"kind": "synthetic", "count": 100_000, "numel": 160}


def test_plan_and_jobs():
    sp = sweep.plan([1000, 100], 64_000_000, [256_000_000, 64_000_000], 1000, ["ours"])
    assert [p.count for p in sp.by_count] == [1, 100, 1000]  # 1 tensor added: the reference
    assert sp.methods == ["floor", "ours"]
    keys = [j.key for j in sweep.jobs(sp)]
    # (b)'s 1000 x 64 MB is (a)'s last point; the floor runs once per byte total
    assert keys == [("floor", 64_000_000), ("ours", 1, 64_000_000), ("ours", 100, 64_000_000),
                    ("ours", 1000, 64_000_000), ("floor", 256_000_000), ("ours", 1000, 256_000_000)]


def _run(s, rss=1e6, params="ok"):
    return {"elapsed_s": s, "rss_growth": rss, "sender_rss_growth": 0, "nbytes": 1, "params": params}


def test_tables_ratios_and_goal():
    sp = sweep.plan([100], 4_000_000, [], 1000, ["ours"])
    results = {("floor", 4_000_000): [_run(0.1), _run(0.3), _run(0.2)],
               ("ours", 1, 4_000_000): [_run(0.4)],
               ("ours", 100, 4_000_000): [{"error": "TIMEOUT after 9s (hang?)", "detail": ["x"], "logs": ""},
                                          _run(1.0, params="MISMATCH (1 differ)")]}
    md = sweep.tables(sp, results)
    assert "| 1 | 4 MB | 0.200 | 0.400 (0.400–0.400) | 2.00× | 1.00× | 1 / 1 | ok |" in md
    assert ("| 100 | 40 kB | 0.200 | 1.000 (1.000–1.000; 1 failed) | 5.00× | 2.50× | 1 / 1 "
            "| MISMATCH (1 differ) |") in md
    assert "100 tensors take 2.50× the time of 1 tensor" in md and "NOT met" in md


def test_model_table_gives_each_ranks_cpu_and_both_against_the_floor():
    """The CPU columns: rank 0 / rank 1 medians, and both ranks' together against the floor's; a row
    whose runs predate the measurement shows none."""
    def run(s, cpu0, cpu1):
        return dict(_run(s), cpu_s=cpu1, sender_cpu_s=cpu0)

    results = {("tiny", "floor"): [run(0.05, 0.01, 0.04), run(0.04, 0.02, 0.05), run(0.06, 0.01, 0.03)],
               ("tiny", "ours"): [run(0.08, 0.10, 0.06), run(0.09, 0.12, 0.07)],
               ("tiny", "ours_sd"): [_run(0.1)]}
    md = report.model_table("tiny", ["floor", "ours", "ours_sd"], results, {})
    assert "| CPU s (rank 0 / rank 1) | ×floor-CPU |" in md, md
    assert "| 0.010 / 0.040 | 1.0× |" in md, md  # floor: medians 0.01 and 0.04
    assert "| 0.110 / 0.065 | 3.5× |" in md, md  # ours: (0.11 + 0.065) / (0.01 + 0.04)
    assert md.splitlines()[-1].endswith("| – | – |"), md


def test_bound_rows_are_read_against_the_loader():
    """A `*_bound` method is not a loader: its goal line compares it with the loader's 1-tensor time."""
    sp = sweep.plan([100], 4_000_000, [], 1000, ["ours", "install_bound"])
    results = {("floor", 4_000_000): [_run(0.2)],
               ("ours", 1, 4_000_000): [_run(0.4)], ("ours", 100, 4_000_000): [_run(1.0)],
               ("install_bound", 1, 4_000_000): [_run(0.01)], ("install_bound", 100, 4_000_000): [_run(0.8)]}
    md = sweep.tables(sp, results)
    assert "ours: 100 tensors take 2.50× the time of 1 tensor" in md
    assert "install_bound alone at 100 tensors takes 2.00× the time of ours for 1 tensor" in md
    assert "install_bound: 100 tensors take" not in md
    assert "install_bound ×1 tensor of ours" in md and "| 0.800 (0.800–0.800) | 4.00× | 2.00× |" in md


def test_install_bound_installs_every_tensor():
    """The bound does the per-tensor work it claims on a receiver: every parameter and buffer replaced
    by a real tensor of the same class, shape, dtype and requires_grad, all in one flat buffer."""
    import torch
    from torch import nn

    import models
    from fsdp_fastload.bench.methods import m_install_bound

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False))
    model[2].weight.requires_grad_(False)
    before = {n: (type(t), t.shape, t.dtype, t.requires_grad) for n, t in model.state_dict(keep_vars=True).items()}
    class Ctx:
        src = 0

    m_install_bound(model, 1, Ctx)
    after = model.state_dict(keep_vars=True)
    assert {n: (type(t), t.shape, t.dtype, t.requires_grad) for n, t in after.items()} == before
    assert not any(t.is_meta for t in after.values())
    assert models.one_allocation(list(after.values())) == []  # each its own storage, in one buffer


def _read_bcast_worker(rank, world, ckpt_dir):
    from pathlib import Path

    import torch.distributed as dist

    from fsdp_fastload.bench.methods import Ctx, _read_bcast_prepare, m_read_bcast_bound

    ctx = Ctx(rank=rank, world_size=world, src=0, group=dist.group.WORLD, ckpt_dir=Path(ckpt_dir),
              ckpt_file=None, nbytes=0)
    _read_bcast_prepare(None, rank, ctx)
    m_read_bcast_bound(None, rank, ctx)
    return bytes(ctx.state["buf"].numpy())


def test_read_bcast_bound_delivers_the_data_sections(tmp_path):
    """The bound reads every file's data section on rank 0 (in several pieces) and every rank ends
    with exactly those bytes, files in order."""
    import torch
    from safetensors.torch import save_file

    from dist_harness import run_ranks

    g = torch.Generator().manual_seed(0)
    want = b""
    for k in range(2):
        path = tmp_path / f"model-0000{k + 1}-of-00002.safetensors"
        save_file({f"w{k}.{i}": torch.randn(1000 + i, generator=g) for i in range(1200)}, str(path))
        raw = path.read_bytes()
        want += raw[8 + int.from_bytes(raw[:8], "little"):]
    assert len(want) > 8 << 20  # several of the bound's 4 MiB pieces
    assert run_ranks(_read_bcast_worker, 2, str(tmp_path)) == [want, want]


def _sd_bound_worker(rank, world, ckpt_dir):
    from pathlib import Path

    import torch
    import torch.distributed as dist
    import transformers

    from fsdp_fastload.bench.methods import Ctx, _sd_bound_prepare, m_sd_bound

    config = transformers.AutoConfig.from_pretrained(ckpt_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    ctx = Ctx(rank=rank, world_size=world, src=0, group=dist.group.WORLD, ckpt_dir=Path(ckpt_dir),
              ckpt_file=None, nbytes=0)
    _sd_bound_prepare(model, rank, ctx)
    m_sd_bound(model, rank, ctx)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt_dir).state_dict()
    got = model.state_dict()
    return sorted(n for n, t in ref.items() if got[n].is_meta or not torch.equal(got[n], t))


def test_sd_bound_installs_the_checkpoint_on_every_rank(tmp_path):
    """The bound does the real work it claims (else it bounds nothing): after it, every rank's model
    holds every checkpoint tensor, bit for bit, from a sharded checkpoint of two files."""
    import torch
    import transformers

    from dist_harness import run_ranks

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, max_shard_size="60KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert run_ranks(_sd_bound_worker, 2, str(tmp_path)) == [[], []]


def test_failed_run_is_reported(tmp_path):
    job = Job(key=("x",), label="[test] missing", method="no_such_method",
              model={"kind": "synthetic", "count": 1, "numel": 4})
    r = launch(job, Settings(logdir=tmp_path, timeout=60, rss_interval_ms=0, check=True), "missing")
    assert "error" in r and any("KeyError" in d for d in r["detail"]), r


def _row(*cells: str) -> str:
    """A regex for one markdown table row."""
    return r"\| " + r" \| ".join(cells) + r" \|"


S, RANGE, X = r"[0-9.]+", r"[0-9.]+ \([0-9.–]+\)", r"[0-9.]+×"


def test_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["--models", "tiny", "--methods", "ours", "--sweep-counts", "100",
                   "--sweep-bytes", "400K", "--sweep-sizes", "none", "--sweep-methods", "ours",
                   "--runs", "1", "--warmup", "0",
                   "--cache", str(tmp_path / "cache"), "--out", str(out)])
    assert rc == 0
    md = (out / "bench.md").read_text()
    assert "python -m fsdp_fastload bench --models tiny" in md  # the command to reproduce
    assert "C++ extension" in md and "cores" in md
    # the model table: ours moved every tensor and the rotary buffers bit for bit
    assert re.search(_row("ours", "transfer", S, "[0-9.–]+", "–", r"\d+", "–", "correct", "ok / ok"), md), md
    # each rank's CPU time in the call (no floor row here: no ratio)
    assert re.search(_row("ours", "transfer", S, "[0-9.–]+", "–", r"\d+", "–", "correct", "ok / ok", r"\d+",
                          f"{S} / {S}", "–"), md), md
    # the sweep: 1 tensor (the reference) and 100 tensors, both checked bitwise
    assert re.search(_row("1", "400 kB", S, RANGE, X, r"1\.00×", r"\d+ / \d+", "ok"), md), md
    assert re.search(_row("100", "4 kB", S, RANGE, X, X, r"\d+ / \d+", "ok"), md), md
    assert "ours: 100 tensors take" in md
    assert "ERROR" not in md
    assert "run 1/1" in capsys.readouterr().out  # a progress line per run


@pytest.mark.parametrize("kernel", [True, False])
def test_peak_rss_of_a_call_is_seen(kernel):
    """The bench's receiver-RSS column: 64 MB touched and freed inside the measured span shows as
    growth, whether the kernel's high-water mark (reset first; no thread beside the call) or the
    sampling thread finds it. On a Linux that refuses the reset, the kernel mode falls back to the
    thread, and says so."""
    import time

    import torch

    from fsdp_fastload.bench.worker import RssSampler

    s = RssSampler(0.001, kernel=kernel)
    before = s.rss()
    s.start()
    x = torch.ones(64 * 2**20, dtype=torch.uint8)  # touched: resident
    time.sleep(0.05)
    del x
    peak = s.stop()
    assert peak - before >= 60 * 2**20, (s.how, peak - before)
    assert s.how == ("kernel" if kernel and s._thread is None else "sampled")
    if not kernel:
        assert s.samples > 0

"""`python -m fsdp_fastload demo`: the README's "run it" command, end to end in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys

import models


def test_demo_verifies_both_flows(tmp_path):
    path = models.make_checkpoint("qwen2_tied", str(tmp_path))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "fsdp_fastload", "demo", "--model", path, "--nproc", "2"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["src-model"], ["checkpoint"])]
    assert sorted((r[0], r[1]) for r in rows) == [("checkpoint", "0"), ("checkpoint", "1"),
                                                  ("src-model", "0"), ("src-model", "1")], out.stdout
    assert all(r[-1] == "identical" for r in rows), out.stdout
    assert "VERIFIED: every rank's parameters, buffers and logits are identical" in out.stdout


def test_demo_reports_a_missing_model_dir(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fsdp_fastload", "demo", "--model", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "nope" in out.stdout + out.stderr

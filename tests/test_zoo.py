"""The architecture sweep (`scripts/zoo_check.py`) as a test: ~160 transformers architectures (its own
table and `zoo_more.py`), nearly all absent from the other tests (encoder-decoders with shared embeddings,
ALiBi, Mamba/Mamba2/RWKV/hybrids, Conv1D, vision, detection, audio, dual-tower CLIP, LLaVA, weight-norm
parametrizations, renamed checkpoint keys, MoE experts that transformers fuses on load, parameters
transformers does not save, buffers an ancestor's initializer sets, empty parameters), on 2 gloo ranks:
both flows, and FSDP2 shards from the checkpoint directory; every tensor (full tensors of the shards),
the tie groups and the forward output bit for bit against `from_pretrained`. Only the cases the sweep
lists in `REFUSED` may be refused, with the error named there."""
import os
import time

import pytest
import torch.multiprocessing as mp

SCRIPTS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "scripts"))


def test_architecture_sweep(capsys, monkeypatch):
    monkeypatch.syspath_prepend(SCRIPTS)  # spawned ranks import zoo_check by name (sys.path travels)
    import zoo_check

    rc = zoo_check.main([])
    out = capsys.readouterr().out
    assert rc == 0 and "0 failing case(s)" in out, out
    assert "cannot build here" not in out, out


def _abort_in_a_case(rank: int, q) -> None:
    q.put(("case", rank, "some_arch dir"))
    if rank == 1:
        time.sleep(0.5)  # into the case (its message sent: a queue's feeder thread, not put(), writes it)
        os.abort()  # a C++ abort in one rank (what SIGABRT looks like)
    time.sleep(120)  # its peer would wait in a collective


def _stuck_in_a_case(rank: int, q) -> None:
    q.put(("case", rank, "some_arch fsdp2"))
    time.sleep(120)


def _report(rank: int, q) -> None:
    q.put(("case", rank, "some_arch model"))
    q.put(("done", rank, {("some_arch", "model"): "ok"}))


@pytest.mark.parametrize("target", ["abort", "stuck", "done"])
def test_sweep_watchdog_says_at_once_which_rank_died_or_hung(target, monkeypatch):
    """The sweep's parent neither waits for a dead rank nor for a hung one: it names the rank, its exit
    code and the case it was in, or that no case started for `stall` seconds; in seconds, not hours."""
    monkeypatch.syspath_prepend(SCRIPTS)
    import zoo_check

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    fn = {"abort": _abort_in_a_case, "stuck": _stuck_in_a_case, "done": _report}[target]
    procs = [ctx.Process(target=fn, args=(r, q), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    try:
        got, problem = zoo_check._collect(procs, q, stall=5)
    finally:
        for p in procs:
            p.kill()
            p.join()
    assert time.monotonic() - t0 < 60
    if target == "abort":
        assert problem == ("rank 1 exited with code -6 (killed by signal 6) without reporting, "
                           "in case 'some_arch dir'"), problem
    elif target == "stuck":
        assert problem is not None and problem.startswith("no rank started a new case for 5 s (hang?)"), problem
        assert "some_arch fsdp2" in problem, problem
    else:
        assert problem is None and got == {r: {("some_arch", "model"): "ok"} for r in range(2)}, (got, problem)

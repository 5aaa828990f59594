"""Failures once data moves, on real gloo ranks: a peer that dies or stalls mid-load, a checkpoint that
breaks after its header was checked, a rank that fails after the agreement (out of memory, src unable
to prepare its sends, its work while bytes arrive). Every surviving rank raises a MaterializeError
(never hangs), src's module is exactly as it was (same tensor objects, same values), receivers are
still all meta, and the group stays in step for a good load afterwards.

Faults are injected in one worker only: a wrapper around `torch.distributed.broadcast` that, at the
k-th bucket broadcast of the fill, exits the process (`os._exit(17)`) or sleeps; a wrapper around
`source.parse_header` that truncates the file right after its header was validated; a replaced step
of materialize's own (building src's packers, preparing the objects to install); or a real memory
limit (`RLIMIT_AS`) on one rank.
"""
from __future__ import annotations

import os
import re
import shutil
import time

import pytest
import torch
from torch import nn

import models
from dist_harness import Died, run_ranks

from fsdp_fastload.comm import default_timeout

EXIT_CODE = 17
BUCKET = 16 << 10  # small buckets: the fill is ~20 broadcasts, so a fault at the 3rd is mid-load


class FaultNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(128, 128) for _ in range(16)])
        self.register_buffer("steps", torch.arange(10))

    def forward(self, x):
        return self.layers(x) + self.steps.sum()


def _build(real: bool, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    if real:
        return FaultNet().to(dtype)
    with torch.device("meta"):
        return FaultNet().to(dtype)


_tensors = models.tensors


def _snapshot(model):
    return {n: (t, None if t.is_meta else t.detach().clone()) for n, t in _tensors(model).items()}


def _changes(model, before) -> list[str]:
    """Every way `model` differs from `before`: a tensor replaced, its values changed, meta no more."""
    bad, after = [], _tensors(model)
    for n, (t, val) in before.items():
        if after[n] is not t:
            bad.append(f"{n}: replaced by a new tensor")
        elif val is not None and not torch.equal(after[n], val):
            bad.append(f"{n}: values changed")
        elif val is None and not after[n].is_meta:
            bad.append(f"{n}: no longer meta")
    return bad


def _arm(rank: int, fault: dict | None) -> None:
    """In this worker only: make the `fault["at"]`-th bucket broadcast of the fill die or stall."""
    if fault is None or rank != fault["rank"]:
        return
    import torch.distributed as dist

    real, calls = dist.broadcast, [0]

    def broadcast(tensor, *args, async_op=False, **kwargs):
        if async_op:  # the fill's buckets (the layout broadcast before them is synchronous)
            calls[0] += 1
            if calls[0] == fault["at"]:
                if fault["do"] == "stall":
                    time.sleep(fault["seconds"])
                else:  # die with this bucket on its way: mid-transfer
                    real(tensor, *args, async_op=True, **kwargs)
                    os._exit(EXIT_CODE)
        return real(tensor, *args, async_op=async_op, **kwargs)

    dist.broadcast = broadcast


def _poll_waits() -> None:
    """In this worker only: every bucket wait polls for completion first, as CUDA targets' do (see
    `comm.Broadcasts.poll`), so that path runs here on gloo."""
    from fsdp_fastload import comm

    real = comm.Broadcasts.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.poll = True

    comm.Broadcasts.__init__ = init


def _fault_worker(rank, world, fault, source, path, timeout, poll=False):
    from fsdp_fastload import MaterializeError, materialize

    _arm(rank, fault)
    if poll:
        _poll_waits()
    model = _build(real=(rank == 0 and source == "model"))
    before = _snapshot(model)
    kwargs = {} if timeout is None else {"timeout": timeout}
    t0 = time.perf_counter()
    try:
        materialize(model, "cpu", state_dict=path if rank == 0 and source == "file" else None,
                    bucket_size=BUCKET, **kwargs)
        return {"type": None, "msg": "no error"}
    except MaterializeError as e:
        return {"type": type(e).__name__, "msg": str(e), "elapsed": time.perf_counter() - t0,
                "changes": _changes(model, before),
                "all_meta": all(t.is_meta for t in _tensors(model).values())}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from safetensors.torch import save_file

    path = str(tmp_path_factory.mktemp("faults") / "model.safetensors")
    save_file({k: v.contiguous() for k, v in _build(real=True).state_dict().items()}, path)
    return path


BUCKET_MSG = (r"fsdp_fastload\.materialize \(rank {rank}\): the broadcast of bucket (\d+) of (\d+) "
              r"\(bytes \[(\d+), (\d+)\) of (\d+), from src rank 0\) ")
DIED_MSG = (r"failed after [\d.]+ s \(timeout={timeout} s\): RuntimeError: .*(?:Connection closed by peer|"
            r"Connection reset by peer|Broken pipe).* "
            r"A peer rank most likely died: look for the first error in the other ranks' logs\.")
TIMED_OUT_MSG = (r"timed out \(waited [\d.]+ s, timeout={timeout} s\)\. A peer rank stalled or died: look for "
                 r"the first error in the other ranks' logs\.")
FIX_MSG = ("Nothing was installed on this rank (its module is as it was). Restart the job; if a load this "
           "slow is expected, pass a larger materialize(..., timeout=<seconds>).")


def _check_survivor(rank, res, *, problem: str, max_s: float, source: str) -> None:
    assert res["type"] == "MaterializeError", f"rank {rank}: {res}"
    msg = res["msg"]
    m = re.match(BUCKET_MSG.format(rank=rank) + problem, msg)
    assert m, f"rank {rank}: {msg!r} !~ {BUCKET_MSG.format(rank=rank) + problem!r}"
    k, n, a, b, total = map(int, m.groups()[:5])
    assert 1 <= k <= n and 0 <= a < b <= total and n > 8, msg
    assert msg.endswith(FIX_MSG), msg
    assert res["elapsed"] < max_s, f"rank {rank} took {res['elapsed']:.1f} s to fail (limit {max_s} s)"
    assert res["changes"] == [], f"rank {rank}: a failed call changed the module: {res['changes']}"
    holds_weights = rank == 0 and source == "model"
    assert res["all_meta"] is (not holds_weights), f"rank {rank}: all_meta={res['all_meta']}"


@pytest.mark.parametrize("world,dead,source,timeout", [
    (2, 1, "model", None),   # a receiver dies; src sends from its own tensors; default timeout (60 s)
    (2, 0, "file", None),    # src dies while sending from a checkpoint file
    (3, 1, "model", 5),      # a receiver dies; src and the other receiver must both raise
    (3, 0, "file", 5),       # src dies; both receivers raise
])
def test_peer_dies_mid_fill(ckpt, world, dead, source, timeout):
    fault = {"rank": dead, "at": 3, "do": "die"}
    results = run_ranks(_fault_worker, world, fault, source, ckpt, timeout, timeout=120,
                        expect_dead=(dead,))
    assert isinstance(results[dead], Died) and results[dead].exitcode == EXIT_CODE, results[dead]
    shown = "60" if timeout is None else str(timeout)
    for rank, res in enumerate(results):
        if rank == dead:
            continue
        # Survivors connected to the dead rank see its closed connection at once; in a 3-rank
        # broadcast a rank may instead wait on a peer that has already given up: the timeout ends it.
        problem = f"(?:{DIED_MSG}|{TIMED_OUT_MSG})".format(timeout=shown)
        _check_survivor(rank, res, problem=problem, max_s=(timeout or 0) + 20, source=source)


@pytest.mark.parametrize("stalled,source,poll", [(0, "model", False), (1, "file", False), (0, "file", True)])
def test_stalled_peer_hits_the_timeout(ckpt, stalled, source, poll):
    # The stalled rank sleeps 6 s inside its 3rd bucket broadcast; the other rank waits at most
    # timeout=1.5 s for any one bucket, raises, and says so. The sleeper then finds its peer gone (or
    # times out itself): it raises too, its module unchanged. poll: the waits poll first (CUDA's way).
    fault = {"rank": stalled, "at": 3, "do": "stall", "seconds": 6}
    results = run_ranks(_fault_worker, 2, fault, source, ckpt, 1.5, poll, timeout=120)
    other = 1 - stalled
    _check_survivor(other, results[other], problem=TIMED_OUT_MSG.format(timeout=1.5), max_s=5, source=source)
    res = results[stalled]
    assert res["type"] == "MaterializeError" and re.match(BUCKET_MSG.format(rank=stalled), res["msg"]), res
    assert res["changes"] == [], res["changes"]


def _polled_load_worker(rank, world, path):
    from fsdp_fastload import materialize

    _poll_waits()
    got = {}
    for source in ("model", "file"):
        model = _build(real=(rank == 0 and source == "model"))
        materialize(model, "cpu", state_dict=path if rank == 0 and source == "file" else None,
                    bucket_size=BUCKET, max_inflight=2)
        ref = _tensors(_build(real=True))
        got[source] = [n for n, t in _tensors(model).items() if t.is_meta or not torch.equal(t, ref[n])]
    return got


def test_polled_waits_load_bit_exact(ckpt):
    """The CUDA targets' waits (poll for completion, then wait) forced on gloo: every bucket arrives."""
    for rank, got in enumerate(run_ranks(_polled_load_worker, 2, ckpt, timeout=120)):
        assert got == {"model": [], "file": []}, f"rank {rank}: {got}"


def _dies_before_materialize_worker(rank, world):
    from fsdp_fastload import MaterializeError, materialize

    if rank == 1:
        os._exit(EXIT_CODE)
    model = _build(real=True)
    before = _snapshot(model)
    try:
        materialize(model, "cpu")
    except MaterializeError as e:
        return str(e), _changes(model, before)
    return "no error", []


def test_peer_gone_before_the_agreement():
    res = run_ranks(_dies_before_materialize_worker, 2, timeout=120, expect_dead=(1,))
    assert isinstance(res[1], Died) and res[1].exitcode == EXIT_CODE
    msg, changes = res[0]
    assert re.match(r"fsdp_fastload\.materialize \(rank 0\): exchanging status with the other ranks failed "
                    r"\(RuntimeError: .*\)\. A peer rank most likely died, or did not reach materialize within "
                    r"the process group's timeout", msg), msg
    assert changes == []


# ------------------------------------------------------------ src's checkpoint breaks mid-load


def _truncating_parse_header(real):
    """parse_header that validates the real header, then cuts 'trunc*' files to half their size."""

    def parse(path):
        out = real(path)
        if os.path.basename(path).startswith("trunc"):
            _change(path, None)
        return out
    return parse


def _change(path: str, other: str | None) -> None:
    """'trunc*': cut to half its size; with `other` (a checkpoint of the same model with other values:
    the same header, so the same size and offsets), 'replaced*': replaced by a copy of it (a new inode
    under the same name, as a save that writes a temporary file and renames it), 'rewritten*':
    overwritten with its bytes in place (same inode and size; only the modification time tells)."""
    name = os.path.basename(path)
    if name.startswith("trunc"):
        os.truncate(path, os.path.getsize(path) // 2)
    elif name.startswith("replaced"):
        shutil.copy(other, path + ".tmp")
        os.replace(path + ".tmp", path)
    elif name.startswith("rewritten"):
        with open(other, "rb") as f, open(path, "r+b") as g:
            g.write(f.read())


def _changing_reads(real, other: str, at: int):
    """ops.read_ranges that changes a file (`_change`) just before its `at`-th read: mid-load, after
    buckets read from the file as it was are on their way."""
    calls: dict = {}

    def read_ranges(path, *args, **kwargs):
        calls[path] = calls.get(path, 0) + 1
        if calls[path] == at:
            _change(path, other)
        return real(path, *args, **kwargs)
    return read_ranges


def _truncated_worker(rank, world, files, other):
    import fsdp_fastload.ops as ops
    from fsdp_fastload import MaterializeError, materialize

    if rank == 0:
        ops.read_ranges = _changing_reads(ops.read_ranges, other, at=3)
    out = {}
    for name, (path, dtype) in files.items():
        model = _build(real=False, dtype=dtype)
        before = _snapshot(model)
        try:
            materialize(model, "cpu", state_dict=path if rank == 0 else None, bucket_size=BUCKET,
                        poison=True)
            ref = _tensors(_build(real=True, dtype=dtype))  # the values of the file as its header was read
            out[name] = ("no error", [n for n, t in _tensors(model).items() if not torch.equal(t, ref[n])])
        except MaterializeError as e:
            out[name] = (str(e), _changes(model, before))
    # The collective sequence stayed in step through those failures: a good load still works.
    model = _build(real=False)
    materialize(model, "cpu", state_dict=files["good"][0] if rank == 0 else None, bucket_size=BUCKET,
                verify=True)
    ref = _build(real=True)
    out["after"] = [n for n, t in _tensors(model).items() if not torch.equal(t, _tensors(ref)[n])]
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_checkpoint_changed_mid_load_raises_on_every_rank(ckpt, tmp_path, world):
    """A checkpoint file truncated or rewritten in place with other values while src reads it (after
    its header was checked and the first buckets were read): every rank raises, naming the file. One
    replaced by another file under its name (a save that renames a new file over it) loads the file
    whose header was read, bit for bit: src reads the file it opened. (Before, reading by name, the
    last two loaded a mix of both files' values without a word.)"""
    from safetensors.torch import save_file

    other = str(tmp_path / "other.safetensors")  # same model, other values: the same header
    save_file({k: v.contiguous() + 1 for k, v in _build(real=True).state_dict().items()}, other)
    files = {}
    for name in ["trunc", "replaced", "rewritten"]:
        for dtype in [torch.float32, torch.bfloat16]:
            key = f"{name}_{str(dtype)[6:]}"
            files[key] = (str(tmp_path / f"{key}.safetensors"), dtype)
            shutil.copy(ckpt, files[key][0])
    files["good"] = (ckpt, torch.float32)
    results = run_ranks(_truncated_worker, world, files, other, timeout=180)
    for rank, res in enumerate(results):
        assert res.pop("after") == [], f"rank {rank}: a good load after the failures differs"
        assert res.pop("good") == ("no error", [])
        for name in ["replaced_float32", "replaced_bfloat16"]:
            assert res.pop(name) == ("no error", []), f"rank {rank} {name}"
        assert len(res) == 4, res
        for name, (msg, changes) in res.items():
            path = files[name][0]
            # fp32: the bucket's read_ranges fails; bf16: src's whole-tensor read for conversion fails.
            pattern = (rf"fsdp_fastload\.materialize failed on all ranks \(this is rank {rank}\): rank 0: src "
                       rf"could not read/pack bucket (\d+) of (\d+) \(bytes \[\d+, \d+\) of \d+; "
                       rf"tensors? '[\w.]+'(, '[\w.]+')*( and \d+ more)?\): RuntimeError: "
                       rf"fsdp_fastload read_ranges: {re.escape(path)} changed since its layout was read \(its "
                       r"inode, size or modification time differ\): was it written to or replaced during the "
                       r"load \(a checkpoint saved again\)\? .* If a checkpoint file changed after materialize read its header "
                       r"\(truncated, rewritten, a failing disk\), restore it and retry\. Nothing was installed "
                       r"on any rank\.$")
            m = re.match(pattern, msg)
            assert m, f"rank {rank} {name}: {msg!r} !~ {pattern!r}"
            assert 1 < int(m.group(1)) < int(m.group(2)), f"not a mid-load failure: {msg}"
            assert changes == [], f"rank {rank} {name}: {changes}"


def test_truncated_checkpoint_without_process_group(ckpt, tmp_path, monkeypatch):
    import fsdp_fastload.source as source
    from fsdp_fastload import MaterializeError, materialize

    path = str(tmp_path / "trunc.safetensors")
    shutil.copy(ckpt, path)
    monkeypatch.setattr(source, "parse_header", _truncating_parse_header(source.parse_header))
    model = _build(real=False)
    before = _snapshot(model)
    with pytest.raises(MaterializeError, match=rf"^fsdp_fastload\.materialize: could not read/pack bucket \d+ "
                       rf"of \d+ \(bytes \[\d+, \d+\); tensors? '[\w.]+'.*\): RuntimeError: fsdp_fastload read_ranges: "
                       rf"{re.escape(path)} changed since its layout was read .*Check that the checkpoint is complete and unchanged; the "
                       r"module was left as it was\.$"):
        materialize(model, "cpu", state_dict=path, bucket_size=BUCKET)
    assert _changes(model, before) == []


# ------------------------------------------------------------ the timeout option itself


def test_default_timeout_rule():
    assert default_timeout(0) == 60.0
    assert default_timeout(3 * 10**9) == 60.0  # 3 GB at 50 MB/s is exactly a minute
    assert default_timeout(14 * 10**9) == 280.0  # a 7B bf16 model: under 5 minutes per wait


def _bad_timeout_worker(rank, world):
    from fsdp_fastload import MaterializeError, materialize

    out = []
    for bad in (0, -1, float("nan"), float("inf"), "5", True):
        model = _build(real=rank == 0)
        try:
            materialize(model, "cpu", timeout=bad if rank == 1 else 30)
            out.append("no error")
        except MaterializeError as e:
            out.append(str(e))
    model = _build(real=rank == 0)
    materialize(model, "cpu", timeout=10)  # after all those refusals the group is still in step
    out.append([n for n, t in _tensors(model).items() if not torch.equal(t, _tensors(_build(True))[n])])
    return out


def test_bad_timeout_raises_on_every_rank():
    for rank, res in enumerate(run_ranks(_bad_timeout_worker, 2)):
        assert res.pop() == []
        for bad, msg in zip(("0", "-1", "nan", "inf", "'5'", "True"), res):
            assert re.match(rf"fsdp_fastload\.materialize failed on all ranks \(this is rank {rank}\): rank 1: "
                            rf"timeout must be a positive, finite number of seconds \(got {bad}\)\. Pass "
                            r"timeout=None for the default\.$", msg), msg


def test_meanwhile_pieces_run_in_order_and_a_failure_is_kept():
    """The work done while bytes arrive (`fill.Meanwhile`) runs a piece per `step` (what a rank does
    instead of blocking on a transfer), the rest in `finish`; a failing piece stops the work and is
    kept for after the collectives, not raised mid-transfer."""
    from fsdp_fastload.fill import Meanwhile

    ran = []

    def work():
        for i in range(3):
            ran.append(i)
            yield

    class Sends:
        idle = None

    sends = Sends()
    later = Meanwhile(work, sends)
    assert sends.idle == later.step and ran == []
    assert later.step() and ran == [0]
    later.finish()
    assert ran == [0, 1, 2] and not later.step() and later.failed is None

    def failing():
        ran.append("a")
        yield
        raise ValueError("piece two")

    ran.clear()
    later = Meanwhile(failing)
    assert later.step() and not later.step()
    later.finish()
    assert ran == ["a"] and isinstance(later.failed, ValueError)

    ran.clear()
    later = Meanwhile(lambda: ran.append("one piece"))  # a plain function: one piece
    assert not later.step() and ran == ["one piece"] and not later.step()


# ------------------------------------------------------------ a rank's own failure while bytes arrive


def _meanwhile_failure_worker(rank, world, failing, path):
    """`failing` breaks the work it does while bytes arrive (the objects to install); the model has a
    non-persistent buffer every rank recomputes, so a rank that raised alone would leave the others
    waiting in a collective."""
    import fsdp_fastload.api as api
    from fsdp_fastload import MaterializeError, materialize

    def build():
        model = _build(real=False)
        with torch.device("meta"):
            model.register_buffer("scale", torch.empty(4), persistent=False)
        return model

    def fill_scale(module):
        if "scale" in module._buffers:
            module.scale.fill_(0.5)

    real_prepare = api.prepare_install
    if rank == failing:
        def prepare(*args, **kwargs):
            raise RuntimeError("injected: could not prepare")
        api.prepare_install = prepare
    model = build()
    before = _snapshot(model)
    try:
        materialize(model, "cpu", state_dict=path if rank == 0 else None, buffer_init=fill_scale,
                    bucket_size=BUCKET)
        out = ["no error"]
    except MaterializeError as e:
        out = [str(e), _changes(model, before)]
    api.prepare_install = real_prepare
    model = build()  # the collectives stayed in step: a good load still works
    materialize(model, "cpu", state_dict=path if rank == 0 else None, buffer_init=fill_scale,
                bucket_size=BUCKET)
    ref = _build(real=True)
    out.append([n for n, t in _tensors(ref).items() if not torch.equal(t, _tensors(model)[n])])
    out.append(torch.equal(model.scale, torch.full((4,), 0.5)))
    return out


@pytest.mark.parametrize("world,failing", [(2, 1), (3, 0), (3, 2)])
def test_failure_while_bytes_arrive_raises_on_every_rank(ckpt, world, failing):
    results = run_ranks(_meanwhile_failure_worker, world, failing, ckpt, timeout=120)
    for rank, (msg, changes, after, scale_ok) in enumerate(results):
        assert re.match(rf"fsdp_fastload\.materialize failed on all ranks \(this is rank {rank}\): rank {failing}: "
                        r"preparing the tensors to install while the bytes arrived failed: RuntimeError: "
                        r"injected: could not prepare Nothing was installed\.$", msg), msg
        assert changes == [], f"rank {rank}: {changes}"
        assert after == [] and scale_ok, f"rank {rank}: the load after the failure: {after}, scale {scale_ok}"


def _assert_raised_together(results, failing: int, cause: str) -> None:
    """Every rank raised rank `failing`'s error (`cause`: a regex of its text), changed nothing in its
    module (`changes`), and the good load after it matched the reference (`after`)."""
    for rank, (msg, changes, after) in enumerate(results):
        assert re.match(rf"fsdp_fastload\.materialize failed on all ranks \(this is rank {rank}\): rank {failing}: "
                        + cause + "$", msg), msg
        assert changes == [], f"rank {rank}: {changes}"
        assert after == [], f"rank {rank}: the load after the failure differs: {after}"


def _src_prepare_failure_worker(rank, world, flow, path):
    """src fails to prepare its reads/copies (injected where it builds them: the packer of the
    replicated tensors, or with `flow="fsdp2"` the per-rank packers of the shards) after the
    agreement: it must still send every bucket, so that every rank raises its error together after
    the transfer (it raised alone before: the others waited out the bucket timeout)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import fsdp_fastload.api as api
    from fsdp_fastload import MaterializeError, fill, materialize, shard

    def build(real):
        model = _build(real=real)
        if flow == "fsdp2" and not real:
            mesh = init_device_mesh("cpu", (world,))
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model

    def load(model):
        return materialize(model, "cpu", state_dict=path if rank == 0 and not from_model else None,
                           bucket_size=BUCKET)

    from_model = flow in ("model", "window-model")  # src's own tensors, sent in place where they can be
    real = (api.make_packer, shard.rank_packers, fill.Packer, fill.WindowedPacker.WINDOW)
    if rank == 0:
        def broken(*args, **kwargs):
            raise RuntimeError("injected: cannot prepare")

        def later_window_broken(*args, only=None, **kwargs):  # made lazily, mid-transfer
            if only is not None and only != windows_made.setdefault("first", only):
                raise RuntimeError("injected: cannot prepare a later window")
            return real[2](*args, only=only, **kwargs)

        windows_made: dict = {}
        if flow == "fsdp2":
            shard.rank_packers = broken
        elif flow.startswith("window"):
            fill.Packer, fill.WindowedPacker.WINDOW = later_window_broken, 1
        else:
            api.make_packer = broken
    model = build(real=rank == 0 and from_model)
    before = _snapshot(model)
    try:
        load(model)
        out = ["no error"]
    except MaterializeError as e:
        out = [str(e), _changes(model, before)]
    api.make_packer, shard.rank_packers, fill.Packer, fill.WindowedPacker.WINDOW = real
    model = load(build(real=rank == 0 and from_model))  # the collectives stayed in step
    want = _tensors(_build(real=True))
    out.append([n for n, t in _tensors(model).items()
                if not torch.equal(t.full_tensor() if hasattr(t, "full_tensor") else t, want[n])])
    return out


@pytest.mark.parametrize("flow", ["window", "window-model"])
def test_src_that_cannot_prepare_a_later_window_raises_on_every_rank(ckpt, flow):
    """src's packer is made a window at a time during the transfer: one that cannot be made fails
    that bucket on src, which sends on, and every rank raises together after the fill (from a
    checkpoint, and from src's own tensors, where buckets are also sent straight from them)."""
    results = run_ranks(_src_prepare_failure_worker, 2, flow, ckpt, timeout=120)
    _assert_raised_together(results, 0, r"src could not read/pack bucket 2 of \d+ \(bytes \[\d+, \d+\) of \d+\): "
                            r"RuntimeError: injected: cannot prepare a later window\. .*Nothing was installed "
                            r"on any rank\.")


@pytest.mark.parametrize("world,flow", [(2, "file"), (3, "model"), (2, "fsdp2")])
def test_src_that_cannot_prepare_its_sends_raises_on_every_rank(ckpt, world, flow):
    results = run_ranks(_src_prepare_failure_worker, world, flow, ckpt, timeout=120)
    _assert_raised_together(results, 0, r"preparing to read/send the tensors failed: RuntimeError: injected: "
                            r"cannot prepare\. Nothing was installed\.")


# ------------------------------------------------------------ a rank that cannot allocate its buffer


def _no_memory_worker(rank, world):
    """Rank 1's address space is capped below the flat buffer (a real allocation failure: torch's
    CPU allocator refuses it), then restored for a good load."""
    import resource

    from fsdp_fastload import MaterializeError, materialize

    def build(real):
        torch.manual_seed(0)
        with torch.device("cpu" if real else "meta"):
            return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(64)])  # 256 MB of float32

    model = build(real=rank == 0)
    before = _snapshot(model)
    # rank 1 may map 128 MB more than it does now: threads' stacks fit, the 256 MB buffer does not
    limits = _cap_address_space(128 << 20) if rank == 1 else None
    try:
        materialize(model, "cpu")
        out = ["no error"]
    except MaterializeError as e:
        out = [str(e), _changes(model, before)]
    if limits is not None:
        resource.setrlimit(resource.RLIMIT_AS, limits)
    model = build(real=rank == 0)
    materialize(model, "cpu")  # the group is still in step
    want = _tensors(build(real=True))
    out.append([n for n, t in _tensors(model).items() if not torch.equal(t, want[n])])
    return out


def _cap_address_space(headroom: int) -> tuple:
    """This process may map `headroom` bytes more than it maps now (a real allocation limit: torch's
    CPU allocator refuses past it); returns the limits to restore."""
    import ctypes
    import resource

    limits = resource.getrlimit(resource.RLIMIT_AS)
    # one malloc arena: a new thread would otherwise reserve 64 MB of the capped address space
    ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX
    mapped = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + headroom, limits[1]))
    return limits


def _no_wire_memory_worker(rank, world, failing, sharded):
    """A bf16 checkpoint (a mapping on src) into float32 modules: the bytes travel as bf16 into a wire
    buffer each rank allocates after the agreement (its size comes with src's plan). Rank `failing`
    can map its flat buffer (the 256 MB model, or with `sharded` its 128 MB of FSDP2 shards on a
    2-rank CPU mesh) but not the wire buffer (half that): it must stay in step (receive or send every
    bucket into scratch) so that every rank raises its error together after the transfer; then a good
    load on the same group."""
    import resource

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fsdp_fastload import MaterializeError, materialize

    def build(real):
        torch.manual_seed(0)
        with torch.device("cpu" if real else "meta"):
            model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(64)])  # 256 MB of float32
        if sharded and not real:
            mesh = init_device_mesh("cpu", (world,))
            for layer in model:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model

    ref = build(real=True)
    sd = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()} if rank == 0 else None
    want = {k: v.to(torch.bfloat16).float() for k, v in ref.state_dict().items()}
    del ref
    model = build(real=False)
    before = _snapshot(model)
    flat = 256 // (world if sharded else 1)  # MB
    limits = _cap_address_space((flat + flat // 2 - 24) << 20) if rank == failing else None
    try:
        materialize(model, "cpu", state_dict=sd)
        out = ["no error"]
    except MaterializeError as e:
        out = [str(e), _changes(model, before)]
    if limits is not None:
        resource.setrlimit(resource.RLIMIT_AS, limits)
    model = build(real=False)
    materialize(model, "cpu", state_dict=sd)  # the group is still in step
    out.append([n for n, p in model.named_parameters()
                if not torch.equal(p.full_tensor() if sharded else p, want[n])])
    return out


@pytest.mark.parametrize("world,failing,sharded", [(2, 1, False), (2, 0, False), (3, 2, False), (2, 1, True)])
def test_a_rank_out_of_memory_after_the_agreement_raises_on_every_rank(world, failing, sharded):
    results = run_ranks(_no_wire_memory_worker, world, failing, sharded, timeout=180)
    wire = 128 // (world if sharded else 1)
    _assert_raised_together(results, failing, rf"could not allocate the {wire} MiB buffer for the tensors sent in a "
                            r"smaller dtype \(converted after the transfer\) on cpu \(.*can't allocate memory.*\)\. "
                            r"Free host memory on this rank, or start fewer ranks per host\.")


def test_a_rank_out_of_memory_raises_on_every_rank():
    results = run_ranks(_no_memory_worker, 2, timeout=120)
    _assert_raised_together(results, 1, r"could not allocate the \d+ MiB buffer for the tensors on cpu \(.*can't "
                            r"allocate memory.*\)\. Free host memory on this rank, or start fewer ranks per host\.")

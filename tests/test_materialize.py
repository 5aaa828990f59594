"""materialize() on 2 and 3 real gloo ranks: bit-exact against single-process loading, ties, errors."""
from __future__ import annotations

import os
from collections.abc import Mapping

import pytest
import torch
from torch import nn

import models
from dist_harness import RankError, run_ranks

HF = list(models.TRANSFORMERS_CASES)
PLAIN = list(models.PLAIN_CASES)


# ------------------------------------------------------------------------------------ comparisons

_tensors, _tie_groups = models.tensors, models.tie_groups


def compare(model, ref, forward=None, device="cpu") -> list[str]:
    """Every difference between `model` (materialized on `device`) and `ref` (single-process load,
    on the same device), as text."""
    bad, device = [], torch.device(device)
    got, want = _tensors(model), _tensors(ref)
    if set(got) != set(want):
        bad.append(f"names differ: {sorted(set(got) ^ set(want))[:5]}")
    for n in sorted(set(got) & set(want)):
        g, w = got[n], want[n]
        if g.is_meta or g.device != device:
            bad.append(f"{n} on {g.device}")
        elif type(g) is not type(w) or g.requires_grad != w.requires_grad:
            bad.append(f"{n}: {type(g).__name__}/requires_grad={g.requires_grad}, want "
                       f"{type(w).__name__}/{w.requires_grad}")
        elif g.dtype != w.dtype or g.shape != w.shape or not torch.equal(g, w):
            bad.append(f"{n}: values/dtype/shape differ")
    if _tie_groups(model) != _tie_groups(ref):
        bad.append(f"tie groups differ: {_tie_groups(model) ^ _tie_groups(ref)}")
    if forward is not None and not bad:
        a, b = forward(model), forward(ref)
        if not torch.equal(a, b):
            bad.append("forward outputs (logits) differ")
    return bad


def _hf_forward(model):
    return models.logits(model, models.example_inputs(model))


def _seed_shape(path):
    """The model a non-src rank had after the seed PR: meta params, non-persistent buffers real but
    locally made (deliberately wrong here, so the test proves src's values replace them)."""
    model = models.build_meta(path)
    persistent = set(model.state_dict())
    for name, buf in list(model.named_buffers()):
        if name not in persistent:
            mod_name, _, attr = name.rpartition(".")
            model.get_submodule(mod_name)._buffers[attr] = torch.full(buf.shape, 3, dtype=buf.dtype)
    return model


# ------------------------------------------------------------------------------------ workers

def _hf_worker(rank, world, paths, mode):
    from fsdp_fastload import materialize

    out = {}
    for name, path in paths.items():
        try:
            if rank == 0:
                model = models.load_reference(path)
            elif mode == "meta":
                model = models.build_meta(path)
            elif mode == "seed_shape":
                model = _seed_shape(path)
            else:  # transformers' own cpu-ram-efficient flow on non-zero local ranks
                model = models.build_seed_flow(path, allow_non_meta=True)
            materialize(model, "cpu", poison=True, verify=True)
            out[name] = compare(model, models.load_reference(path), _hf_forward)
        except Exception as e:
            out[name] = [f"raised {type(e).__name__}: {e}"]
    return out


def _cycles_left_by(call) -> list[str]:
    """Run `call` with the collector paused; the types of what it left in reference cycles that is
    ours (fsdp_fastload objects, functions and frames, tensors). Other threads (the test harness's)
    may leave garbage of their own meanwhile: that is not counted."""
    import gc

    def ours(o) -> bool:
        if isinstance(o, torch.Tensor) or (getattr(type(o), "__module__", "") or "").startswith("fsdp_fastload"):
            return True
        code = getattr(o, "__code__", None) or getattr(o, "f_code", None)
        return code is not None and "fsdp_fastload" in code.co_filename

    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        call()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return sorted({type(o).__name__ for o in gc.garbage if ours(o)})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()


def _plain_worker(rank, world, names, bucket_size):
    from fsdp_fastload import materialize

    out = {}
    for name in names:
        build = models.PLAIN_CASES[name]
        model = build(device="cpu" if rank == 0 else "meta")
        # nothing of a distributed call is left in reference cycles either
        cycles = _cycles_left_by(lambda: materialize(model, "cpu", poison=True, bucket_size=bucket_size))
        ref = build(device="cpu")
        out[name] = compare(model, ref, lambda m: m(m.example_input()))
        if cycles:
            out[name].append(f"left in reference cycles: {cycles}")
    return out


class SharedStorageNet(nn.Module):
    """Parameters and buffers that are views of shared storages: gaps, an overlap, odd alignment."""

    def __init__(self):
        super().__init__()
        base = torch.arange(400, dtype=torch.float32) * 0.37
        half = (torch.arange(64, dtype=torch.float32) * 1.7).to(torch.bfloat16)
        self.a = nn.Parameter(base[0:30].view(5, 6))
        self.b = nn.Parameter(base[33:45])  # a 12-byte gap after a
        self.c = nn.Parameter(base[40:60])  # overlaps b
        self.e = nn.Parameter(base[64:128].view(8, 8), requires_grad=False)
        self.h = nn.Parameter(half[3:10])  # 6 bytes into its storage
        self.register_buffer("i", half[11:20].clone())
        self.register_buffer("j", torch.arange(5, dtype=torch.int16), persistent=False)

    def forward(self, x):
        return (x @ self.a).sum() + self.b.sum() * self.c.sum() + self.e.sum() + self.h.float().sum() \
            + self.i.float().sum() + self.j.sum()


def _shared_storage_worker(rank, world, bucket_size):
    from fsdp_fastload import materialize

    if rank == 0:
        model = SharedStorageNet()
    else:
        with torch.device("meta"):
            model = SharedStorageNet()
    materialize(model, "cpu", poison=True, verify=True, bucket_size=bucket_size)
    return compare(model, SharedStorageNet(), lambda m: m(torch.ones(3, 5)))


@pytest.mark.parametrize("bucket_size", [64, 128, 1 << 20])
def test_params_sharing_storage(bucket_size):
    # src sends runs of back-to-back tensors straight from their shared storage, in pieces.
    assert run_ranks(_shared_storage_worker, 2, bucket_size) == [[], []]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    return {name: models.make_checkpoint(name, root) for name in HF}


@pytest.fixture(scope="module")
def hf_2ranks(ckpts):
    return run_ranks(_hf_worker, 2, ckpts, "meta")


@pytest.fixture(scope="module")
def hf_3ranks(ckpts):
    return run_ranks(_hf_worker, 3, ckpts, "meta")


@pytest.mark.parametrize("name", HF)
def test_transformers_2ranks_bit_exact(hf_2ranks, name):
    for rank, res in enumerate(hf_2ranks):
        assert res[name] == [], f"rank {rank}: {res[name]}"


@pytest.mark.parametrize("name", HF)
def test_transformers_3ranks_bit_exact(hf_3ranks, name):
    for rank, res in enumerate(hf_3ranks):
        assert res[name] == [], f"rank {rank}: {res[name]}"


@pytest.mark.parametrize("mode", ["seed_shape", "seed_flow"])
def test_seed_flow_receivers_end_identical(ckpts, mode):
    paths = {n: ckpts[n] for n in ("llama", "gemma3_bf16", "bert_mlm")}
    for rank, res in enumerate(run_ranks(_hf_worker, 2, paths, mode)):
        for name, bad in res.items():
            assert bad == [], f"rank {rank} {name}: {bad}"


@pytest.mark.parametrize("world,bucket_size", [(2, 32 << 20), (3, 64), (2, 100)])
def test_plain_modules(world, bucket_size):
    # Tiny buckets split tensors across many broadcasts (and bucket edges mid-tensor).
    for rank, res in enumerate(run_ranks(_plain_worker, world, PLAIN, bucket_size)):
        for name, bad in res.items():
            assert bad == [], f"rank {rank} {name}: {bad}"


def test_single_process_without_process_group():
    from fsdp_fastload import MaterializeError, materialize

    model = models.PLAIN_CASES["kitchen_sink"](device="cpu")
    ref = models.PLAIN_CASES["kitchen_sink"](device="cpu")
    materialize(model, poison=True)
    assert compare(model, ref, lambda m: m(m.example_input())) == []
    assert model.tied.a.weight is model.head.weight
    with pytest.raises(MaterializeError, match="src=1 without an initialised process group"):
        materialize(model, src=1)
    meta = models.PLAIN_CASES["tied3"](device="meta")
    with pytest.raises(MaterializeError, match=r"src holds 2 tensor\(s\) on the meta device, e.g. \[.a.weight., .b.bias.\]"):
        materialize(meta)


# --------------------------------------------------------------------------- errors on every rank

class _OddParam(nn.Parameter):
    pass


def _error_cases(rank):
    """name -> (build(rank) -> module, materialize kwargs, expected message regex)."""
    on = lambda r: "cpu" if r == 0 else "meta"  # noqa: E731

    def lin(out_features=3, dtype=torch.float32, extra=False, r=None):
        def build(r):
            with torch.device(on(r)):
                layers = [nn.Linear(4, 4), nn.Linear(4, out_features, dtype=dtype)]
                if extra:
                    layers.append(nn.Linear(out_features, 2))
                return nn.Sequential(*layers)
        return build

    def tie(r):
        return models.PLAIN_CASES["tied3"](device=on(r)) if r == 0 else _untied()

    def _untied():
        with torch.device("meta"):
            m = models.TiedNet.__new__(models.TiedNet)
            nn.Module.__init__(m)
            m.a, m.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4)
            m.c = nn.Module()
            m.c.inner = nn.Linear(4, 4, bias=False)
            m.c.inner.weight = m.a.weight  # b.weight is its own tensor here
        return m

    def persist(r):
        m = nn.Module()
        with torch.device(on(r)):
            m.register_buffer("table", torch.ones(3), persistent=(r == 0))
        return m

    def odd(r):
        m = nn.Linear(2, 2, device=on(r))
        if r == 0:
            m.weight = _OddParam(m.weight.detach())
        return m

    def lazy(r):  # src's lazy layer has run; the receiver's has not (its shapes are unknown)
        m = nn.Sequential(nn.LazyLinear(3))
        if r == 0:
            m(torch.zeros(1, 4))
        return m

    def sparse(r):
        m = lin()(r)
        m.register_buffer("adj", torch.eye(3).to_sparse() if r == 0 else torch.empty(3, 3, device="meta"))
        return m

    def odd_dtype(r):
        m = lin()(r)
        m.register_buffer("half_complex", torch.zeros(2, dtype=torch.complex32, device=on(r)))
        return m

    class FailingMapping(Mapping):  # a lazy mapping (over safe_open, a remote store) that fails to read
        def __init__(self, keys):
            self.keys_ = list(keys)

        def __getitem__(self, key):
            raise OSError(f"cannot fetch {key}")

        def __iter__(self):
            return iter(self.keys_)

        def __len__(self):
            return len(self.keys_)

    sd = {k: v for k, v in lin()(0).state_dict().items()}
    return {
        "lazy": (lazy, {}, r"rank 1: 2 parameter\(s\)/buffer\(s\) of lazy modules are not initialized yet, e\.g\. "
                           r"\['0\.weight', '0\.bias'\].*Run one forward pass on every rank first"),
        "sparse_buffer": (sparse, {}, r"rank 0: not supported: sparse or other non-strided tensors "
                                      r"\['adj \(torch\.sparse_coo\)'\]\. Register them dense"),
        "sparse_in_state_dict": (lambda r: lin()(1), {"state_dict": {**sd, "0.bias": sd["0.bias"].to_sparse()}
                                                      if rank == 0 else None},
                                 r"rank 0: '0\.bias' is a torch\.sparse_coo tensor in state_dict; the model's is "
                                 r"dense\. Pass dense tensors"),
        "dtype_not_supported": (odd_dtype, {}, r"rank 0: not supported: dtype of \['half_complex "
                                               r"\(torch\.complex32\)'\]; supported: .*complex64"),
        "failing_mapping": (lambda r: lin()(1), {"state_dict": FailingMapping(sd) if rank == 0 else None},
                            r"rank 0: reading state_dict failed: OSError: cannot fetch 0\.weight\."),
        "unknown_option_one_rank": (lambda r: lin()(r), {"bucket_sise": 1 << 20} if rank == 1 else {},
                                    r"rank 1: unknown tuning option\(s\) \['bucket_sise'\]"),
        "bad_options": (lambda r: lin()(r), {"bucket_size": "16MB", "max_inflight": 0, "read_threads": -1}
                        if rank == 0 else {"read_threads": None},
                        r"rank 0: bucket_size='16MB' must be None or a positive number of bytes; "
                        r"max_inflight=0 must be an int >= 1; read_threads=-1 must be None or an int >= 0"),
        "bad_device_name": (lambda r: lin()(r), {"device": "gpu" if rank == 1 else "cpu"},
                            r"rank 1: device='gpu' is not usable on this rank \(.*\)\. Pass 'cpu'"),
        "verify_one_rank": (lambda r: lin()(r), {"verify": rank == 0},
                            r"the models agree but the ranks passed different src= or verify= values"),
        "memory_format": (lambda r: nn.Conv2d(2, 4, 3, device=on(r)).to(
                              memory_format=torch.channels_last if r == 1 else torch.contiguous_format), {},
                          r"'weight' has contiguous layout on rank 0 but strides \(18, 1, 6, 2\) on rank 1 \(a "
                          r"memory format, e\.g\. channels_last, set on some ranks only\)"),
        "extra_layer": (lambda r: lin(extra=(r == 0))(r), {}, r"'2.weight' exists on rank 0 but not on rank 1"),
        "dtype": (lambda r: lin(dtype=torch.float64 if r else torch.float32)(r), {},
                  r"'1.weight' has dtype torch.float32 on rank 0 but torch.float64 on rank 1"),
        "shape": (lambda r: lin(out_features=5 if r else 3)(r), {},
                  r"'1.weight' has shape \(3, 4\) on rank 0 but \(5, 4\) on rank 1"),
        "tie": (tie, {}, r"'a.weight' is tied to \['b.weight', 'c.inner.weight'\] on rank 0 but to "
                         r"\['c.inner.weight'\] on rank 1 \(a model built under accelerate's init_empty_weights\(\) "
                         r"loses its ties until model.tie_weights\(\) is called; transformers' from_pretrained "
                         r"unties them when its checkpoint holds different values .*tie_word_embeddings=False\)"),
        "persistence": (persist, {}, r"buffer 'table' is persistent on rank 0 but non-persistent on rank 1"),
        "src_meta": (lambda r: lin()(1), {}, r"rank 0: src holds 4 tensor\(s\) on the meta device.*load the model on src"),
        "subclass": (odd, {}, r"rank 0: not supported: tensor subclasses \['weight \(_OddParam\)'\]"),
        "state_dict_missing": (lambda r: lin()(1), {"state_dict": {} if rank == 0 else None},
                               r"rank 0: 4 persistent tensor\(s\) missing from the checkpoint: "
                               r"\['0.weight', '0.bias', '1.weight', '1.bias'\]"),
        "state_dict_on_receiver": (lambda r: lin()(r), {"state_dict": {} if rank == 1 else None},
                                   r"rank 1: state_dict was passed on a rank that is not src"),
        "one_rank_bad_device": (lambda r: lin()(r), {"device": "meta" if rank == 1 else "cpu"},
                                r"rank 1: device='meta' is not a place to load to"),
    }


def _errors_worker(rank, world):
    from fsdp_fastload import MaterializeError, materialize

    out = {}
    for name, (build, kwargs, _) in _error_cases(rank).items():
        model = build(rank)
        before = {n: (t, t.clone() if not (t.is_meta or isinstance(t, nn.parameter.UninitializedTensorMixin)) else None)
                  for n, t in _tensors(model).items()}
        try:
            materialize(model, **{"device": "cpu", **kwargs})
            out[name] = "no error"
            continue
        except MaterializeError as e:
            out[name] = str(e)
        # Nothing changed: src keeps its tensors (same objects, same values); receivers stay meta.
        after = _tensors(model)
        for n, (t, val) in before.items():
            dense = (lambda x: x.to_dense()) if t.layout is not torch.strided else (  # noqa: E731
                (lambda x: x.view(torch.int32)) if t.dtype == torch.complex32 else (lambda x: x))
            if after[n] is not t or (val is not None and not torch.equal(dense(after[n]), dense(val))):
                out[name] += f" | MODEL CHANGED at {n}"
    # The group is still in step after all those failures: a good call works.
    model = models.PLAIN_CASES["kitchen_sink"](device="cpu" if rank == 0 else "meta")
    materialize(model, "cpu")
    out["after"] = compare(model, models.PLAIN_CASES["kitchen_sink"](device="cpu"))
    return out


def test_mismatches_raise_on_every_rank():
    results = run_ranks(_errors_worker, 2, timeout=180)
    cases = _error_cases(0)
    for rank, res in enumerate(results):
        assert res.pop("after") == []
        for name, msg in res.items():
            pattern = cases[name][2]
            assert "MODEL CHANGED" not in msg, f"rank {rank} {name}: {msg}"
            assert pytest.importorskip("re").search(pattern, msg), f"rank {rank} {name}: {msg!r} !~ {pattern!r}"
            assert f"this is rank {rank}" in msg


def _src_outside_group_worker(rank, world):
    import torch.distributed as dist

    from fsdp_fastload import MaterializeError, materialize

    group = dist.new_group([0, 1])
    if rank == 2:
        return "not called"
    model = nn.Linear(2, 2, device="cpu" if rank == 0 else "meta")
    try:
        materialize(model, "cpu", src=2, group=group)
    except MaterializeError as e:
        return str(e)
    return "no error"


def test_src_outside_group_raises_on_every_member():
    res = run_ranks(_src_outside_group_worker, 3)
    for rank in (0, 1):
        assert f"(rank {rank}): src=2 is not in the process group (its global ranks are [0, 1])" in res[rank]


def _cuda_worker(rank, world):
    from fsdp_fastload import MaterializeError, materialize

    model = nn.Linear(2, 2, device="cpu" if rank == 0 else "meta")
    try:
        materialize(model, "cuda")
    except MaterializeError as e:
        return str(e)
    return "no error"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_device_without_cuda_raises_on_every_rank():
    for rank, msg in enumerate(run_ranks(_cuda_worker, 2)):
        assert "rank 0: device=cuda but CUDA is not available" in msg and "rank 1:" in msg, msg


def _subgroup_worker(rank, world):
    import torch.distributed as dist

    from fsdp_fastload import materialize

    group = dist.new_group([1, 2])
    out = []
    if rank != 0:
        build = models.PLAIN_CASES["kitchen_sink"]
        model = build(device="cpu" if rank == 2 else "meta")
        materialize(model, "cpu", src=2, group=group, verify=True)
        out = compare(model, build(device="cpu"), lambda m: m(m.example_input()))
    dist.barrier()  # rank 0 hosts the store the others' group still uses: it leaves last
    return out


def test_subgroup_with_nonzero_src():
    assert run_ranks(_subgroup_worker, 3) == [[], [], []]


def test_hang_is_reported_by_the_watchdog():
    # The harness itself: a rank stuck in a collective is a failure with a message, not a stuck CI.
    with pytest.raises(TimeoutError, match=r"watchdog: ranks \[0, 1\] of 2 did not finish within 15 s \(a hang\)"):
        run_ranks(_hang_worker, 2, timeout=15, env={"PG_TIMEOUT": "60"})


def _hang_worker(rank, world):
    import torch.distributed as dist

    import time

    if rank == 1:
        dist.broadcast(torch.zeros(1), src=0)  # rank 0 never sends
    time.sleep(60)  # rank 0 stays alive, so rank 1 waits (not errors) until the watchdog fires
    return "done"


class BigNet(nn.Module):
    """~80 MB of parameters: big enough that receivers fault their flat buffer in on a thread."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(1024, 1024) for _ in range(19))
        self.register_buffer("scale", torch.arange(7, dtype=torch.float64), persistent=False)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x * self.scale.sum()


def _big(device):
    torch.manual_seed(1)
    with torch.device(device):
        return BigNet()


def _prefault_worker(rank, world, estimate_too_small):
    import fsdp_fastload.api as api
    from fsdp_fastload import materialize

    if estimate_too_small:  # the receivers' guess of src's buffer size is wrong: a fresh buffer is used
        api._main_estimate = lambda *a: api.PREFAULT_MIN
    model = _big("cpu" if rank == 0 else "meta")
    materialize(model, "cpu", verify=True)  # no poison: the early, prefaulted buffer is used
    return compare(model, _big("cpu"), lambda m: m(torch.ones(2, 1024)))


@pytest.mark.parametrize("estimate_too_small", [False, True])
def test_receivers_prefaulted_buffer(estimate_too_small):
    assert run_ranks(_prefault_worker, 2, estimate_too_small) == [[], []]


def _requires_grad_worker(rank, world, state_dict_flow):
    """Receivers' skeletons freeze what src trains and the reverse (transformers 5 does this: a
    `from_pretrained` model loses `requires_grad=False` that the same model built on meta keeps)."""
    from fsdp_fastload import materialize

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ref[0].weight.requires_grad_(False)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    if rank == 0 and not state_dict_flow:
        model = ref
    elif rank > 0:  # the opposite flags to src's
        model[1].weight.requires_grad_(False)
    if state_dict_flow and rank == 0:
        model[0].weight.requires_grad_(False)
    materialize(model, "cpu", state_dict=dict(ref.state_dict()) if (state_dict_flow and rank == 0) else None)
    return compare(model, ref, forward=lambda m: m(torch.ones(2, 4)).detach())


@pytest.mark.parametrize("state_dict_flow", [False, True])
def test_requires_grad_follows_src(state_dict_flow):
    assert run_ranks(_requires_grad_worker, 2, state_dict_flow) == [[], []]


@pytest.mark.parametrize("flow", ["module", "state_dict"])
def test_call_leaves_no_cyclic_garbage(flow):
    """Everything a call builds (entries, names, owners: and through them the tensors it replaced)
    is freed when it returns, not held in a reference cycle until the garbage collector runs (a
    collection of 100k tensors' worth of garbage cost ~0.15 s, and src's old tensors stayed alive)."""
    import weakref

    from fsdp_fastload import materialize

    ref = models.PLAIN_CASES["kitchen_sink"](device="cpu")
    if flow == "module":
        model, kw = models.PLAIN_CASES["kitchen_sink"](device="cpu"), {"device": "cpu"}
    else:
        model = models.PLAIN_CASES["kitchen_sink"](device="meta")
        np_ref = {n: b for n, b in ref.named_buffers() if n not in ref.state_dict()}

        def buffer_init(mod):  # the non-persistent buffers, from the reference by identity
            for n, m in model.named_modules():
                if m is mod:
                    for attr in list(mod._buffers):
                        if f"{n}.{attr}".lstrip(".") in np_ref:
                            mod._buffers[attr].copy_(np_ref[f"{n}.{attr}".lstrip(".")])

        kw = {"device": "cpu", "state_dict": {k: v.clone() for k, v in ref.state_dict().items()},
              "buffer_init": buffer_init}
    old = weakref.ref(next(model.parameters()))
    found = _cycles_left_by(lambda: materialize(model, **kw))
    kw.clear()
    assert found == [], f"materialize left these in reference cycles: {found}"
    if flow == "state_dict":
        assert old() is None, "the replaced meta parameter is still referenced after the call"
    assert compare(model, ref, lambda m: m(m.example_input())) == []


def test_gaps_between_src_tensors_are_not_sent():
    """Tiny tensors each malloc-ed on their own sit back to back in src's memory with allocator
    headers between them. Sending such a run in place would ship the gaps too (~40% more bytes at
    640 B each) and overflow the buffer receivers size and fault in ahead: src must plan it compact."""
    import fsdp_fastload.api as api
    from fsdp_fastload import materialize

    model = nn.ParameterList(nn.Parameter(torch.full((160,), float(i))) for i in range(5000))
    nbytes = 5000 * 160 * 4
    materialize(model, "cpu")
    assert api.last_stats["bytes"] == nbytes
    assert api.last_stats["sent_bytes"] <= nbytes + nbytes // 64 + (1 << 16), api.last_stats
    assert all(torch.equal(p, torch.full((160,), float(i))) for i, p in enumerate(model))


class _AliasNet(nn.Module):
    """A parameter another module also registers as a buffer (persistent, and non-persistent)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.side = nn.Module()
        self.side.register_buffer("alias", self.lin.weight)
        self.register_buffer("np_alias", self.lin.bias, persistent=False)

    def forward(self, x):
        return self.lin(x) + self.side.alias.sum() + self.np_alias.sum()


def _tables(model):
    return {name: (sorted(m._parameters), sorted(m._buffers)) for name, m in model.named_modules()}


def _flows(build, ref, rank):
    """(flow, this rank's model, its state_dict argument) for the src-model flow (rank 0 holds `ref`'s
    values) and the state_dict flow (every rank meta, rank 0 passes a copy of `ref`'s state dict)."""
    for flow in ("model", "state_dict"):
        model = models.replica(build, ref, real=rank == 0 and flow == "model")
        sd = {k: v.detach().clone() for k, v in ref.state_dict().items()} if rank == 0 and flow == "state_dict" else None
        yield flow, model, sd


def _alias_worker(rank, world):
    from fsdp_fastload import materialize

    torch.manual_seed(0)
    ref = _AliasNet()
    out = {}
    for flow, model, sd in _flows(_AliasNet, ref, rank):
        materialize(model, "cpu", state_dict=sd, poison=True, verify=True)
        bad = []
        if _tables(model) != _tables(ref):
            bad.append(f"tables {_tables(model)} != {_tables(ref)}")
        if model.side.alias is not model.lin.weight or model.np_alias is not model.lin.bias:
            bad.append("the aliases are not the parameters")
        if type(model.side._buffers["alias"]) is not nn.Parameter:
            bad.append("the buffer slot lost its Parameter")
        x = torch.ones(2, 4)
        if not torch.equal(model(x), ref(x)) or any(t.is_meta for t in model.state_dict().values()):
            bad.append("values differ")
        out[flow] = bad
    return out


def test_parameter_also_registered_as_a_buffer_keeps_its_tables():
    """Every owner of a tensor gets the new object in the table it holds it in: a module that
    registered another module's parameter as a buffer keeps it as its buffer."""
    for rank, res in enumerate(run_ranks(_alias_worker, 2)):
        for flow, bad in res.items():
            assert bad == [], f"rank {rank} {flow}: {bad}"


class _ViewNet(nn.Module):
    """Distinct tensors sharing memory: a buffer that is a transposed view of a weight, a parameter
    made from another's `.data`; and two parameters side by side in one storage (no overlap: no alias)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.register_buffer("w_t", self.lin.weight.detach().t())
        self.shadow = nn.Parameter(self.lin.bias.data)
        flat = torch.randn(20)
        self.a, self.b = nn.Parameter(flat[:8].view(2, 4)), nn.Parameter(flat[8:].view(3, 4))

    def forward(self, x):
        return self.lin(x) + (x @ self.w_t) + self.shadow + self.a.sum() + (self.b @ x.t()).sum()


def test_aliased_finds_overlapping_distinct_tensors():
    from fsdp_fastload.manifest import aliased, build_manifest

    for device in ("cpu", "meta"):
        with torch.device(device):
            model = _ViewNet()
        # (in the manifest's order: the root's own tensors before its children's)
        assert aliased(build_manifest(model)) == [("shadow", "lin.bias"), ("w_t", "lin.weight")], device
    assert aliased(build_manifest(_AliasNet())) == []  # one tensor under two names: a tie, not an alias
    assert aliased(build_manifest(SharedStorageNet())) == [("b", "c")]  # one storage: a and e apart, b and c overlap


def _views_worker(rank, world):
    import warnings

    from fsdp_fastload import materialize

    torch.manual_seed(0)
    ref = _ViewNet()
    out = {}
    for flow, model, sd in _flows(_ViewNet, ref, rank):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            materialize(model, "cpu", state_dict=sd, poison=True, verify=True)
        said = [str(w.message) for w in seen if "share memory" in str(w.message)]
        bad = [] if len(said) == (rank == 0) else [f"warnings: {said}"]
        if said and not all(n in said[0] for n in ("'w_t', 'lin.weight'", "'shadow', 'lin.bias'", "2 pair(s)")):
            bad.append(f"the warning does not name both pairs: {said[0]}")
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
        got, want = model.state_dict(), ref.state_dict()
        if got.keys() != want.keys() or not all(torch.equal(got[k], want[k]) for k in want):
            bad.append("values differ")
        with torch.no_grad():
            if not torch.equal(model(x), ref(x)):
                bad.append("forward differs")
        out[flow] = bad
    return out


def test_views_of_other_tensors_are_named_in_a_warning():
    """Distinct tensors sharing memory (a buffer viewing a weight): materialize gives each memory of
    its own (values equal), and src warns naming each pair and how to keep the relation."""
    for rank, res in enumerate(run_ranks(_views_worker, 2)):
        for flow, bad in res.items():
            assert bad == [], f"rank {rank} {flow}: {bad}"


class _OddValues(nn.Module):
    """Tensors whose bytes are not simply their values, or that change size or need grad later."""

    def __init__(self, real: bool):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        dev = "cpu" if real else "meta"
        torch.manual_seed(3)  # the Linear's init
        self.lin = nn.Linear(4, 4, device=dev)
        # a per-channel observer's running minimum: empty until the first forward resize_s it
        self.register_buffer("running_min", torch.tensor([], device=dev))
        self.register_buffer("scale", torch.ones(3, device=dev).requires_grad_())  # a buffer needing grad
        c = torch.complex(torch.randn(5, generator=g), torch.randn(5, generator=g))
        # lazy conjugate / negative views on src (their storage holds other values than they do)
        self.c = nn.Parameter(c.conj() if real else c.to(dev))
        self.register_buffer("n", torch.randn(5, generator=g)._neg_view() if real else torch.empty(5, device=dev))


def _odd_values_worker(rank, world, flow):
    from fsdp_fastload import materialize

    ref = _OddValues(real=True)
    if flow == "model":
        model = _OddValues(real=rank == 0)
        materialize(model, "cpu", verify=True)
    else:
        model = _OddValues(real=False)
        materialize(model, "cpu", state_dict=ref.state_dict() if rank == 0 else None, verify=True)
    bad = [n for n, t in _tensors(model).items()
           if not torch.equal(t.resolve_conj().resolve_neg(), _tensors(ref)[n].resolve_conj().resolve_neg())]
    if not model.scale.requires_grad:
        bad.append("scale lost requires_grad")
    weight = model.lin.weight.detach().clone()
    model.running_min.resize_(64).fill_(-7.0)  # what the observer's first forward does
    if not torch.equal(model.lin.weight, weight):
        bad.append("growing running_min wrote over lin.weight")
    return bad


class _Afterlife(nn.Module):
    """Mixed dtypes (torch.save refuses one storage viewed as several), a tie, an integer buffer
    that outlives a cast, a non-persistent buffer, a histogram buffer grown later."""

    def __init__(self, real: bool):
        super().__init__()
        dev = "cpu" if real else "meta"
        torch.manual_seed(5)
        self.emb = nn.Embedding(64, 32, device=dev)  # 8 KiB: whole pages of its own
        self.register_buffer("steps", torch.arange(6, device=dev))  # between parameters
        self.body = nn.Linear(32, 32, device=dev, dtype=torch.bfloat16)
        self.head = nn.Linear(32, 64, bias=False, device=dev)
        self.head.weight = self.emb.weight
        self.register_buffer("hist", torch.full((4,), 2.0, device=dev))
        self.register_buffer("scale", torch.tensor([0.5], device=dev), persistent=False)

    def forward(self, ids):
        x = self.body(self.emb(ids).to(self.body.weight.dtype))
        return self.head(x.to(self.head.weight.dtype)) * self.scale


def _afterlife_worker(rank, world, flow):
    """What users do next with a loaded model: it must behave as one loaded by load_state_dict."""
    import copy
    import ctypes
    import io
    import pickle

    from fsdp_fastload import materialize

    ref = _Afterlife(real=True)
    if flow == "model":
        model = _Afterlife(real=rank == 0)
        materialize(model, "cpu")
    else:
        model = _Afterlife(real=False)
        materialize(model, "cpu", state_dict=ref.state_dict() if rank == 0 else None,
                    buffer_init=lambda m: m.scale.fill_(0.5) if isinstance(m, _Afterlife) else None)
    bad = compare(model, ref, lambda m: m(torch.tensor([[1, 5, 9]])))
    mine = rank != 0 or flow != "model"  # src of a module keeps its own tensors
    if mine:
        bad += models.one_allocation(list(dict.fromkeys(_tensors(model).values())))
    # torch.save / torch.load of the state dict and of one tensor; pickle; deepcopy
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    size = buf.tell()
    buf.seek(0)
    back = torch.load(buf)
    if back.keys() != ref.state_dict().keys() or not all(torch.equal(back[k], v) for k, v in ref.state_dict().items()):
        bad.append("torch.save'd state dict reloads different")
    ref_buf = io.BytesIO()
    torch.save(ref.state_dict(), ref_buf)
    if size > ref_buf.tell() + 1024:
        bad.append(f"torch.save wrote {size} bytes, a single-process model {ref_buf.tell()}")
    if len(pickle.dumps(model.steps)) > len(pickle.dumps(ref.steps)) + 64:
        bad.append(f"one pickled buffer takes {len(pickle.dumps(model.steps))} bytes")
    twin = copy.deepcopy(model)
    if twin.scale.untyped_storage().nbytes() != 4 or not torch.equal(twin.emb.weight, ref.emb.weight):
        bad.append("deepcopy copied more than each tensor, or other values")
    # growing a buffer moves it to memory of its own; its neighbours keep their values
    model.hist.resize_(4096).fill_(-1.0)
    if mine and compare(model, ref, None) != ["hist: values/dtype/shape differ"]:
        bad.append(f"growing hist changed other tensors: {compare(model, ref, None)}")
    model.hist = ref.hist.clone()
    # a cast replaces the floating tensors; a tensor that dies returns its pages (CPU) while the
    # others (the integer buffer) keep the buffer: its bytes there read as zeros, not the weights
    addr, nbytes = model.emb.weight.data_ptr(), model.emb.weight.untyped_storage().nbytes()
    model.half()
    del twin, back
    if mine and model.steps.untyped_storage().nbytes() == 48:
        page = 4096
        a, b = -(-addr // page) * page, (addr + nbytes) // page * page
        if b > a and any(ctypes.string_at(a, b - a)):
            bad.append("the replaced embedding's pages were not returned to the kernel")
    out = model.float()(torch.tensor([[1, 5, 9]]))
    if not torch.equal(out, ref.half().float()(torch.tensor([[1, 5, 9]]))):
        bad.append("after .half() the forward differs")
    return bad


@pytest.mark.parametrize("flow", ["model", "mapping"])
def test_loaded_tensors_save_pickle_copy_grow_and_cast_as_if_allocated_one_by_one(flow):
    """Every tensor has a storage of its own over the one buffer: torch.save of a mixed-dtype model
    reloads (one storage viewed as several dtypes is refused), files and pickles hold each tensor's
    bytes only, a grown buffer leaves its neighbours alone, a tensor replaced by a cast gives its
    pages back while an integer buffer lives on."""
    assert run_ranks(_afterlife_worker, 2, flow) == [[], []]


def _own_buffers_worker(rank, world, flow):
    from fsdp_fastload import install, materialize

    install.OWN_BUFFERS_ON = ("cuda", "cpu")  # CUDA's policy, exercised on CPU
    ref = _Afterlife(real=True)
    model = _Afterlife(real=flow == "model" and rank == 0)
    materialize(model, "cpu", state_dict=ref.state_dict() if flow == "mapping" and rank == 0 else None,
                buffer_init=lambda m: m.scale.fill_(0.5) if isinstance(m, _Afterlife) else None)
    bad = compare(model, ref, lambda m: m(torch.tensor([[1, 5, 9]])))
    if flow == "model" and rank == 0:
        return bad
    params, bufs = list(model.parameters()), list(model.buffers())
    bad += models.one_allocation(params) + models.one_allocation(bufs)
    return bad + models.buffers_in_params_block(model)


@pytest.mark.parametrize("flow", ["model", "mapping"])
def test_buffers_leave_the_block_on_cuda(flow):
    """On CUDA a block is freed only with its last tensor: the buffers move to a block of their own,
    so that replacing every parameter (FSDP1's flattening) frees the model's block. Forced on CPU."""
    assert run_ranks(_own_buffers_worker, 2, flow) == [[], []]


@pytest.mark.parametrize("flow", ["model", "mapping"])
def test_conjugate_views_grad_buffers_and_empty_tensors_grown_later(flow):
    for rank, bad in enumerate(run_ranks(_odd_values_worker, 2, flow, timeout=120)):
        assert bad == [], f"rank {rank}: {bad}"


class _WithExtraState(nn.Module):
    """A module with extra state (like TransformerEngine's FP8 metadata): an object beside its tensors."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.inner = nn.Sequential(_Scaled(scale))

    def forward(self, x):
        return self.inner(self.lin(x))


class _Scaled(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale, self.history = scale, [scale]

    def forward(self, x):
        return x * self.scale

    def get_extra_state(self):
        return {"scale": self.scale, "history": list(self.history), "amax": torch.tensor([self.scale * 2])}

    def set_extra_state(self, state):
        self.scale, self.history = state["scale"], list(state["history"])
        self.amax = state["amax"].clone()


def _extra_state_worker(rank, world, flow):
    from fsdp_fastload import materialize

    torch.manual_seed(0)
    ref = _WithExtraState(scale=3.0)
    ref.inner[0].history.append(5.0)
    sd = ref.state_dict()
    if flow == "model" and rank == 0:
        model = ref
    else:
        model = _WithExtraState().to("meta")
    materialize(model, "cpu", state_dict=sd if flow == "mapping" and rank == 0 else None)
    single = _WithExtraState()
    single.load_state_dict(sd)
    x = torch.randn(2, 3)
    got = model.inner[0]
    return [what for what, ok in [
        ("scale", got.scale == 3.0), ("history", got.history == [3.0, 5.0]),
        ("amax", rank == 0 and flow == "model" or torch.equal(got.amax, torch.tensor([6.0]))),
        ("forward", torch.equal(model(x), single(x)))] if not ok]


@pytest.mark.parametrize("flow", ["model", "mapping"])
def test_extra_state_reaches_every_rank(flow):
    for rank, bad in enumerate(run_ranks(_extra_state_worker, 2, flow, timeout=120)):
        assert bad == [], f"rank {rank}: {bad}"


class _TensorExtraState(nn.Module):
    """Extra state kept as a tensor (TransformerEngine serializes its FP8 metadata into a uint8 tensor),
    which a safetensors checkpoint can hold."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.meta_bytes = torch.zeros(4, dtype=torch.uint8)

    def get_extra_state(self):
        return self.meta_bytes

    def set_extra_state(self, state):
        self.meta_bytes = state.clone()


def _tensor_extra_state_worker(rank, world, path):
    from fsdp_fastload import materialize

    model = nn.Sequential(_TensorExtraState()).to("meta")
    materialize(model, "cpu", state_dict=path if rank == 0 else None)
    return model[0].meta_bytes.tolist()


def test_extra_state_tensor_from_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    ref = nn.Sequential(_TensorExtraState())
    ref[0].meta_bytes = torch.tensor([7, 1, 2, 9], dtype=torch.uint8)
    path = str(tmp_path / "model.safetensors")
    save_file(ref.state_dict(), path)
    assert run_ranks(_tensor_extra_state_worker, 2, path, timeout=120) == [[7, 1, 2, 9]] * 2


# ------------------------------------------------------------------------------------ read_mapped

def _mapped_worker(rank, world, paths, touch, finder, flow):
    from fsdp_fastload import api, materialize, source

    if finder == "smaps":  # as where /proc/self/pagemap does not answer (checked on a written page)
        source._pagemap_ok = False

    def load(path):
        model = models.load_reference(path)  # its tensors stay mapped from the safetensors files
        w = next(p for p in model.parameters() if p.is_floating_point() and p.numel())
        if touch:  # written in place through .data (a merged adapter, say): that page is the process's own
            w.data.view(-1)[:1] += 1
        return model, w.numel() * w.element_size()

    out = {}
    for name, path in paths.items():
        model, touched = load(path) if rank == 0 else (models.build_meta(path), 0)
        total = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())
        sd = None
        if flow == "state_dict":  # from_pretrained's state dict into a meta model on every rank
            sd, model = (dict(model.state_dict()) if rank == 0 else None), models.build_meta(path)
        materialize(model, "cpu", state_dict=sd, read_mapped=True, poison=True, verify=True)
        out[name] = (compare(model, load(path)[0], _hf_forward), api.last_stats["read_from_mapped_files"],
                     total, touched)
    return out


@pytest.mark.parametrize("touch,finder,flow", [(False, "pagemap", "model"), (True, "pagemap", "model"),
                                               (True, "smaps", "model"), (True, "pagemap", "state_dict")])
def test_src_reads_its_mapped_tensors_from_the_files(ckpts, tmp_path, touch, finder, flow):
    """With read_mapped=True src reads from_pretrained's tensors from their files, bit for bit; a
    tensor written to since is read through memory: found by its page in /proc/self/pagemap, or
    where that is not used, by its mapping's count of written pages in /proc/self/smaps (then the
    whole file's mapping is read through memory, the other files of a sharded checkpoint not).
    The same for from_pretrained's state dict passed as state_dict=."""
    paths = {n: ckpts[n] for n in ("llama", "gemma3_bf16")}
    paths["llama-sharded"] = models.make_checkpoint("llama", str(tmp_path), shard=True)
    assert len([f for f in os.listdir(paths["llama-sharded"]) if f.endswith(".safetensors")]) > 1
    res = run_ranks(_mapped_worker, 2, paths, touch, finder, flow)
    for rank, per_rank in enumerate(res):
        for name, (bad, from_files, total, touched) in per_rank.items():
            assert bad == [], f"rank {rank} {name}: {bad}"
            if rank:
                assert from_files == 0
            elif not touch:
                assert from_files > 0.9 * total, (name, from_files, total)
            elif finder == "pagemap":  # all but the written tensor (and what shares its page)
                assert total * 0.5 < from_files <= total - touched, (name, from_files, total, touched)
            elif name == "llama-sharded":  # the other files of a sharded checkpoint are untouched
                assert 0 < from_files <= total - touched, name
            else:
                assert from_files == 0, name


def test_file_backed_finds_only_unwritten_mappings_of_the_same_file(tmp_path):
    from fsdp_fastload.layout import memory_facts
    from fsdp_fastload.ops import stamp_of
    from fsdp_fastload.source import file_backed

    path = tmp_path / "raw.bin"
    data = torch.arange(4096, dtype=torch.float32)
    path.write_bytes(data.numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=4096, dtype=torch.float32)
    views = [mapped[10:20], mapped[1000:3000].view(40, 50), torch.zeros(8), mapped[5:5]]
    got = file_backed(memory_facts(views), [v.shape for v in views])
    stamp = stamp_of(os.stat(path))  # (reads go through the file opened then, checked against it)
    assert got[0]._key() == (str(path), 40, 40, torch.float32, (10,), stamp)
    assert got[1]._key() == (str(path), 4000, 8000, torch.float32, (40, 50), stamp)
    assert got[0].file is got[1].file and os.path.samestat(os.fstat(got[0].file.fd), os.stat(path))
    assert got[2] is None and got[3] is None  # malloc-ed; empty
    other = tmp_path / "other.bin"
    other.write_bytes(path.read_bytes())
    os.replace(other, path)  # the same name, another file: its bytes may differ from the mapping's
    assert file_backed(memory_facts(views[:2]), [v.shape for v in views[:2]]) == [None, None]
    again = torch.from_file(str(path), shared=False, size=4096, dtype=torch.float32)
    assert file_backed(memory_facts([again[:4]]), [(4,)])[0] is not None
    again[4] = 7  # a page of its own: the file no longer holds what memory does
    far = again[2048:2058]  # 8 KiB on: another page, still the file's
    got = file_backed(memory_facts([again[:4], far]), [(4,), (10,)])
    assert got[0] is None and got[1]._key() == (str(path), 8192, 40, torch.float32, (10,), stamp_of(os.stat(path)))


def test_mappings_found_by_query_equal_those_in_maps(tmp_path, monkeypatch):
    """The mappings holding given addresses, from the PROCMAP_QUERY ioctl (Linux >= 6.11), equal
    those /proc/self/maps lists; without the ioctl, found by bisecting maps' lines; files under
    /dev/ and anonymous memory are not files to read."""
    import mmap

    from fsdp_fastload import source
    from fsdp_fastload.layout import memory_facts
    from fsdp_fastload.ops import stamp_of

    paths = [tmp_path / "a.bin", tmp_path / "b.bin"]
    for p in paths:
        p.write_bytes(bytes(3 * source._PAGE))
    maps = [torch.from_file(str(p), shared=False, size=3 * source._PAGE, dtype=torch.uint8) for p in paths]
    shm = torch.zeros(64).share_memory_()  # mapped from a file under /dev/shm
    anon = torch.zeros(1 << 20)
    addrs = sorted([maps[0].data_ptr(), maps[0].data_ptr() + 5, maps[1].data_ptr() + source._PAGE,
                    shm.data_ptr(), anon.data_ptr()])
    # a mapping that starts 2 pages into its file
    at_offset = tmp_path / "c.bin"
    at_offset.write_bytes(bytes(i % 251 for i in range(4 * source._PAGE)))
    with open(at_offset, "rb") as f:
        mm = mmap.mmap(f.fileno(), 2 * source._PAGE, flags=mmap.MAP_PRIVATE, offset=2 * source._PAGE)
    third = torch.frombuffer(mm, dtype=torch.uint8)
    paths.append(at_offset)
    addrs = sorted(addrs + [third.data_ptr() + 8])
    with open("/proc/self/maps", "rb") as f:  # every line parsed
        by_maps = [r for r in map(source._file_line, f.read().splitlines())
                   if r is not None and len(r) > 3 and any(r[0] <= a < r[1] for a in addrs)]
    assert sorted(r[5] for r in by_maps) == sorted(map(str, paths))
    got = source._mappings_of(addrs)
    assert got == by_maps
    view = third[8:108]
    (ft,) = source.file_backed(memory_facts([view]), [(100,)])
    assert ft._key() == (str(at_offset), 2 * source._PAGE + 8, 100, torch.uint8, (100,), stamp_of(os.stat(at_offset)))
    with open(at_offset, "rb") as f:
        f.seek(ft.offset)
        assert f.read(100) == bytes(view.tolist())
    if not source._procmap_query_ok:
        pytest.skip("this kernel has no PROCMAP_QUERY: maps was used both times")
    monkeypatch.setattr(source, "_procmap_query_ok", False)
    assert source._mappings_of(addrs) == by_maps  # bisecting maps' lines
    assert source._mappings_of([1, 2]) == []  # below every mapping


def test_written_pages_are_found_page_by_page(tmp_path, monkeypatch):
    """/proc/self/pagemap: a span is written where one of its pages is the process's own; spans
    sharing pages are read as one run. Where pagemap is not used, smaps leaves the mapping out whole."""
    from fsdp_fastload import source
    from fsdp_fastload.layout import memory_facts

    page = source._PAGE
    path = tmp_path / "raw.bin"
    path.write_bytes(bytes(range(256)) * (16 * page // 256))
    mapped = torch.from_file(str(path), shared=False, size=16 * page, dtype=torch.uint8)
    base = mapped.data_ptr()
    assert base % page == 0
    spans = [(base, page), (base + page - 8, 16), (base + 3 * page, 2 * page), (base + 8 * page, 1), (base, 0)]
    assert source._written_pages(spans) == [False] * 5
    mapped[: 16 * page : page].sum()  # read: pages of the file, not the process's own
    assert source._written_pages(spans) == [False] * 5
    mapped[page + 1] = 0  # page 1: the second span's (which straddles pages 0 and 1)
    mapped[4 * page] += 1  # page 4: the third span's second page
    assert source._written_pages(spans) == [False, True, True, False, False]
    facts = memory_facts([mapped[:page], mapped[8 * page:9 * page]])
    assert [f is not None for f in source.file_backed(facts, [(page,), (page,)])] == [True, True]
    monkeypatch.setattr(source, "_pagemap_ok", False)
    assert source._written_pages(spans) is None
    assert source.file_backed(facts, [(page,), (page,)]) == [None, None]  # smaps: the mapping has pages of its own


# ------------------------------------------------------------------------------- windowed packer

def _windowed_worker(rank, world, paths, window):
    from fsdp_fastload import api, fill, materialize

    fill.WindowedPacker.WINDOW = window  # src's packer made for this many tensors' buckets at a time
    out = {}
    for name, (path, dtype) in paths.items():
        ref = models.load_reference(path, dtype=dtype)
        for flow in ("model", "dir", "mapping"):
            sd = None
            if flow == "model" and dtype is None:  # src's own CPU tensors sent in place (kept)
                model = models.load_reference(path) if rank == 0 else models.build_meta(path)
            elif flow == "model":
                continue
            else:
                model = models.build_meta(path, dtype=dtype)
                if rank == 0:  # (mapping: the checkpoint's dtype, converted on the way)
                    sd = path if flow == "dir" else dict(models.load_reference(path).state_dict())
            materialize(model, "cpu", state_dict=sd, poison=True, verify=True, bucket_size=4096, direct_min=2048)
            out[f"{name} {flow}"] = compare(model, ref, _hf_forward)
            if api.last_stats["read_from_mapped_files"]:  # read_mapped's default: onto a device only
                out[f"{name} {flow}"].append("src read its mapped tensors from their files onto the CPU")
    return out


@pytest.mark.parametrize("window", [1, 7])
def test_src_packer_made_window_by_window(ckpts, window):
    """src's packer is made for a window of tensors at a time as the buckets reach it: the same
    values, bit for bit, from src's model, a checkpoint and a mapping, in 4 KiB buckets (entries
    straddling buckets and windows), bf16 files into fp32 parameters, tied embeddings."""
    paths = {"llama": (ckpts["llama"], None), "qwen2_tied": (ckpts["qwen2_tied"], None),
             "llama_bf16-fp32": (ckpts["llama_bf16"], torch.float32)}
    for rank, res in enumerate(run_ranks(_windowed_worker, 2, paths, window, timeout=300)):
        for name, bad in res.items():
            assert bad == [], f"rank {rank} {name}: {bad}"

"""FSDP2 (`fully_shard` on a CPU gloo mesh): every rank allocates and receives only its own shards.

Every rank builds the model on `meta` and shards it; rank 0 passes the full state (a checkpoint
directory, a sharded checkpoint, or a mapping). Afterwards each parameter's `full_tensor()` equals
single-process `from_pretrained` bit for bit, each rank's local shard is exactly its `torch.chunk`
piece (padding zeroed), buffers are replicated, ties hold, and the sharded forward gives the
reference logits bit for bit.
"""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import models
from dist_harness import run_ranks


def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """fully_shard every block of every ModuleList, then the root (torchtitan's recipe)."""
    from torch.distributed.fsdp import fully_shard

    for m in list(model.modules()):
        if isinstance(m, nn.ModuleList):
            for block in m:
                fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


_tensors = models.tensors


def compare_sharded(model, ref, rank, world, *, forward=None, device="cpu", align=64) -> list[str]:
    """Differences between the sharded `model` (on `device`, its shards `align`ed) and the
    single-process `ref` (on the same device), collective."""
    from torch.distributed.tensor import DTensor

    bad, device = [], torch.device(device)
    got, want = _tensors(model), _tensors(ref)
    if set(got) != set(want):
        return [f"names differ: {sorted(set(got) ^ set(want))[:5]}"]
    locals_ = {}
    for n in sorted(got):
        g, w = got[n], want[n]
        if isinstance(g, DTensor):
            local = g._local_tensor
            locals_[id(local)] = local
            if local.is_meta or local.device != device:
                bad.append(f"{n}: local shard on {local.device}")
                continue
            dim = g.placements[0].dim
            chunks = torch.chunk(w, world, dim=dim)
            expect = chunks[rank] if rank < len(chunks) else w.narrow(dim, w.shape[dim], 0)
            if not w.numel():  # FSDP2's own shape for the shards of an empty tensor
                expect = torch.empty(local.shape if not local.numel() else expect.shape, dtype=w.dtype,
                                     device=device)
            if local.dtype != w.dtype or not torch.equal(local, expect):
                bad.append(f"{n}: local shard is not rank {rank}'s chunk")
            full = g.full_tensor()
            if not torch.equal(full, w):
                bad.append(f"{n}: full_tensor() differs")
        elif g.is_meta or not torch.equal(g, w) or g.dtype != w.dtype:
            bad.append(f"{n}: replicated tensor differs")
        if isinstance(w, nn.Parameter) and (not isinstance(g, nn.Parameter) or g.requires_grad != w.requires_grad):
            bad.append(f"{n}: not an nn.Parameter with requires_grad={w.requires_grad}")
    if models.tie_groups(model) != models.tie_groups(ref):
        bad.append("tie groups differ")
    # FSDP2's own view: the padded shard it all-gathers is our storage, its tail zeroed.
    from fsdp_fastload.manifest import build_manifest
    from fsdp_fastload.shard import _fsdp_params

    sharded = [e for e in build_manifest(model) if e.cls == "DTensor"]
    fsdp_params = _fsdp_params(model, sharded)
    if len(fsdp_params) != len(sharded):
        bad.append(f"FSDP2 manages {len(fsdp_params)} of the {len(sharded)} DTensor parameters")
    for fp in fsdp_params.values():
        data = fp._sharded_param_data
        n_local = fp.sharded_param._local_tensor.numel()
        if data.untyped_storage().data_ptr() != fp.sharded_param._local_tensor.untyped_storage().data_ptr():
            bad.append(f"{fp._param_fqn or fp._module_info.param_name}: FSDP2 padded shard is a copy")
        elif n_local < data.numel() and bool(data[n_local:].ne(0).any()):
            bad.append(f"{fp._module_info.param_name}: padding not zero")
        # materialize resets most FSDPParams itself: FSDP2's own reset must find nothing left to do
        # (except on an empty padded shard, which has no address, like FSDP2's own: it re-pads those)
        if not data.numel():
            continue
        state, local = dict(fp.__dict__), fp.sharded_param._local_tensor
        fp.reset_sharded_param()
        if fp.sharded_param._local_tensor is not local or any(
                fp.__dict__.get(k) is not v for k, v in state.items()) or fp.__dict__.keys() != state.keys():
            bad.append(f"{fp._module_info.param_name}: FSDP2's reset_sharded_param changed its state")
    # each padded shard a storage of its own (the local shard at its offset 0, as FSDP2's own: a
    # DTensor over an offset view does not pickle), all in one buffer
    bad += models.one_allocation([fp._sharded_param_data for fp in fsdp_params.values()], align=align)
    if any(t.storage_offset() for t in locals_.values()):
        bad.append("a local shard sits at a storage offset")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # DTensors pickle (checkpointing with torch.save)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    if not all(torch.equal(back[k].to_local(), v.to_local()) for k, v in model.state_dict().items()
               if isinstance(v, DTensor)):
        bad.append("a torch.save'd shard reloads different")
    if forward is not None and not bad:
        a, b = forward(model), forward(ref)
        if not torch.equal(a, b):
            bad.append("forward outputs (logits) differ")
    return bad


def _hf_fsdp2_worker(rank, world, cases, source_kind, bucket_size=None):
    from fsdp_fastload import api, materialize, ops

    mesh = _mesh(world)
    out = {}
    for name, (path, dtype) in cases.items():
        model = shard_model(models.build_meta(path, dtype=dtype), mesh)
        ref = models.load_reference(path, dtype=dtype)
        if rank != 0:
            sd = None
        elif source_kind == "mapping":
            sd = dict(ref.state_dict())
        elif source_kind == "mapped":  # from_pretrained's state_dict in the checkpoint's dtype, mapped from its files
            sd = dict(models.load_reference(path).state_dict())
        else:
            sd = path
        read = [0]  # bytes src's reads took from files (its packers, not only its plan, use the files)
        real_read = ops.read_ranges

        def counted(path, dst, file_offsets, dst_offsets, lengths, **kw):
            read[0] += sum(lengths)
            return real_read(path, dst, file_offsets, dst_offsets, lengths, **kw)

        ops.read_ranges = counted
        try:
            materialize(model, "cpu", state_dict=sd, poison=True, verify=True, bucket_size=bucket_size,
                        read_mapped=source_kind == "mapped")
        finally:
            ops.read_ranges = real_read
        out[name] = compare_sharded(model, ref, rank, world,
                                    forward=lambda m: models.logits(m, models.example_inputs(m)))
        mapped = api.last_stats["read_from_mapped_files"]
        if rank == 0 and source_kind == "mapped" and not mapped:
            out[name].append("read_mapped=True read nothing from the files the state dict is mapped from")
        if rank == 0 and read[0] < mapped:
            out[name].append(f"src planned {mapped} bytes from the mapped files but read {read[0]} from files")
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fsdp2"))
    names = ("llama", "qwen2_tied", "gemma3_bf16", "bert_mlm", "llama_bf16", "mixtral", "qwen2_moe")
    out = {n: models.make_checkpoint(n, root) for n in names}
    out["llama-sharded"] = models.make_checkpoint("llama", root, shard=True)
    return out


@pytest.mark.parametrize("world,source_kind", [(2, "dir"), (3, "dir"), (2, "mapping"), (2, "mapped")])
def test_transformers_fsdp2_bit_exact(ckpts, world, source_kind):
    """"mapped": src's state dict is from_pretrained's, its tensors read from the files they are
    mapped from (read_mapped=True), a bf16 one into fp32 shards among them."""
    cases = {n: (ckpts[n], None) for n in ("llama", "qwen2_tied", "gemma3_bf16", "bert_mlm")}
    if source_kind == "mapped":
        cases["llama_bf16-fp32"] = (ckpts["llama_bf16"], torch.float32)
    if world == 3:
        cases = {n: cases[n] for n in ("qwen2_tied", "gemma3_bf16")}
        cases["llama-sharded"] = (ckpts["llama-sharded"], None)
    for rank, res in enumerate(run_ranks(_hf_fsdp2_worker, world, cases, source_kind, timeout=300)):
        for name, bad in res.items():
            assert bad == [], f"rank {rank} {name}: {bad}"


@pytest.mark.parametrize("world", [2, 3])
def test_fused_moe_experts_into_fsdp2_shards(ckpts, world):
    """Per-expert checkpoint tensors, stacked into 3-D parameters by transformers' own conversion on
    src, scattered as shards of the stacked tensor (3 ranks: 4 experts make chunks of 2, 2 and none)."""
    cases = {n: (ckpts[n], None) for n in ("mixtral", "qwen2_moe")}
    for rank, res in enumerate(run_ranks(_hf_fsdp2_worker, world, cases, "dir", timeout=300)):
        for name, bad in res.items():
            assert bad == [], f"rank {rank} {name}: {bad}"


def test_fsdp2_bf16_checkpoint_into_fp32_params(ckpts):
    # FSDP2 keeps fp32 master weights: the bf16 checkpoint is sent as bf16 and upcast on arrival.
    cases = {"llama_bf16": (ckpts["llama_bf16"], torch.float32)}
    for rank, res in enumerate(run_ranks(_hf_fsdp2_worker, 2, cases, "dir")):
        assert res["llama_bf16"] == [], f"rank {rank}: {res['llama_bf16']}"


def _renamed_fsdp2_worker(rank, world, path):
    import transformers

    from fsdp_fastload import materialize

    cls = transformers.GPTNeoXForCausalLM
    with torch.device("meta"):
        model = cls._from_config(transformers.AutoConfig.from_pretrained(path))
    shard_model(model, _mesh(world))
    classes = {name: type(m) for name, m in model.named_modules()}
    materialize(model, "cpu", state_dict=path if rank == 0 else None, poison=True)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    bad = compare_sharded(model, cls.from_pretrained(path).eval(), rank, world,
                          forward=lambda m: models.logits(m, {"input_ids": ids}))
    if {name: type(m) for name, m in model.named_modules()} != classes:
        bad.append("a module's class changed")
    return bad


def test_keys_transformers_renames_into_fsdp2_model(tmp_path):
    """GPT-NeoX's checkpoint says `embed_out.weight`; transformers finds that renaming by the model's
    class name, which `fully_shard` changes (`FSDPGPTNeoXForCausalLM`): src still applies it, every
    shard is bit-exact and the wrapped classes are left as FSDP2 made them."""
    import transformers

    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=128)).save_pretrained(tmp_path / "neox")
    for rank, bad in enumerate(run_ranks(_renamed_fsdp2_worker, 2, str(tmp_path / "neox"))):
        assert bad == [], f"rank {rank}: {bad}"


class UnevenNet(nn.Module):
    """Uneven shards, a dimension smaller than the world, persistent BatchNorm stats, an int buffer."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(7, 5), nn.Linear(5, 7)])
        self.tiny = nn.Parameter(torch.zeros(2, 3))  # 2 rows over 3 ranks: one rank holds nothing
        self.norm = nn.BatchNorm1d(7)
        self.frozen = nn.Parameter(torch.zeros(11, 2), requires_grad=False)
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
        # no elements (DINOv3's register tokens when there are none): FSDP2 shapes their shards its own way
        self.empty = nn.Parameter(torch.zeros(1, 0, 7))
        self.none = nn.Parameter(torch.zeros(0))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return (self.norm(x).sum() + self.tiny.sum() + self.frozen.sum() + self.steps.sum() + self.empty.sum()
                + self.none.sum())


def _seeded(cls, device, seed, pick=lambda m: list(m.parameters())) -> nn.Module:
    """`cls()` on `device`; off meta, the tensors `pick` returns filled with seeded normal values."""
    g = torch.Generator().manual_seed(seed)
    with torch.device(device):
        m = cls()
    if device != "meta":
        with torch.no_grad():
            for t in pick(m):
                t.copy_(torch.randn(t.shape, generator=g))
    return m


def _uneven(device, seed=0):
    m = _seeded(UnevenNet, device, seed, lambda m: list(m.parameters()) + [m.norm.running_mean, m.norm.running_var])
    if device != "meta":
        with torch.no_grad():
            m.norm.running_var.abs_().add_(0.5)  # a variance: positive, or the forward is NaN
            m.steps.copy_(torch.tensor([3, 1, 4]))
            m.norm.num_batches_tracked.fill_(9)
    return m.eval()


def _plain_worker(rank, world, bucket_size):
    from fsdp_fastload import materialize

    model = shard_model(_uneven("meta"), _mesh(world))
    ref = _uneven("cpu")
    materialize(model, "cpu", state_dict=dict(ref.state_dict()) if rank == 0 else None, poison=True,
                verify=True, bucket_size=bucket_size)
    return compare_sharded(model, ref, rank, world, forward=lambda m: m(torch.ones(4, 7)).detach())


@pytest.mark.parametrize("world,bucket_size", [(2, None), (3, None), (3, 64)])
def test_uneven_and_empty_shards(world, bucket_size):
    assert run_ranks(_plain_worker, world, bucket_size) == [[]] * world


def _hsdp_worker(rank, world, mesh_shape):
    """HSDP: a 2-D (replicate, shard) mesh; every parameter's full tensor and the forward bit-exact."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from fsdp_fastload import materialize

    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    model = _uneven("meta")
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)
    ref = _uneven("cpu")
    materialize(model, "cpu", state_dict=dict(ref.state_dict()) if rank == 0 else None, poison=True, verify=True)
    want = _tensors(ref)
    bad = []
    for n, t in _tensors(model).items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if not want[n].numel():  # an empty tensor: FSDP2's own full_tensor() shape on a (2, 1) mesh is (0, 0, 7)
            full = full.reshape(want[n].shape)
        if full.dtype != want[n].dtype or not torch.equal(full, want[n]):
            bad.append(f"{n}: differs")
        if isinstance(t, DTensor) and len(t.placements) != 2:
            bad.append(f"{n}: placements {t.placements}")
    if not bad and not torch.equal(model(torch.ones(4, 7)).detach(), ref(torch.ones(4, 7)).detach()):
        bad.append("forward differs")
    return bad


@pytest.mark.parametrize("mesh_shape", [(1, 2), (2, 1)])
def test_hsdp_two_dim_mesh(mesh_shape):
    assert run_ranks(_hsdp_worker, 2, mesh_shape) == [[], []]


def _train_worker(rank, world, path):
    """A few optimizer steps on the sharded model give the same loss as single-process training."""
    from fsdp_fastload import materialize

    model = shard_model(models.build_meta(path, dtype=torch.float32), _mesh(world))
    materialize(model, "cpu", state_dict=path if rank == 0 else None)
    model.train()
    return models.train_losses(model, models.example_inputs(model), torch.optim.SGD(model.parameters(), lr=0.5))


def test_fsdp2_training_steps_match_single_process(ckpts):
    path = ckpts["llama"]
    ref = models.load_reference(path, dtype=torch.float32).train()
    want = models.train_losses(ref, models.example_inputs(ref), torch.optim.SGD(ref.parameters(), lr=0.5))
    for rank, got in enumerate(run_ranks(_train_worker, 2, path)):
        assert got[0] == want[0], f"rank {rank}: first loss {got[0]} != {want[0]}"
        assert got == pytest.approx(want, rel=1e-5), f"rank {rank}: {got} vs {want}"


def _policy_train_worker(rank, world, path, offload):
    """FSDP2 with a bf16 MixedPrecisionPolicy (and CPU offload): training from our load gives exactly
    the losses of the same sharded model loaded by torch's DCP (`broadcast_from_rank0`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from fsdp_fastload import materialize

    mesh = _mesh(world)
    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    losses = []
    for loader in ("ours", "dcp"):
        model = models.build_meta(path, dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, **kw)
        fully_shard(model, mesh=mesh, **kw)
        if loader == "ours":
            materialize(model, "cpu", state_dict=path if rank == 0 else None)
        else:
            ref = models.load_reference(path, dtype=torch.float32)
            model.to_empty(device="cpu")
            set_model_state_dict(model, ref.state_dict() if rank == 0 else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
            with torch.no_grad():  # DCP leaves non-persistent buffers as to_empty made them
                for (_, b), (_, want) in zip(model.named_buffers(), ref.named_buffers()):
                    b.copy_(want)
        model.train()
        losses.append(models.train_losses(model, models.example_inputs(model),
                                          torch.optim.SGD(model.parameters(), lr=0.5)))
    return losses


@pytest.mark.parametrize("offload", [False, True])
def test_mixed_precision_and_offload_policies_train_like_dcp(ckpts, offload):
    for rank, (ours, dcp) in enumerate(run_ranks(_policy_train_worker, 2, ckpts["llama"], offload)):
        assert ours == dcp, f"rank {rank}: losses {ours} (ours) vs {dcp} (DCP)"


def _src_model_worker(rank, world):
    from fsdp_fastload import MaterializeError, materialize

    model = shard_model(_uneven("meta"), _mesh(world))
    try:
        materialize(model, "cpu")
    except MaterializeError as e:
        return str(e)
    return "no error"


def test_sharded_model_without_state_dict_raises_on_every_rank():
    for rank, msg in enumerate(run_ranks(_src_model_worker, 2)):
        assert "rank 0:" in msg and "DTensor" in msg and "state_dict=" in msg, msg
        assert f"this is rank {rank}" in msg


def _partial_worker(rank, world):
    from torch.distributed.tensor import DTensor, Partial

    from fsdp_fastload import MaterializeError, materialize

    mesh = _mesh(world)
    ref = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    for lin in model:  # both weights share one (shape, placements): the message names the first
        lin.weight = nn.Parameter(DTensor.from_local(torch.empty(4, 4, device="meta"), mesh, [Partial()],
                                                     run_check=False))
    try:
        materialize(model, "cpu", state_dict=dict(ref.state_dict()) if rank == 0 else None)
    except MaterializeError as e:
        return str(e), all(p.is_meta for p in model.parameters())
    return "no error", False


def test_unsupported_placement_raises_on_every_rank():
    for rank, (msg, still_meta) in enumerate(run_ranks(_partial_worker, 2)):
        assert "not supported: '0.weight' is a DTensor with placements" in msg and "Partial" in msg, msg
        assert f"this is rank {rank}" in msg and still_meta, msg


class ColumnNet(nn.Module):
    """Weights sharded on dim 1 (FSDP2's `shard_placement_fn`): a rank's box is a block of columns,
    not one contiguous range of the full tensor or of the checkpoint file."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(self.a(x))


def _column_worker(rank, world, source, bucket_size=None):
    from safetensors.torch import load_file
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from fsdp_fastload import materialize

    torch.manual_seed(0)
    ref = ColumnNet()
    if source.endswith(".safetensors"):  # the reference holds what the file holds, in the model's dtype
        ref.load_state_dict({k: v.float() for k, v in load_file(source).items()})
    with torch.device("meta"):
        model = ColumnNet()
    mesh = _mesh(world)
    for m in (model.a, model.b, model):
        fully_shard(m, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 else Shard(0))
    sd = (dict(ref.state_dict()) if source == "mapping" else source) if rank == 0 else None
    materialize(model, "cpu", state_dict=sd, poison=True, verify=True, bucket_size=bucket_size)
    if {p.placements[0].dim for p in model.parameters() if p.ndim == 2} != {1}:
        return ["weights are not Shard(1)"]
    return compare_sharded(model, ref, rank, world, forward=lambda m: m(torch.ones(3, 6)).detach())


@pytest.mark.parametrize("dtype", ["mapping", torch.float32, torch.bfloat16])
def test_shard_dim1_boxes(tmp_path, dtype):
    """Column boxes are cut out of the full tensor (or read whole from the file and converted from
    bf16) on src, each rank getting exactly its torch.chunk(..., dim=1) piece."""
    from safetensors.torch import save_file

    source = "mapping"
    if dtype != "mapping":
        torch.manual_seed(0)
        source = str(tmp_path / "model.safetensors")
        save_file({k: v.to(dtype).contiguous() for k, v in ColumnNet().state_dict().items()}, source)
    assert run_ranks(_column_worker, 2, source) == [[], []]


class Stack(nn.Module):
    """Mid-sized parameters with odd row counts: with a small bucket several go into one scatter
    bucket and some straddle two (and two windows of src's packers)."""

    def __init__(self):
        super().__init__()
        # first: 1.6-2.4 MB per rank, sent on its own; the transfer's first bucket takes 1 MiB of it
        self.wide = nn.Linear(200, 6000)
        self.layers = nn.ModuleList([nn.Linear(200, 257) if i % 2 == 0 else nn.Linear(257, 200) for i in range(12)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.wide(x)


def _stack_worker(rank, world, source):
    from fsdp_fastload import materialize

    ref = _seeded(Stack, "cpu", 1)
    if source != "mapping":  # the reference holds what the bf16 file holds, in the model's dtype
        from safetensors.torch import load_file
        ref.load_state_dict({k: v.float() for k, v in load_file(source).items()})
    model = shard_model(_seeded(Stack, "meta", 1), _mesh(world))
    sd = (dict(ref.state_dict()) if source == "mapping" else source) if rank == 0 else None
    # 1 MiB per scatter; the small ones packed, `wide` sent on its own over two scatters
    materialize(model, "cpu", state_dict=sd, poison=True, verify=True, bucket_size=2 << 20, direct_min=1 << 20)
    return compare_sharded(model, ref, rank, world, forward=lambda m: m(torch.ones(2, 200)).detach())


def _windowed_worker(rank, world, window, kind, arg):
    from fsdp_fastload import shard

    shard.RankPackers.WINDOW = window  # src's packers made this many entries at a time
    if kind == "stack":
        return {f"stack from {arg}": _stack_worker(rank, world, arg)}
    if kind == "column":
        return {"column": _column_worker(rank, world, arg, bucket_size=64)}
    return _hf_fsdp2_worker(rank, world, arg, "dir", bucket_size=4096)


@pytest.mark.parametrize("window", [1, 3])
def test_packers_made_window_by_window(ckpts, tmp_path, window):
    """src makes each rank's packers for a window of entries at a time, when the scatters reach it:
    the same shards bit for bit with windows of 1 and 3 entries, with entries that straddle two
    buckets (and windows), from memory and converted from a bf16 file, on 2 and 3 ranks; column
    boxes cut out of converted full tensors; a transformers checkpoint into fp32 parameters."""
    from safetensors.torch import save_file

    stack = str(tmp_path / "stack.safetensors")
    save_file({k: v.bfloat16().contiguous() for k, v in _seeded(Stack, "cpu", 1).state_dict().items()}, stack)
    torch.manual_seed(0)
    column = str(tmp_path / "column.safetensors")
    save_file({k: v.bfloat16().contiguous() for k, v in ColumnNet().state_dict().items()}, column)
    cases = {"llama_bf16": (ckpts["llama_bf16"], torch.float32)}
    for world, kind, arg in [(3, "stack", "mapping"), (2, "stack", stack), (2, "column", column), (2, "dir", cases)]:
        for rank, res in enumerate(run_ranks(_windowed_worker, world, window, kind, arg, timeout=300)):
            for name, bad in res.items():
                assert bad == [], f"rank {rank} {name}: {bad}"


def _offload_worker(rank, world):
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from fsdp_fastload import materialize

    mesh = _mesh(world)
    model = _uneven("meta")
    # one group offloads (unpinned: pinning needs an accelerator), the others do not
    fully_shard(model.blocks[0], mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=False))
    fully_shard(model.blocks[1], mesh=mesh)
    fully_shard(model, mesh=mesh)
    ref = _uneven("cpu")
    materialize(model, "cpu", state_dict=dict(ref.state_dict()) if rank == 0 else None)
    return compare_sharded(model, ref, rank, world, forward=lambda m: m(torch.ones(4, 7)).detach())


def test_groups_with_different_offload_policies():
    """fully_shard groups differ in their offload policy: every FSDPParam ends as FSDP2's own reset
    would leave it (compare_sharded checks), shards and forward bit-exact."""
    assert run_ranks(_offload_worker, 2) == [[], []]


def test_a_lazily_made_full_source_is_let_go_after_its_pieces():
    """src makes a full tensor that its ranks' shards cannot be read from directly (a checkpoint
    tensor fused by transformers' conversion, a box not contiguous in the file) once for all of its
    pieces, then drops it: not every converted tensor held until the load ends."""
    from fsdp_fastload.shard import _loader

    made = []

    def source():
        made.append(1)
        return torch.arange(6.0)

    load = _loader(source, 1, 2)
    assert torch.equal(load(), torch.arange(6.0)) and torch.equal(load(), torch.arange(6.0))
    assert made == [1]
    load()  # a third use (verify=True reads the pieces again) makes it again
    assert made == [1, 1]


def _marian_worker(rank, world, path):
    import transformers

    from fsdp_fastload import materialize

    cls = transformers.MarianMTModel
    with torch.device("meta"):
        model = cls._from_config(transformers.AutoConfig.from_pretrained(path))
    shard_model(model, _mesh(world))
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    materialize(model, "cpu", state_dict=path if rank == 0 else None, poison=True, verify=True,
                bucket_size=1 << 16)
    ref = cls.from_pretrained(path).eval()
    for n, p in ref.named_parameters():  # src's module decides (transformers 5 turns requires_grad on when loading)
        p.requires_grad_(grads[n])
    return compare_sharded(model, ref, rank, world)


@pytest.mark.parametrize("world", [2, 3])
def test_unsaved_parameters_recomputed_into_shards(tmp_path, world):
    """Marian never saves its sinusoidal positions (`_keys_to_ignore_on_save`; transformers recomputes
    them on load): every rank runs the initializer into a whole temporary tensor and keeps its shard
    (64 positions over 3 ranks: 22, 22, 20 rows); every full tensor bit-exact, verify=True passes."""
    import transformers

    cfg = transformers.MarianConfig(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                                    decoder_ffn_dim=37, max_position_embeddings=64, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, decoder_vocab_size=99)
    torch.manual_seed(0)
    transformers.MarianMTModel(cfg).save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not any("embed_positions" in k for k in f.keys())  # what makes this case
    for rank, bad in enumerate(run_ranks(_marian_worker, world, str(tmp_path), timeout=300)):
        assert bad == [], f"rank {rank}: {bad}"


def _wrapped_fsdp2_worker(rank, world, cases, hows):
    from fsdp_fastload import materialize

    mesh = _mesh(world)
    out = {}
    for name, path in cases.items():
        for how in hows:
            model = shard_model(models.wrap_layers(models.build_meta(path), how), mesh)
            materialize(model, "cpu", state_dict=path if rank == 0 else None, poison=True, verify=True)
            ref = models.wrap_layers(models.load_reference(path), how)
            eager = "compile" not in how  # (a compiled forward need not equal eager bit for bit)
            out[f"{name} {how}"] = compare_sharded(
                model, ref, rank, world, forward=(lambda m: models.logits(m, models.example_inputs(m))) if eager else None)
    return out


def test_wrapped_layers_into_fsdp2_shards(ckpts):
    """Activation checkpointing and torch.compile on each layer, then fully_shard (torchtitan's
    order), then a checkpoint whose keys lack the wrappers' segments."""
    cases = {n: ckpts[n] for n in ("llama", "qwen2_tied")}
    for rank, res in enumerate(run_ranks(_wrapped_fsdp2_worker, 2, cases, ("ac", "compile_ac"), timeout=300)):
        for name, bad in res.items():
            assert bad == [], f"rank {rank} {name}: {bad}"


class TPNet(nn.Module):
    """torchtitan's 2-D recipe in small: tensor parallel on the `tp` mesh dimension (column-wise
    layers: FSDP2 then shards their TP shard's rows again, `_StridedShard`; row-wise: `Shard(1)` on
    tp, `Shard(0)` on dp), FSDP2 on `dp`, and modules only FSDP2 shards (on the `dp` sub-mesh alone).
    Uneven sizes everywhere: 10 and 5 rows over tp 2 then dp 2 give padded shards of different sizes
    on the two tp ranks."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 10)  # column-wise
        self.down = nn.Linear(10, 7)  # row-wise
        self.norm = nn.LayerNorm(7)  # FSDP2 only
        self.head = nn.Linear(7, 5)  # column-wise, output gathered
        self.register_buffer("scale", torch.tensor([1.5, -0.5, 2.0, 1.0, 0.25]))
        self.shift = nn.Parameter(torch.zeros(5))  # the root's own: FSDP2 only, on the dp sub-mesh

    def forward(self, x):
        return self.head(self.norm(self.down(torch.relu(self.up(x))))) * self.scale + self.shift


def _tp_net(device, seed=0):
    return _seeded(TPNet, device, seed)


def _tp_fsdp(model, tp_mesh, dp_mesh=None, titan=False):
    """TPNet's plan on `tp_mesh`, then FSDP2 on `dp_mesh` (None: tensor parallelism alone). `titan`:
    as torchtitan does, sequence parallelism around the norm (its parameters Replicate on tp); its
    caller also passes FSDP2 a flattened dp dimension ("dp_shard_cp", a name the root mesh lacks)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    plan = {"up": ColwiseParallel(), "down": RowwiseParallel(), "head": ColwiseParallel(output_layouts=Replicate())}
    if titan:
        plan.update(down=RowwiseParallel(output_layouts=Shard(1)), norm=SequenceParallel(),
                    head=ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()))
    parallelize_module(model, tp_mesh, plan)
    for m in (model.up, model.down, model.norm, model.head, model) if dp_mesh is not None else ():
        fully_shard(m, mesh=dp_mesh)
    return model


def _compare_with_torch_sharding(model, torch_sharded, full) -> list[str]:
    """`model` (materialized) against `torch_sharded` (the reference sharded the same way by torch
    itself, on every rank): same placements and meshes, each local shard and FSDP2's padded shard
    (padding included) bit for bit, full_tensor() bit for bit with `full` (single-process), FSDP2's
    storage ours and its own reset finding nothing to do."""
    from torch.distributed.tensor import DTensor

    from fsdp_fastload.manifest import build_manifest
    from fsdp_fastload.shard import _fsdp_params

    bad = []
    got, want = _tensors(model), _tensors(torch_sharded)
    for n, w in want.items():
        g = got[n]
        if isinstance(w, DTensor):
            if not isinstance(g, DTensor) or g.placements != w.placements or g.device_mesh != w.device_mesh:
                bad.append(f"{n}: {type(g).__name__} {getattr(g, 'placements', None)}, torch: {w.placements}")
                continue
            if not torch.equal(g._local_tensor, w._local_tensor):
                bad.append(f"{n}: local shard differs from torch's own")
            if not torch.equal(g.full_tensor(), full[n]):
                bad.append(f"{n}: full_tensor() differs")
        elif not torch.equal(g, w):
            bad.append(f"{n}: replicated tensor differs")
    fps = _fsdp_params(model, [e for e in build_manifest(model) if e.cls == "DTensor"])
    theirs = _fsdp_params(torch_sharded, [e for e in build_manifest(torch_sharded) if e.cls == "DTensor"])
    if len(fps) != len(theirs):
        bad.append(f"FSDP2 manages {len(fps)} parameters, {len(theirs)} in torch's own sharding")
    for (n, p), (_, q) in zip(model.named_parameters(), torch_sharded.named_parameters()):
        if id(q) not in theirs:  # tensor parallel alone
            continue
        fp, tp = fps[id(p)], theirs[id(q)]
        data = fp._sharded_param_data
        if data.untyped_storage().data_ptr() != fp.sharded_param._local_tensor.untyped_storage().data_ptr():
            bad.append(f"{n}: FSDP2's padded shard is a copy")
        if data.shape != tp._sharded_param_data.shape or not torch.equal(data, tp._sharded_param_data):
            bad.append(f"{n}: FSDP2's padded shard {tuple(data.shape)} differs from torch's own "
                       f"{tuple(tp._sharded_param_data.shape)} (padding included)")
        state, local = dict(fp.__dict__), fp.sharded_param._local_tensor
        fp.reset_sharded_param()
        if fp.sharded_param._local_tensor is not local or any(
                fp.__dict__.get(k) is not v for k, v in state.items()) or fp.__dict__.keys() != state.keys():
            bad.append(f"{n}: FSDP2's reset_sharded_param changed its state")
    return bad


def _tp_worker(rank, world, source, fsdp, titan):
    from torch.distributed.device_mesh import init_device_mesh

    from fsdp_fastload import materialize

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    ref = _tp_net("cpu")
    dp = (mesh["dp"]._flatten("dp_flat") if titan else mesh["dp"]) if fsdp else None
    torch_sharded = _tp_fsdp(_tp_net("cpu"), mesh["tp"], dp, titan)
    model = _tp_fsdp(_tp_net("meta"), mesh["tp"], dp, titan)
    want_mesh = {"norm.weight": ("dp_flat", "tp") if titan else ("dp",), "shift": ("dp_flat",) if titan else ("dp",)}
    if fsdp and any(model.get_parameter(n).device_mesh.mesh_dim_names != m for n, m in want_mesh.items()):
        return [f"meshes: {[(n, model.get_parameter(n).device_mesh) for n in want_mesh]}, expected {want_mesh}"]
    sd = (dict(ref.state_dict()) if source == "mapping" else source) if rank == 0 else None
    materialize(model, "cpu", state_dict=sd, poison=True, verify=True)
    bad = _compare_with_torch_sharding(model, torch_sharded, _tensors(ref))
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1))  # (batch, sequence, features)
    if not bad and not torch.equal(model(x).detach(), torch_sharded(x).detach()):
        bad.append("forward differs from torch's own sharded reference")
    return bad


@pytest.mark.parametrize("source,fsdp,titan", [("mapping", True, False), ("file", True, False), ("file", False, False),
                                              ("mapping", True, True)])
def test_tensor_parallel_with_fsdp2_two_dim_mesh(tmp_path, source, fsdp, titan):
    """4 ranks, a (dp 2, tp 2) mesh: `_StridedShard` column-wise weights, row-wise `Shard(1)`, and
    parameters FSDP2 alone shards on the dp sub-mesh (one per tp rank), from a mapping or a file; and
    tensor parallelism alone on the tp sub-mesh (each dp rank a replica: DDP x TP); torchtitan's
    way: sequence parallelism and FSDP2 on a flattened dp dimension (its `dp_shard_cp`)."""
    if source == "file":
        from safetensors.torch import save_file

        source = str(tmp_path / "model.safetensors")
        save_file({k: v.contiguous() for k, v in _tp_net("cpu").state_dict().items()}, source)
    assert run_ranks(_tp_worker, 4, source, fsdp, titan, timeout=300) == [[]] * 4


def _llama_tp(model, mesh):
    """torchtitan's Llama plan (no sequence parallelism) on `tp`, FSDP2 per layer and root on `dp`."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(len(model.model.layers)):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    parallelize_module(model, mesh["tp"], plan)
    return shard_model(model, mesh["dp"])


def _llama_tp_worker(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh

    from fsdp_fastload import materialize

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    ref = models.load_reference(path)
    inputs = models.example_inputs(ref)
    full = _tensors(ref)
    torch_sharded = _llama_tp(models.load_reference(path), mesh)
    model = _llama_tp(models.build_meta(path), mesh)
    materialize(model, "cpu", state_dict=path if rank == 0 else None, verify=True)
    bad = _compare_with_torch_sharding(model, torch_sharded, full)
    if not bad and not torch.equal(models.logits(model, inputs), models.logits(torch_sharded, inputs)):
        bad.append("logits differ from torch's own sharded reference")
    return bad


def test_llama_tensor_parallel_with_fsdp2(ckpts):
    """A transformers Llama from its checkpoint directory, torchtitan's TP plan on a (dp 2, tp 2)
    mesh: every shard as torch shards `from_pretrained`'s model, the sharded logits bit for bit."""
    assert run_ranks(_llama_tp_worker, 4, ckpts["llama"], timeout=300) == [[]] * 4


def _hsdp_tp_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    from fsdp_fastload import materialize

    mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("replicate", "shard", "tp"))
    ref = _tp_net("cpu")
    torch_sharded, model = (_tp_fsdp(_tp_net(d), mesh["tp"], mesh["replicate", "shard"]) for d in ("cpu", "meta"))
    materialize(model, "cpu", state_dict=dict(ref.state_dict()) if rank == 0 else None, poison=True, verify=True)
    bad = _compare_with_torch_sharding(model, torch_sharded, _tensors(ref))
    if len(model.up.weight.placements) != 3:
        bad.append(f"up.weight placements {model.up.weight.placements}: not HSDP x TP")
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    if not bad and not torch.equal(model(x).detach(), torch_sharded(x).detach()):
        bad.append("forward differs from torch's own sharded reference")
    return bad


def test_hsdp_with_tensor_parallel_three_dim_mesh():
    """8 ranks, a (replicate 2, shard 2, tp 2) mesh: HSDP on a 2-D sub-mesh over TP (placements
    (Replicate, _StridedShard, Shard) and the like), every shard as torch's own, forward bit for bit."""
    assert run_ranks(_hsdp_tp_worker, 8, timeout=400) == [[]] * 8

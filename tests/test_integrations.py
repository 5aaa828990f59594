"""Training frameworks on real gloo ranks: accelerate's FSDP2 path (`integrations.accelerate.enable()`)
and the HF Trainer over it, DDP (`init_sync=False`) and FSDP1 (`sync_module_states=False`) after `materialize`.

Every run starts from a tiny transformers checkpoint: rank 0 loads it with `from_pretrained`, the
other ranks build the architecture on `meta`. The reference is the same training steps in a single
process without any wrapper (also spawned, so threads and allocator settings match the ranks).

Why the loss curves are compared bit for bit: every rank trains on the same batch, the world is 2,
and the gradient average of two identical fp32 gradients is exact ((g + g) / 2 and g / 2 + g / 2
are both g: scaling by a power of two does not round). The forward/backward runs the same kernels on
the same shapes as the single process (FSDP all-gathers the exact parameters), and the optimizer
update is elementwise, so a shard is updated exactly as its slice of the full tensor. A loss that
differs in the last bit therefore means a wrong value, not noise. (With a world that is not a power
of two, or bf16 gradient reduction, only the first loss would stay exact.)
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import models
from dist_harness import run_ranks

STEPS = 3
_LAYER = {"llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer"}  # by ModelSpec.family


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("integrations"))
    return {n: models.make_checkpoint(n, root) for n in ("llama", "qwen2_tied", "llama_bf16")}


def _optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _train(model, inputs, opt, backward=None, steps=STEPS) -> list[float]:
    return models.train_losses(model, inputs, opt, steps=steps, backward=backward)


def _single_worker(rank, world, path, dtype, device="cpu"):
    """The reference: plain single-process training (world 1, no wrapper)."""
    model = models.load_reference(path, dtype=dtype).train().to(device)
    inputs = {k: v.to(device) for k, v in models.example_inputs(model).items()}
    return _train(model, inputs, _optimizer(model.parameters()))


@functools.lru_cache(maxsize=None)
def _reference_losses(path, dtype=torch.float32):
    return run_ranks(_single_worker, 1, path, dtype)[0]


def _load(rank, path, dtype=None, *, every_rank=False):
    """Rank 0 (or every rank with every_rank=True) loads the checkpoint; the others build on meta."""
    if rank == 0 or every_rank:
        return models.load_reference(path, dtype=dtype).train()
    return models.build_meta(path, dtype=dtype).train()


def _tensors(model):
    """name -> tensor, under the names of the unwrapped model (activation checkpointing wraps layers)."""
    return {n.replace("_checkpoint_wrapped_module.", ""): t for n, t in models.tensors(model).items()}


# ------------------------------------------------------------------------------------------------
# accelerate (FSDP2, cpu_ram_efficient_loading)
# ------------------------------------------------------------------------------------------------


def _accelerator(mixed_precision: str, layer_cls: str, cpu_offload: bool, activation_checkpointing: bool,
                 on_cuda: bool = False):
    """accelerate picks DistributedType.FSDP only for GPU-like devices: force it on CPU ranks (and
    on CUDA ranks too, which run no `accelerate launch` here: the same plugin either way)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    acc = Accelerator(cpu=not on_cuda, mixed_precision=mixed_precision)
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, cpu_ram_efficient_loading=True, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[layer_cls], activation_checkpointing=activation_checkpointing,
        cpu_offload=CPUOffloadPolicy(pin_memory=on_cuda) if cpu_offload else False)  # no pinning without CUDA
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision, override=True)
    state.fsdp_plugin = plugin
    return acc


def _fsdp_groups_holding(model, p) -> int:
    """How many FSDP2 parameter groups manage the parameter object `p`."""
    from torch.distributed.fsdp import FSDPModule

    states, n = {}, 0
    for m in model.modules():
        if isinstance(m, FSDPModule):
            s = m._get_fsdp_state()
            states[id(s)] = s
    for s in states.values():
        groups = getattr(s, "_fsdp_param_groups", None)  # torch <= 2.9: one optional group
        if groups is None:
            groups = [g for g in [s._fsdp_param_group] if g is not None]
        for g in groups:
            n += sum(fp.sharded_param is p for fp in g.fsdp_params)
    return n


def _check_prepared(model, opt, ref, *, param_dtype, pinned: bool = False) -> list[str]:
    """Differences between the prepared (sharded) model and the checkpoint (collective: full_tensor)."""
    from torch.distributed.tensor import DTensor

    bad = []
    got, want = _tensors(model), _tensors(ref)
    if set(got) != set(want):
        return [f"names differ: {sorted(set(got) ^ set(want))[:5]}"]
    for name in sorted(got):
        g, w = got[name], want[name]
        if isinstance(w, nn.Parameter):
            if not (isinstance(g, DTensor) and isinstance(g, nn.Parameter)):
                bad.append(f"{name}: {type(g).__name__}, not a DTensor nn.Parameter")
                continue
            local = g.to_local()
            if local.is_meta or local.device.type != "cpu":
                bad.append(f"{name}: local shard on {local.device}")
                continue
            if pinned and local.numel() and not local.is_pinned():
                bad.append(f"{name}: offloaded shard not in pinned memory")
            mesh = g.device_mesh
            if mesh.device_type != "cpu":  # CPU-offloaded shards of a CUDA mesh: gathered on the GPU
                g = DTensor.from_local(local.to(mesh.device_type), mesh, g.placements, shape=g.shape,
                                       stride=g.stride())
            full = g.full_tensor().cpu()
            if full.dtype != param_dtype or not torch.equal(full, w.to(param_dtype)):
                bad.append(f"{name}: full_tensor() is not the checkpoint's value ({full.dtype})")
            if g.requires_grad != w.requires_grad:
                bad.append(f"{name}: requires_grad {g.requires_grad}")
        elif g.is_meta or g.dtype != w.dtype or not torch.equal(g.cpu(), w):  # (buffers stay on the GPU)
            bad.append(f"{name}: buffer differs from the checkpoint's / from_pretrained's")
    # ties: the same groups of names share one object, and a tied parameter is in one FSDP group
    groups, ref_groups = {}, {}
    for n, t in got.items():
        groups.setdefault(id(t), set()).add(n)
    for n, t in want.items():
        ref_groups.setdefault(id(t), set()).add(n)
    if {frozenset(v) for v in groups.values()} != {frozenset(v) for v in ref_groups.values()}:
        bad.append("tie groups differ")
    for names in ref_groups.values():
        if len(names) > 1:
            p = got[sorted(names)[0]]
            if (k := _fsdp_groups_holding(model, p)) != 1:
                bad.append(f"tied {sorted(names)} is managed by {k} FSDP groups, expected 1")
    if any("data_ptr" in p.__dict__ for p in model.parameters()):
        bad.append("a parameter kept enable()'s data_ptr stand-in after prepare")
    # the optimizer holds exactly the model's (sharded) parameters, each once
    in_opt = [p for g in opt.optimizer.param_groups for p in g["params"]]
    if len({id(p) for p in in_opt}) != len(in_opt) or {id(p) for p in in_opt} != {id(p) for p in model.parameters()}:
        bad.append(f"optimizer holds {len({id(p) for p in in_opt})} distinct of {len(in_opt)} slots; "
                   f"the model has {len(list(model.parameters()))} parameters")
    return bad


def _accelerate_worker(rank, world, path, flow, mixed_precision="no", cpu_offload=False,
                       activation_checkpointing=False, on_cuda=False):
    """`on_cuda` (tests/test_cuda.py, NCCL, one GPU per rank): the same on the GPU; the shards must
    then be offloaded (CPU offload, pinned), which is what `_check_prepared` checks."""
    import fsdp_fastload.integrations.accelerate as fastload_accelerate

    assert cpu_offload or not on_cuda, "on CUDA only the CPU-offloaded case is checked"
    acc = _accelerator(mixed_precision, _LAYER[models.spec_for(path).family], cpu_offload,
                       activation_checkpointing, on_cuda)
    # "fastload": enable(), ranks != 0 build the model on meta. "stock": accelerate's own loader, which
    # needs real values on every rank; "fastload_loaded": enable() with real values on every rank (what
    # transformers 5.24's cpu-ram-efficient from_pretrained gives, see models.build_seed_flow)
    if flow.startswith("fastload"):
        fastload_accelerate.enable()
    model = _load(rank, path, every_rank=flow in ("stock", "fastload_loaded"))
    ref = models.load_reference(path)
    opt = _optimizer(model.parameters())
    model, opt = acc.prepare(model, opt)
    from fsdp_fastload import api

    loaded = api.last_stats.get("tensors")  # the loader's materialize call (None: not called)
    unique = len({id(t) for t in _tensors(model).values()})
    param_dtype = torch.float32 if mixed_precision != "no" else models.spec_for(path).dtype
    bad = _check_prepared(model, opt, ref, param_dtype=param_dtype, pinned=on_cuda)
    inputs = {k: v.to(acc.device) for k, v in models.example_inputs(ref).items()}
    losses = _train(model, inputs, opt, backward=acc.backward)
    fastload_accelerate.disable()
    wrapped = any(n.endswith("_checkpoint_wrapped_module") for n, _ in model.named_modules())
    return {"bad": bad, "losses": losses, "materialized": (loaded, unique), "checkpointed": wrapped}


@pytest.mark.parametrize("case,activation_checkpointing", [("llama", False), ("qwen2_tied", True)])
def test_accelerate_fsdp2_enable_matches_single_process(ckpts, case, activation_checkpointing):
    """enable(), then accelerate's real `prepare(model, optimizer)` on 2 ranks (rank 1 on meta):
    every full_tensor() is the checkpoint's, buffers and ties are right, the optimizer holds each
    sharded parameter once, and the loss curve is the single process's, bit for bit (activation
    checkpointing recomputes the same values, and renames the layers' tensors in the module tree)."""
    path = ckpts[case]
    want = _reference_losses(path)
    for rank, res in enumerate(run_ranks(_accelerate_worker, 2, path, "fastload", "no", False,
                                         activation_checkpointing, timeout=300)):
        assert res["bad"] == [], f"rank {rank}: {res['bad']}"
        assert res["checkpointed"] == activation_checkpointing
        loaded, unique = res["materialized"]
        assert loaded == unique, f"rank {rank}: materialize loaded {loaded} of {unique} tensors"
        assert res["losses"][0] == want[0], f"rank {rank}: first loss {res['losses'][0]} != {want[0]}"
        assert res["losses"] == want, f"rank {rank}: {res['losses']} != {want}"


def test_accelerate_mixed_precision_and_cpu_offload_match_accelerates_own_loader(ckpts):
    """bf16 checkpoint, mixed_precision="bf16" (accelerate upcasts the trainable parameters to fp32
    before capturing the full state dict) and CPU offload: enable() with rank 1 on meta gives what
    accelerate's own loader gives with the checkpoint loaded on every rank, bit for bit. So does
    enable() when every rank loaded the checkpoint (HF Trainer under transformers 5.24)."""
    path = ckpts["llama_bf16"]
    stock = run_ranks(_accelerate_worker, 2, path, "stock", "bf16", True, timeout=300)
    for rank in range(2):
        assert stock[rank]["bad"] == [], f"accelerate's own loader, rank {rank}: {stock[rank]['bad']}"
        assert stock[rank]["materialized"][0] is None  # accelerate's own loader, no materialize
    for flow in ("fastload", "fastload_loaded"):
        ours = run_ranks(_accelerate_worker, 2, path, flow, "bf16", True, timeout=300)
        for rank in range(2):
            assert ours[rank]["bad"] == [], f"{flow} rank {rank}: {ours[rank]['bad']}"
            assert ours[rank]["materialized"][0] == ours[rank]["materialized"][1], flow
            assert ours[rank]["losses"] == stock[rank]["losses"], \
                f"{flow} rank {rank}: {ours[rank]['losses']} vs {stock[rank]['losses']}"


def _trainer_worker(rank, world, path, flow, bf16=False, peft=False):
    """The HF Trainer's own FSDP2 path (`TrainingArguments(fsdp=..., fsdp_config={"fsdp_version": 2,
    "cpu_ram_efficient_loading": True})`): the Trainer builds its Accelerator, prepares the model,
    creates the optimizer afterwards, shards the data and trains. `flow`: "single" (world 1, no FSDP:
    the reference), "stock" (accelerate's own loader, every rank loaded), "fastload" (enable(); rank
    != 0 on meta) or "fastload_loaded" (enable(); every rank loaded the checkpoint, as `from_pretrained`
    on every rank gives under transformers 5.24). `bf16`: bf16 mixed precision and gradient
    checkpointing (compared with "stock": FSDP2's mixed precision computes unlike a single process).
    Every sample is the same sequence and gradient clipping is off, so the sharded run's losses and
    weights are the single process's bit for bit (module docstring; a clipping norm summed over
    shards would round differently). `peft`: LoRA adapters (PEFT's `get_peft_model`, seeded) on every
    rank's model before the Trainer sees it, on meta too: the base frozen, the adapters trained."""
    import hashlib
    import tempfile

    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
    from torch.distributed.tensor import DTensor
    from transformers import Trainer, TrainingArguments

    import fsdp_fastload.integrations.accelerate as fastload_accelerate
    from fsdp_fastload import api

    fsdp = {}
    if flow != "single":
        if flow != "stock":
            fastload_accelerate.enable()
        fsdp = dict(fsdp="full_shard auto_wrap", fsdp_config={
            "fsdp_version": 2, "cpu_ram_efficient_loading": True,
            "transformer_layer_cls_to_wrap": [_LAYER[models.spec_for(path).family]]})
        # the one change to the Trainer's path: accelerate picks FSDP only for GPU-like devices
        init = AcceleratorState.__init__

        def fsdp_on_cpu(self, *a, fsdp_plugin=None, **k):
            init(self, *a, fsdp_plugin=fsdp_plugin, **k)
            if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
                self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

        AcceleratorState.__init__ = fsdp_on_cpu
    model = _load(rank, path, every_rank=flow != "fastload")
    if peft:  # rank 0's seeded adapter values reach the meta ranks through materialize
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(7)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                                 init_lora_weights="gaussian"))
    ids = models.example_inputs(models.load_reference(path))["input_ids"][0]
    data = [{"input_ids": ids, "labels": ids}] * 4
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=2, max_steps=STEPS, learning_rate=1e-2, weight_decay=0.1,
            lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=True, seed=0, report_to=[], logging_steps=1,
            save_strategy="no", dataloader_num_workers=0, bf16=bf16, gradient_checkpointing=bf16, **fsdp)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
    fastload_accelerate.disable()
    params = dict(trainer.model.named_parameters())
    full = {n.replace("_checkpoint_wrapped_module.", ""): (p.full_tensor() if isinstance(p, DTensor) else p).detach()
            for n, p in params.items()}
    digest = hashlib.sha256()
    for n in sorted(full):
        digest.update(n.encode() + full[n].contiguous().view(torch.uint8).numpy().tobytes())
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "sharded": sum(isinstance(p, DTensor) for p in params.values()), "params": len(params),
            "materialized": api.last_stats.get("tensors") if flow.startswith("fastload") else None,
            "weights": digest.hexdigest()}


@pytest.mark.parametrize("case,bf16,peft", [("qwen2_tied", False, False), ("llama_bf16", True, False),
                                            ("llama", False, True)], ids=["qwen2_tied", "llama_bf16", "llama-peft"])
def test_hf_trainer_fsdp2_enable_matches_single_process(ckpts, case, bf16, peft):
    """enable(), then the HF Trainer itself with FSDP2 on 2 CPU ranks: materialize loads the model,
    every parameter is an FSDP2 shard, and the loss curve and the trained weights equal a
    single-process Trainer's, bit for bit, with rank 1 on meta and with every rank loaded (tied
    embeddings); with bf16 mixed precision and gradient checkpointing, those of the Trainer with
    accelerate's own loader. With PEFT's LoRA adapters (frozen base, rank 1's adapters on meta): the
    single process's too."""
    path = ckpts[case]
    flows = ("fastload",) if bf16 or peft else ("fastload", "fastload_loaded")
    (want, *_) = run_ranks(_trainer_worker, 2 if bf16 else 1, path, "stock" if bf16 else "single", bf16, peft,
                           timeout=300)
    assert len(want["losses"]) == STEPS and (not bf16 or want["sharded"] == want["params"] > 0)
    for flow in flows:
        for rank, res in enumerate(run_ranks(_trainer_worker, 2, path, flow, bf16, peft, timeout=300)):
            where = f"{flow}, rank {rank}"
            assert res["sharded"] == res["params"] > 0, f"{where}: {res['sharded']} of {res['params']} sharded"
            assert res["materialized"], f"{where}: the Trainer's load did not go through materialize"
            assert res["losses"] == want["losses"], f"{where}: {res['losses']} != {want['losses']}"
            assert res["weights"] == want["weights"], f"{where}: trained weights differ from the reference's"


def test_enable_disable_patch_and_restore_accelerate():
    import accelerate.accelerator as acc_mod
    import accelerate.utils as acc_utils
    from accelerate.utils import fsdp_utils

    import fsdp_fastload.integrations.accelerate as fa

    names = [(fsdp_utils, "fsdp2_load_full_state_dict"), (acc_utils, "fsdp2_load_full_state_dict"),
             (fsdp_utils, "fsdp2_prepare_model"), (acc_utils, "fsdp2_prepare_model"),
             (acc_mod, "fsdp2_prepare_model"), (acc_mod.Accelerator, "_prepare_fsdp2")]
    before = [getattr(ns, a) for ns, a in names]
    try:
        fa.enable()
        fa.enable()  # idempotent: the originals stay accelerate's
        assert fa.is_enabled()
        after = [getattr(ns, a) for ns, a in names]
        assert all(x is not y for x, y in zip(after, before))
        assert fsdp_utils.fsdp2_load_full_state_dict is fa.load_full_state_dict
        assert acc_mod.fsdp2_prepare_model is fa.prepare_model
    finally:
        fa.disable()
    fa.disable()
    assert not fa.is_enabled()
    assert all(getattr(ns, a) is b for (ns, a), b in zip(names, before))


# ------------------------------------------------------------------------------------------------
# DDP and FSDP1: materialize the full model, then wrap without the wrapper's own rank-0 broadcast
# ------------------------------------------------------------------------------------------------


def _same_on_every_rank(tensors) -> bool:
    import torch.distributed as dist

    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _ddp_worker(rank, world, path, on_cuda=False):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fsdp_fastload import materialize

    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    model = _load(rank, path, torch.float32)
    materialize(model, device)  # src-model flow: rank 0's loaded model onto every rank
    # every rank already holds rank 0's values: no re-broadcast
    ddp = DDP(model, device_ids=[device] if on_cuda else None, init_sync=False)
    inputs = {k: v.to(device) for k, v in models.example_inputs(model).items()}
    losses = _train(ddp, inputs, _optimizer(ddp.parameters()))
    return {"losses": losses, "same": _same_on_every_rank(model.parameters()),
            "tied": model.lm_head.weight is model.model.embed_tokens.weight}


@pytest.mark.parametrize("case", ["qwen2_tied"])
def test_ddp_init_sync_false_matches_single_process(ckpts, case):
    path = ckpts[case]
    want = _reference_losses(path)
    for rank, res in enumerate(run_ranks(_ddp_worker, 2, path, timeout=300)):
        assert res["losses"][0] == want[0], f"rank {rank}: first loss {res['losses'][0]} != {want[0]}"
        assert res["losses"] == want, f"rank {rank}: {res['losses']} != {want}"
        assert res["same"], f"rank {rank}: parameters differ across ranks after training"
        assert res["tied"] == models.spec_for(path).tied


def _fsdp1_worker(rank, world, path):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from fsdp_fastload import materialize

    model = models.build_meta(path, dtype=torch.float32).train()  # every rank on meta, rank 0 reads the files
    materialize(model, "cpu", state_dict=path if rank == 0 else None)
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={type(model.model.layers[0])})
    fsdp = FSDP(model, auto_wrap_policy=policy, device_id=torch.device("cpu"), sync_module_states=False,
                use_orig_params=True)
    losses = _train(fsdp, models.example_inputs(model), _optimizer(fsdp.parameters()))
    with FSDP.summon_full_params(fsdp):
        same = _same_on_every_rank(model.parameters())
    return {"losses": losses, "same": same}


def test_fsdp1_sync_module_states_false_matches_single_process(ckpts):
    # FSDP1 runs on CPU ranks under gloo (device_id=torch.device("cpu")) in torch 2.13.
    path = ckpts["llama"]
    want = _reference_losses(path)
    for rank, res in enumerate(run_ranks(_fsdp1_worker, 2, path, timeout=300)):
        assert res["losses"][0] == want[0], f"rank {rank}: first loss {res['losses'][0]} != {want[0]}"
        assert res["losses"] == want, f"rank {rank}: {res['losses']} != {want}"
        assert res["same"], f"rank {rank}: full parameters differ across ranks after training"

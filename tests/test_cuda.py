"""The CUDA path, on a machine with a GPU (skipped without CUDA: CI has none).

materialize onto `cuda` over gloo (two ranks sharing the first GPU when there is one) and over NCCL
(one rank per GPU: world 1 on a one-GPU machine, which still runs src's staging and the CUDA-stream
ordering), from a source model on CPU, a source model already on the GPU, and a checkpoint
directory; FSDP2 shards on a CUDA mesh. Every result is compared bit for bit, logits included, with
single-process loading moved to the same GPU; every tensor must start where the caching allocator
would start it (512-byte lines: kernels choose by alignment), receivers' tensors must come from one
allocation and the buffers from a block of their own, freed apart from the parameters'.
"""
from __future__ import annotations

import gc

import pytest
import torch

import models
from dist_harness import run_ranks
from test_fsdp2 import compare_sharded, shard_model
from test_materialize import compare

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ALIGN = 512  # fsdp_fastload.layout.CUDA_ALIGN, spelled here so that a change to it is noticed
CASES = ("llama", "llama_bf16", "qwen2_tied", "gemma3_bf16", "bert_mlm", "gpt2", "mixtral")


def _gpu(rank: int) -> torch.device:
    return torch.device("cuda", rank % torch.cuda.device_count())


def _nccl_world() -> int:
    return min(2, torch.cuda.device_count())


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cuda"))
    return {n: models.make_checkpoint(n, root) for n in CASES}


def _block_checks(box: list, dev) -> list[str]:
    """A receiver's tensors (its model, the one item of `box`, whose other references the caller
    dropped): parameters from one allocation, buffers outside it, and the parameters' block given
    back to the caching allocator once the parameters are gone while the buffers live on, as after
    FSDP1 flattens the parameters (on CUDA a block is freed only with its last tensor)."""
    model = box.pop()
    params = list({id(p): p for p in model.parameters()}.values())
    bufs = list(model.buffers())
    # gaps: src's own between tensors it holds back to back (kept, to send such runs in one piece)
    # and where the buffers lay before they moved out
    slack = sum(t.untyped_storage().nbytes() for t in params) // 100 + ALIGN * len(params)
    bad = models.one_allocation(params, align=ALIGN,
                                slack=slack + sum(b.untyped_storage().nbytes() + ALIGN for b in bufs))
    bad += models.one_allocation(bufs, align=ALIGN) + models.buffers_in_params_block(model)
    param_bytes = sum(p.untyped_storage().nbytes() for p in params)
    gc.collect()
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    del params, model  # `bufs` keeps the buffers
    gc.collect()
    torch.cuda.synchronize(dev)
    freed = before - torch.cuda.memory_allocated(dev)
    if freed < param_bytes:
        bad.append(f"the parameters' {param_bytes} bytes are gone but only {freed} bytes were freed")
    return bad


def _misaligned(model) -> list[str]:
    return [f"{n} starts {t.data_ptr() % ALIGN} bytes into a {ALIGN}-byte line"
            for n, t in models.tensors(model).items() if t.numel() and t.data_ptr() % ALIGN]


def _hf_worker(rank, world, paths, source):
    from fsdp_fastload import api, materialize

    dev = _gpu(rank)
    torch.cuda.set_device(dev)
    out = {}
    for name, path in paths.items():
        try:
            sd = None
            if rank != 0 or source == "dir":
                model = models.build_meta(path)
                sd = path if rank == 0 else None
            else:
                model = models.load_reference(path)
                if source == "model_on_gpu":
                    model = model.to(dev)
            materialize(model, dev, state_dict=sd, poison=True, verify=True)
            from_files = api.last_stats["read_from_mapped_files"]
            ref = models.load_reference(path).to(dev)
            bad = [] if from_files or rank != 0 or source != "model_on_cpu" else [
                "src read nothing from the files its tensors are mapped from (read_mapped's default onto a device)"]
            bad += compare(model, ref, lambda m: models.logits(m, models.example_inputs(m)), device=dev)
            bad += _misaligned(model)
            del ref
            if not bad and (rank != 0 or source == "dir"):
                box = [model]
                del model
                bad += _block_checks(box, dev)
            out[name] = bad
        except Exception as e:
            out[name] = [f"raised {type(e).__name__}: {e}"]
    return out


@pytest.mark.parametrize("source", ["model_on_cpu", "model_on_gpu", "dir"])
def test_gloo_onto_cuda_bit_exact(ckpts, source):
    """gloo moves CUDA tensors through host memory: the same pipeline, one GPU shared by the ranks."""
    for rank, res in enumerate(run_ranks(_hf_worker, 2, ckpts, source, timeout=400)):
        for name, bad in res.items():
            assert bad == [], f"rank {rank} {name}: {bad}"


@pytest.mark.skipif(not torch.distributed.is_nccl_available(), reason="needs NCCL")
@pytest.mark.parametrize("source", ["model_on_cpu", "model_on_gpu", "dir"])
def test_nccl_bit_exact(ckpts, source):
    res = run_ranks(_hf_worker, _nccl_world(), ckpts, source, timeout=400, backend="nccl")
    for rank, r in enumerate(res):
        for name, bad in r.items():
            assert bad == [], f"rank {rank} {name}: {bad}"


def _fsdp2_worker(rank, world, paths):
    from torch.distributed.device_mesh import init_device_mesh

    from fsdp_fastload import materialize
    from fsdp_fastload.manifest import build_manifest
    from fsdp_fastload.shard import _fsdp_params

    dev = _gpu(rank)
    torch.cuda.set_device(dev)
    mesh = init_device_mesh("cuda", (world,))
    out = {}
    for name, path in paths.items():
        try:
            model = shard_model(models.build_meta(path), mesh)
            materialize(model, dev, state_dict=path if rank == 0 else None, poison=True, verify=True)
            ref = models.load_reference(path).to(dev)
            out[name] = compare_sharded(model, ref, rank, world, device=dev, align=ALIGN,
                                        forward=lambda m: models.logits(m, models.example_inputs(m)))
            out[name] += [f"{fp._module_info.param_name}: padded shard not {ALIGN}-aligned"
                          for fp in _fsdp_params(model, [e for e in build_manifest(model) if e.cls == "DTensor"]).values()
                          if fp._sharded_param_data.numel() and fp._sharded_param_data.data_ptr() % ALIGN]
        except Exception as e:
            out[name] = [f"raised {type(e).__name__}: {e}"]
    return out


@pytest.mark.skipif(not torch.distributed.is_nccl_available(), reason="needs NCCL")
def test_fsdp2_on_cuda_mesh_bit_exact(ckpts):
    paths = {n: ckpts[n] for n in ("llama", "qwen2_tied", "gemma3_bf16", "mixtral")}
    res = run_ranks(_fsdp2_worker, _nccl_world(), paths, timeout=400, backend="nccl")
    for rank, r in enumerate(res):
        for name, bad in r.items():
            assert bad == [], f"rank {rank} {name}: {bad}"


def test_alloc_beyond_the_device_raises_in_python():
    """A buffer larger than the GPU could ever give is refused before the op runs (a clean
    OutOfMemoryError naming the sizes; on one image any exception thrown inside the extension
    crashed the process), and a fitting one still allocates."""
    from fsdp_fastload import ops

    dev = torch.device("cuda", 0)
    _, total = torch.cuda.mem_get_info(0)
    with pytest.raises(torch.OutOfMemoryError, match=r"fsdp_fastload alloc, checked before allocating.*cuda:0"):
        ops.alloc(2 * total, dev)
    assert ops.alloc(1 << 20, dev).numel() == 1 << 20


# ------------------------------------------------------------------------------------------------
# Training frameworks on the GPU (tests/test_integrations.py's workers, NCCL, one GPU per rank)
# ------------------------------------------------------------------------------------------------


def _close(got: list[float], want: list[float]) -> bool:
    """Losses after the first step: the backward on a GPU may use kernels with atomics (embedding
    gradients), which need not repeat to the last bit across processes; the forward does."""
    return got[0] == want[0] and all(abs(a - b) <= 1e-5 * max(abs(b), 1.0) for a, b in zip(got, want))


@pytest.mark.skipif(not torch.distributed.is_nccl_available(), reason="needs NCCL")
def test_accelerate_fsdp2_bf16_pinned_cpu_offload_on_cuda(ckpts):
    """accelerate's FSDP2 on the GPU, bf16 mixed precision, CPU offload with pinned shards:
    enable() (ranks != 0 on meta) gives every shard the checkpoint's value, offloaded to pinned
    host memory, and the training losses of accelerate's own loader."""
    import test_integrations as ti

    path, world = ckpts["llama_bf16"], _nccl_world()
    stock = run_ranks(ti._accelerate_worker, world, path, "stock", "bf16", True, False, True,
                      timeout=400, backend="nccl")
    ours = run_ranks(ti._accelerate_worker, world, path, "fastload", "bf16", True, False, True,
                     timeout=400, backend="nccl")
    for rank in range(world):
        assert stock[rank]["bad"] == [], f"accelerate's own loader, rank {rank}: {stock[rank]['bad']}"
        assert ours[rank]["bad"] == [], f"rank {rank}: {ours[rank]['bad']}"
        loaded, unique = ours[rank]["materialized"]
        assert loaded == unique, f"rank {rank}: materialize loaded {loaded} of {unique} tensors"
        assert _close(ours[rank]["losses"], stock[rank]["losses"]), \
            f"rank {rank}: {ours[rank]['losses']} vs accelerate's own {stock[rank]['losses']}"


@pytest.mark.skipif(not torch.distributed.is_nccl_available(), reason="needs NCCL")
def test_ddp_init_sync_false_on_cuda(ckpts):
    """materialize onto the GPU, then DDP(device_ids=[gpu], init_sync=False): the losses of plain
    single-process training on the same GPU, and the ties kept."""
    import test_integrations as ti

    path = ckpts["qwen2_tied"]
    want = run_ranks(ti._single_worker, 1, path, torch.float32, "cuda", timeout=300, backend="nccl")[0]
    for rank, res in enumerate(run_ranks(ti._ddp_worker, _nccl_world(), path, True, timeout=400,
                                         backend="nccl")):
        assert _close(res["losses"], want), f"rank {rank}: {res['losses']} vs single process {want}"
        assert res["same"], f"rank {rank}: parameters differ across ranks after training"
        assert res["tied"] == models.spec_for(path).tied

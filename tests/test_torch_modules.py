"""torch.nn's own building blocks with structure of their own, in all three flows on 2 gloo ranks:
recurrent layers (flat weight lists, refreshed in forward), attention with packed or separate
projections, parametrizations (new style: `parametrizations.weight.original0`) and the old
weight/spectral norm hooks (`weight_g`/`weight_v`, `weight_orig` with `u`/`v` buffers), running
statistics (int64 `num_batches_tracked`). Each is compared with the model it was saved from: every
state_dict tensor and the forward output, bit for bit.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import models
from dist_harness import run_ranks


def _cases():
    from torch.nn.utils import spectral_norm as hook_spectral_norm
    from torch.nn.utils import weight_norm as hook_weight_norm
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    def seq(mods):
        return lambda: nn.Sequential(*mods())

    return {  # name: (build, inputs)
        "lstm": (lambda: nn.LSTM(8, 16, num_layers=2, batch_first=True), lambda: (torch.randn(2, 5, 8),)),
        "gru_bidirectional": (lambda: nn.GRU(8, 16, bidirectional=True), lambda: (torch.randn(5, 2, 8),)),
        "mha": (lambda: nn.MultiheadAttention(16, 2), lambda: (torch.randn(4, 2, 16),) * 3),
        "mha_kdim": (lambda: nn.MultiheadAttention(16, 2, kdim=8, vdim=8),
                     lambda: (torch.randn(4, 2, 16), torch.randn(4, 2, 8), torch.randn(4, 2, 8))),
        "encoder": (lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0), 2,
                                                  enable_nested_tensor=False), lambda: (torch.randn(4, 2, 16),)),
        "weight_norm": (lambda: weight_norm(nn.Conv1d(4, 8, 3)), lambda: (torch.randn(2, 4, 10),)),
        "spectral_norm": (lambda: spectral_norm(nn.Linear(8, 8)), lambda: (torch.randn(2, 8),)),
        "weight_norm_hook": (lambda: hook_weight_norm(nn.Linear(8, 8)), lambda: (torch.randn(2, 8),)),
        "spectral_norm_hook": (lambda: hook_spectral_norm(nn.Linear(8, 8)), lambda: (torch.randn(2, 8),)),
        "norms": (seq(lambda: (nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4))),
                  lambda: (torch.randn(2, 3, 8, 8),)),
        "convT_prelu_instnorm": (seq(lambda: (nn.ConvTranspose2d(3, 4, 3), nn.PReLU(4),
                                              nn.InstanceNorm2d(4, affine=True, track_running_stats=True))),
                                 lambda: (torch.randn(2, 3, 6, 6),)),
        "embedding_bilinear": (_EmbeddingBilinear, lambda: (torch.tensor([[0, 3, 9]]),)),
        "memory_formats": (_MemoryFormats, lambda: (torch.randn(2, 3, 9, 9), torch.randn(5, 12))),
    }


class _EmbeddingBilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.b = nn.Embedding(10, 4, padding_idx=0), nn.Bilinear(4, 4, 3)

    def forward(self, ids):
        x = self.e(ids)
        return self.b(x, x)


NOT_FSDP2 = {"memory_formats"}  # fully_shard refuses non-contiguous parameters (torch 2.13)


class _MemoryFormats(nn.Module):
    """Tensors laid out in another order than contiguous: a channels_last conv weight, a transposed
    parameter, a channels_last buffer. Their strides pick the kernels (and so the rounding)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3).to(memory_format=torch.channels_last)
        self.w = nn.Parameter(torch.randn(40, 12).t())
        self.register_buffer("scale", torch.rand(2, 16, 7, 7).to(memory_format=torch.channels_last))
        self.offsets = _Offsets()  # a non-persistent channels_last buffer: recomputed from a checkpoint

    def forward(self, x, y):
        return torch.cat([(self.conv(x) * self.scale + self.offsets.grid).flatten(), (y @ self.w).flatten(),
                          self.w.sum(0)])


class _Offsets(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("grid", torch.empty(1, 16, 7, 7).to(memory_format=torch.channels_last),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.grid.copy_(torch.arange(16 * 7 * 7, dtype=torch.float32).reshape(1, 16, 7, 7) / 100)


def _reference(build, inputs):
    torch.manual_seed(0)
    ref = build()
    ref.train()  # a training-mode forward: running statistics (and u/v) move off their init
    torch.manual_seed(1)
    ref(*inputs())
    return ref.eval()


def _forward(model, inputs):
    torch.manual_seed(2)
    with torch.no_grad():
        out = model(*inputs())
    return out[0] if isinstance(out, tuple) else out


def _worker(rank, world, flow, ckpt_dir):
    from fsdp_fastload import materialize

    out = {}
    for name, (build, inputs) in _cases().items():
        if flow == "fsdp2" and name in NOT_FSDP2:
            continue
        ref = _reference(build, inputs)
        model = models.replica(build, ref, real=rank == 0 and flow == "model").eval()
        if flow == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        path = os.path.join(ckpt_dir, f"{name}.safetensors") if rank == 0 and flow != "model" else None
        materialize(model, "cpu", state_dict=path, poison=True, verify=True)
        got = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        want = ref.state_dict()
        bad = [k for k in want if k not in got or got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
        # the skeleton's layout kept (load_state_dict copies in place); FSDP2's shards are its own
        have = {**model.state_dict(), **dict(model.named_buffers())}  # non-persistent buffers too
        ref_all = {**want, **dict(ref.named_buffers())}
        bad += [f"{k}: strides {t.stride()} != {ref_all[k].stride()}" for k, t in have.items()
                if type(t) is torch.Tensor and t.stride() != ref_all[k].stride()]
        if not bad and not torch.equal(_forward(model, inputs), _forward(ref, inputs)):
            bad.append("forward output differs")
        out[name] = bad
    return out


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("torch_modules")
    for name, (build, inputs) in _cases().items():
        ref = _reference(build, inputs)
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(root / f"{name}.safetensors"))
    return str(root)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("flow", ["model", "checkpoint", "fsdp2"])
def test_torch_modules_bit_exact(ckpt_dir, flow):
    for rank, res in enumerate(run_ranks(_worker, 2, flow, ckpt_dir, timeout=240)):
        for name, bad in res.items():
            assert bad == [], f"rank {rank} {flow} {name}: {bad}"

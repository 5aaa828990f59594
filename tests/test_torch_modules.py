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
        "titan_llama": (_TitanLlama, lambda: (torch.randint(0, 50, (2, 7)),)),
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


class _TitanAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def init_weights(self, std: float):
        for lin in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=std)

    def forward(self, x, freqs_cis):
        b, s, _ = x.shape
        q, k, v = (w(x).view(b, s, self.heads, self.head_dim) for w in (self.wq, self.wk, self.wv))
        rot = freqs_cis[:s].view(1, s, 1, self.head_dim // 2)
        q, k = (torch.view_as_real(torch.view_as_complex(t.float().reshape(b, s, self.heads, -1, 2)) * rot)
                .flatten(3).type_as(t) for t in (q, k))
        out = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class _TitanBlock(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int):
        super().__init__()
        self.attention = _TitanAttention(dim, heads)
        self.w1, self.w2, self.w3 = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(2 * dim, dim, bias=False), \
            nn.Linear(dim, 2 * dim, bias=False)
        self.attention_norm, self.ffn_norm = nn.RMSNorm(dim, eps=1e-5), nn.RMSNorm(dim, eps=1e-5)
        self.weight_init_std = 0.02 / (2 * (depth + 1)) ** 0.5

    def init_weights(self):
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        self.attention.init_weights(self.weight_init_std)
        nn.init.trunc_normal_(self.w1.weight, mean=0.0, std=0.02)
        for lin in (self.w2, self.w3):
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=self.weight_init_std)

    def forward(self, x, freqs_cis):
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        y = self.ffn_norm(h)
        return h + self.w2(nn.functional.silu(self.w1(y)) * self.w3(y))


class _TitanLlama(nn.Module):
    """torchtitan's Llama in small, as torchtitan writes it: the rotary table a complex64
    non-persistent buffer of the root (`freqs_cis`), layers in a ModuleDict keyed "0", "1", ...,
    and one `init_weights(buffer_device=None)` on the root that re-initialises every weight and
    *reassigns* the table (torchtitan's way after `to_empty`): from a checkpoint, materialize runs
    it with every loaded tensor out of reach, so only the table is kept."""

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2, layers: int = 2, max_seq: int = 16):
        super().__init__()
        self.dim, self.heads, self.max_seq = dim, heads, max_seq
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.register_buffer("freqs_cis", self._precompute_freqs_cis(), persistent=False)
        self.layers = nn.ModuleDict({str(i): _TitanBlock(dim, heads, i) for i in range(layers)})
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.init_weights()

    def _precompute_freqs_cis(self) -> torch.Tensor:
        half = self.dim // self.heads
        freqs = 1.0 / (10000.0 ** (torch.arange(0, half, 2)[: half // 2].float() / half))
        angles = torch.outer(torch.arange(self.max_seq, device=freqs.device), freqs).float()
        return torch.polar(torch.ones_like(angles), angles)

    def init_weights(self, buffer_device: torch.device | None = None):
        buffer_device = buffer_device or self.freqs_cis.device
        with torch.device(buffer_device):
            self.freqs_cis = self._precompute_freqs_cis()
        nn.init.normal_(self.tok_embeddings.weight)
        for layer in self.layers.values():
            layer.init_weights()
        self.norm.reset_parameters()
        std = self.dim ** -0.5
        nn.init.trunc_normal_(self.output.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def forward(self, ids):
        h = self.tok_embeddings(ids)
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis)
        return self.output(self.norm(h))


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

            mesh = init_device_mesh("cpu", (world,))
            layers = getattr(model, "layers", None)  # torchtitan's recipe: each block, then the root
            for block in (layers.values() if isinstance(layers, nn.ModuleDict) else
                          layers if isinstance(layers, nn.ModuleList) else ()):
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
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

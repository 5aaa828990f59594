"""What the benchmark loads: bf16 Llama (and one Mixtral) checkpoints built once from configs, and plain
synthetic modules.

A worker gets a model *spec* (a small dict, JSON through the command line) and turns it into a
``Source`` with ``real()`` (rank src's model), ``meta()`` (everyone else's) and ``layers(model)``
(the units FSDP2 shards):

* ``{"kind": "checkpoint", "path": DIR}``: ``from_pretrained(DIR)`` / ``from_config`` on meta;
* ``{"kind": "synthetic", "count": N, "numel": E}``: a plain ``nn.Module`` tree of N float32
  parameters of E elements each (blocks of 100), filled with a distinct byte pattern per tensor.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

_COMMON = dict(tie_word_embeddings=False, max_position_embeddings=2048, rms_norm_eps=1e-5)
MODELS: dict[str, dict[str, Any]] = {
    # 245.9M params, 147 tensors, 492 MB in bf16
    "medium": dict(hidden_size=1024, num_hidden_layers=16, vocab_size=32000, intermediate_size=2304,
                   num_attention_heads=16, num_key_value_heads=16, **_COMMON),
    # 29.2M params, 1,443 tensors, 58 MB in bf16
    "deep": dict(hidden_size=128, num_hidden_layers=160, vocab_size=4000, intermediate_size=288,
                 num_attention_heads=2, num_key_value_heads=2, **_COMMON),
    # MoE (Mixtral): 18.5M params, 133 tensors on disk (one per expert matrix: transformers stacks a
    # layer's experts into 3-D parameters on load, 45 in the model), 37 MB in bf16
    "moe": dict(arch="mixtral", hidden_size=256, num_hidden_layers=4, vocab_size=8000, intermediate_size=512,
                num_attention_heads=4, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                **_COMMON),
    # 0.1M params, 21 tensors: for the smoke test
    "tiny": dict(hidden_size=32, num_hidden_layers=2, vocab_size=512, intermediate_size=64,
                 num_attention_heads=2, num_key_value_heads=2, **_COMMON),
}
BLOCK = 100  # synthetic parameters per submodule
SYNTH_ITEMSIZE = 4  # float32


def describe(name: str) -> str:
    """One line about a checkpoint model, for the report."""
    cfg = MODELS[name]
    return f"hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}"


def ensure_checkpoint(cache: Path, name: str) -> Path:
    """Build ``cache/name`` once (bf16 LlamaForCausalLM from a config, ``save_pretrained``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    ckpt = cache / name
    spec = json.dumps(MODELS[name], sort_keys=True)
    marker = ckpt / "bench_spec.json"
    if marker.is_file() and marker.read_text() == spec:
        return ckpt
    import torch
    import transformers

    print(f"[build] {name}: creating checkpoint in {ckpt} ...", flush=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = dict(MODELS[name])
    arch = {"llama": "Llama", "mixtral": "Mixtral"}[cfg.pop("arch", "llama")]
    model = getattr(transformers, f"{arch}ForCausalLM")(getattr(transformers, f"{arch}Config")(**cfg))
    model = model.to(torch.bfloat16)
    ckpt.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(ckpt, safe_serialization=True)
    n, nt = sum(p.numel() for p in model.parameters()), len(model.state_dict())
    del model
    marker.write_text(spec)
    print(f"[build] {name}: {n / 1e6:.1f}M params, {nt} tensors, {time.perf_counter() - t0:.1f} s",
          flush=True)
    return ckpt


def open_source(spec: dict):
    """The ``Source`` for a model spec (see the module docstring)."""
    if spec["kind"] == "checkpoint":
        return CheckpointSource(Path(spec["path"]))
    if spec["kind"] == "synthetic":
        return SyntheticSource(int(spec["count"]), int(spec["numel"]))
    raise ValueError(f"unknown model kind {spec['kind']!r}; expected 'checkpoint' or 'synthetic'")


class CheckpointSource:
    """A transformers checkpoint directory, loaded in bf16."""

    def __init__(self, path: Path):
        self.ckpt_dir = path
        files = sorted(path.glob("*.safetensors"))
        self.ckpt_file = files[0] if len(files) == 1 else None

    def real(self):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.ckpt_dir, dtype=torch.bfloat16, device_map=None)

    def meta(self):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.ckpt_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        return model

    @staticmethod
    def layers(model):
        return list(model.model.layers)


class SyntheticSource:
    """``count`` float32 parameters of ``numel`` elements in a plain module tree (no transformers)."""

    ckpt_dir = ckpt_file = None

    def __init__(self, count: int, numel: int):
        self.count, self.numel = count, numel

    def _build(self):
        from torch import nn

        root = nn.Module()
        root.blocks = nn.ModuleList()
        for start in range(0, self.count, BLOCK):
            block = nn.Module()
            for k in range(min(BLOCK, self.count - start)):
                block.register_parameter(f"p{k}", nn.Parameter(_empty(self.numel)))
            root.blocks.append(block)
        return root

    def real(self):
        """Every tensor its own allocation (like a module built in memory), bytes ``pattern + i``."""
        import torch

        model = self._build()
        pattern = torch.arange(self.numel, dtype=torch.int32)
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                torch.add(pattern, i, out=p.view(torch.int32))
        return model

    def meta(self):
        import torch

        with torch.device("meta"):
            return self._build()

    @staticmethod
    def layers(model):
        return list(model.blocks)


def _empty(numel: int):
    import torch

    return torch.empty(numel, dtype=torch.float32)

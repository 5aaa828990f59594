"""Model zoo for the multi-rank tests (a helper module, not a test file).

Everything here is tiny (well under 2M parameters per model) and deterministic: the same
``name``/``seed`` always gives the same bytes on disk, and two ``from_pretrained`` loads of a
checkpoint are bit-identical (checked for every case, logits included).

Two families of cases:

* ``TRANSFORMERS_CASES`` -- transformers models built from configs, saved with
  ``save_pretrained`` (safetensors), loaded back with ``from_pretrained`` as the ground truth.
  Helpers: ``make_checkpoint``, ``load_reference``, ``build_meta``, ``build_seed_flow``,
  ``example_inputs``, ``logits``.
* ``PLAIN_CASES`` -- plain ``nn.Module`` builders (``build(device="cpu", seed=0)``); build on cpu
  for the source / reference, ``build(device="meta")`` for receivers.  The structure (names,
  shapes, dtypes, ties, ``requires_grad``, persistence) is identical on both devices.

Facts about transformers 5.24 recorded here (verified with torch 2.13 cpu):

* MoE (Mixtral, Qwen2-MoE, OLMoE): the in-memory modules FUSE the experts into 3-D parameters
  (``mlp.experts.gate_up_proj`` [E, 2*I, H], ``mlp.experts.down_proj`` [E, H, I]), but
  ``save_pretrained`` writes the ORIGINAL per-expert 2-D layout (Mixtral even renames:
  ``block_sparse_moe.experts.{e}.w1/w2/w3.weight``); ``from_pretrained`` converts back.  So for
  these cases the safetensors keys are NOT the model's ``state_dict()`` keys
  (``spec.checkpoint_keys_match`` is False) and a loader that reads the files directly must
  either go through transformers' conversion or take its values from the loaded model.
* ``from_pretrained`` defaults to the checkpoint's dtype in 5.24 (``dtype="auto"`` behaviour):
  the bf16 case loads in bfloat16 without passing ``dtype``.
* Rotary ``inv_freq``/``original_inv_freq`` are always float32, also in the bf16 model.  Gemma3's
  ``embed_scale`` is created with ``torch.tensor(float)`` under the model's default dtype, so it
  is bfloat16 in a bf16 model (case ``gemma3_bf16``: 6.9375 where float32 gives 6.9282).
* A fresh CPU ``Cls._from_config(config)`` computes every non-persistent buffer bit-identical
  (value and dtype) to what ``from_pretrained`` gives, for every case here.
* See ``build_meta`` for what is real vs meta in the meta skeleton and ``build_seed_flow`` for
  what the transformers FSDP cpu-ram-efficient flow gives non-zero ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "ModelSpec",
    "TRANSFORMERS_CASES",
    "SHARDED_CASES",
    "PLAIN_CASES",
    "make_checkpoint",
    "load_reference",
    "build_meta",
    "build_seed_flow",
    "SeedFlowUnsupported",
    "example_inputs",
    "logits",
    "spec_for",
    "non_persistent_buffers",
    "tensors",
    "tie_groups",
    "train_losses",
]


# ---------------------------------------------------------------------------------------------
# transformers cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """How to build one tiny transformers model.

    ``config_cls``/``model_cls`` are names in the top-level ``transformers`` namespace (resolved
    lazily so importing this module stays cheap).  The remaining fields are documentation that
    tests may assert on; they were verified against transformers 5.24.
    """

    family: str
    config_cls: str
    model_cls: str
    config: dict[str, Any]
    dtype: torch.dtype = torch.float32
    tied: bool = False
    # (name, dtype) of every non-persistent buffer of the loaded model (names as in
    # named_buffers(); none of them is in state_dict()).
    non_persistent: tuple[tuple[str, torch.dtype], ...] = ()
    # False when save_pretrained writes keys that differ from model.state_dict() (MoE).
    checkpoint_keys_match: bool = True
    fused_experts: bool = False
    notes: str = ""


_DECODER = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
_ROPE = (("model.rotary_emb.inv_freq", torch.float32), ("model.rotary_emb.original_inv_freq", torch.float32))


def _cfg(**kw: Any) -> dict[str, Any]:
    out = dict(_DECODER)
    out.update(kw)
    return out


_GEMMA3 = _cfg(
    hidden_size=48,  # embed_scale = sqrt(48): not exactly representable, rounds differently in bf16
    head_dim=16,
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention"],
    tie_word_embeddings=True,
)


def _gemma3_buffers(scale_dtype: torch.dtype) -> tuple[tuple[str, torch.dtype], ...]:
    return (
        ("model.embed_tokens.embed_scale", scale_dtype),
        ("model.rotary_emb.full_attention_inv_freq", torch.float32),
        ("model.rotary_emb.full_attention_original_inv_freq", torch.float32),
        ("model.rotary_emb.sliding_attention_inv_freq", torch.float32),
        ("model.rotary_emb.sliding_attention_original_inv_freq", torch.float32),
    )


TRANSFORMERS_CASES: dict[str, ModelSpec] = {
    "llama": ModelSpec(
        family="llama",
        config_cls="LlamaConfig",
        model_cls="LlamaForCausalLM",
        config=_cfg(tie_word_embeddings=False),
        non_persistent=_ROPE,
        notes="rotary (default rope), untied lm_head",
    ),
    "llama_rope_llama3": ModelSpec(
        family="llama",
        config_cls="LlamaConfig",
        model_cls="LlamaForCausalLM",
        config=_cfg(
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
        non_persistent=_ROPE,
        notes="llama3 rope scaling: inv_freq is not the default formula",
    ),
    "llama_bf16": ModelSpec(
        family="llama",
        config_cls="LlamaConfig",
        model_cls="LlamaForCausalLM",
        config=_cfg(tie_word_embeddings=False),
        dtype=torch.bfloat16,
        non_persistent=_ROPE,
        notes="saved and loaded in bfloat16; inv_freq stays float32",
    ),
    "qwen2_tied": ModelSpec(
        family="qwen2",
        config_cls="Qwen2Config",
        model_cls="Qwen2ForCausalLM",
        config=_cfg(tie_word_embeddings=True),
        tied=True,
        non_persistent=_ROPE,
        notes="lm_head.weight is model.embed_tokens.weight; q/k/v biases",
    ),
    "gemma3": ModelSpec(
        family="gemma3",
        config_cls="Gemma3TextConfig",
        model_cls="Gemma3ForCausalLM",
        config=_GEMMA3,
        tied=True,
        non_persistent=_gemma3_buffers(torch.float32),
        notes="scaled embedding owns a non-persistent embed_scale (sqrt(48)); two rotary tables; tied head",
    ),
    "gemma3_bf16": ModelSpec(
        family="gemma3",
        config_cls="Gemma3TextConfig",
        model_cls="Gemma3ForCausalLM",
        config=_GEMMA3,
        dtype=torch.bfloat16,
        tied=True,
        non_persistent=_gemma3_buffers(torch.bfloat16),
        notes="bf16: embed_scale is a bfloat16 buffer (6.9375, not fp32 6.9282); inv_freq stay float32",
    ),
    "bert_mlm": ModelSpec(
        family="bert",
        config_cls="BertConfig",
        model_cls="BertForMaskedLM",
        config=dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            type_vocab_size=2,
        ),
        tied=True,
        non_persistent=(
            ("bert.embeddings.position_ids", torch.int64),
            ("bert.embeddings.token_type_ids", torch.int64),
        ),
        notes=(
            "encoder; int64 non-persistent position_ids/token_type_ids (used when not passed); TWO ties: "
            "cls.predictions.decoder.weight is bert.embeddings.word_embeddings.weight and "
            "cls.predictions.decoder.bias is cls.predictions.bias"
        ),
    ),
    "gpt2": ModelSpec(
        family="gpt2",
        config_cls="GPT2Config",
        model_cls="GPT2LMHeadModel",
        config=dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64),
        tied=True,
        notes="learned positions, Conv1D, tied lm_head; no buffers at all in 5.24 (no causal-mask buffer)",
    ),
    "mixtral": ModelSpec(
        family="mixtral",
        config_cls="MixtralConfig",
        model_cls="MixtralForCausalLM",
        config=_cfg(num_local_experts=4, num_experts_per_tok=2),
        non_persistent=_ROPE,
        checkpoint_keys_match=False,
        fused_experts=True,
        notes="MoE: fused 3-D expert params in memory, per-expert w1/w2/w3 on disk",
    ),
    "qwen2_moe": ModelSpec(
        family="qwen2_moe",
        config_cls="Qwen2MoeConfig",
        model_cls="Qwen2MoeForCausalLM",
        config=_cfg(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
        ),
        non_persistent=_ROPE,
        checkpoint_keys_match=False,
        fused_experts=True,
        notes="MoE with shared expert; fused 3-D expert params in memory, per-expert on disk",
    ),
}

# Cases make_checkpoint(..., shard=True) is exercised with by the self-check (any case works).
SHARDED_CASES: tuple[str, ...] = ("llama", "mixtral")
_SHARD_SIZE = "100KB"


def spec_for(name_or_path: str) -> ModelSpec:
    """The spec of a case name, or of a checkpoint dir written by ``make_checkpoint``."""
    if name_or_path in TRANSFORMERS_CASES:
        return TRANSFORMERS_CASES[name_or_path]
    with open(os.path.join(name_or_path, _MARKER)) as f:
        return TRANSFORMERS_CASES[json.load(f)["case"]]


_MARKER = "fsdp_fastload_case.json"


def _tf():
    import transformers

    transformers.logging.set_verbosity_error()
    try:  # progress bars ("Loading weights", "Writing model shards") are noise in tests
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass
    return transformers


def _build_config(spec: ModelSpec):
    tf = _tf()
    cfg = getattr(tf, spec.config_cls)(**spec.config)
    cfg.dtype = spec.dtype
    return cfg


def make_checkpoint(name: str, root: str, *, seed: int = 0, shard: bool = False) -> str:
    """Write case ``name`` to ``root/name`` (``root/name-sharded`` with ``shard=True``) and return it.

    The model is built from its config under a fixed seed (global RNG state is preserved), every
    unique parameter then gets a distinct seeded perturbation (so no two tensors are equal and
    norms are not all ones), it is cast to ``spec.dtype`` and saved with
    ``save_pretrained`` (5.24 always writes safetensors; ``safe_serialization`` is no longer a
    parameter and is not passed; ``shard=True`` forces ``max_shard_size=100KB`` → several
    shards + ``model.safetensors.index.json``).  Idempotent and safe against concurrent callers
    (several ranks): the dir is written under a temporary name and renamed into place.  A
    non-default ``seed`` appends ``-seed{seed}`` to the dir name.  The dir also holds
    ``fsdp_fastload_case.json`` (case name), which ``spec_for(path)``/``load_reference`` use.
    """
    spec = TRANSFORMERS_CASES[name]
    out = os.path.join(root, f"{name}-sharded" if shard else name)
    if seed != 0:
        out += f"-seed{seed}"
    if os.path.exists(os.path.join(out, _MARKER)):
        return out
    tf = _tf()
    os.makedirs(root, exist_ok=True)
    cfg = _build_config(spec)
    cls = getattr(tf, spec.model_cls)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)  # fp32 init, deterministic under the seed
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():  # deduplicated: tied params perturbed once
            if p.is_floating_point() and p.numel():
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.02)
    model = model.to(spec.dtype)
    model.config.dtype = spec.dtype
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=root)
    try:
        kw = {"max_shard_size": _SHARD_SIZE} if shard else {}
        model.save_pretrained(tmp, **kw)
        with open(os.path.join(tmp, _MARKER), "w") as f:
            json.dump({"case": name, "seed": seed, "shard": shard}, f)
        try:
            os.rename(tmp, out)
        except OSError:  # another process won the race
            if not os.path.exists(os.path.join(out, _MARKER)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _model_cls(path: str):
    tf = _tf()
    return getattr(tf, spec_for(path).model_cls)


def load_reference(path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Ground truth: single-process ``Cls.from_pretrained(path)`` on CPU, eval mode.

    ``dtype=None`` keeps the checkpoint dtype (5.24 default).  Must not be called while the
    FSDP env vars of ``build_seed_flow`` are set in a distributed process.
    """
    kw = {} if dtype is None else {"dtype": dtype}
    model = _model_cls(path).from_pretrained(path, **kw)
    return model.eval()


def build_meta(path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """The architecture of ``path`` on ``meta``, as a user builds it on non-src ranks::

        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = Cls._from_config(config)      # config.dtype -> checkpoint dtype

    Verified for every case (transformers 5.24): names/shapes/dtypes of
    ``named_parameters(remove_duplicate=False)`` and ``named_buffers(remove_duplicate=False)`` equal
    the reference's, ``requires_grad`` too, and ties hold (``lm_head.weight is
    model.embed_tokens.weight`` for tied cases, ``post_init`` ties them).  EVERY parameter AND
    EVERY buffer is on ``meta`` -- including all non-persistent buffers (rotary ``inv_freq`` /
    ``original_inv_freq``, Gemma3 ``embed_scale``, BERT ``position_ids``/``token_type_ids``):
    under ``torch.device("meta")`` their construction (arange, torch.tensor) lands on meta too,
    so nothing in the skeleton holds a usable value.  Eval mode.
    """
    tf = _tf()
    cfg = tf.AutoConfig.from_pretrained(path)
    cls = _model_cls(path)
    with torch.device("meta"):
        model = cls._from_config(cfg) if dtype is None else cls._from_config(cfg, dtype=dtype)
    return model.eval()


class SeedFlowUnsupported(RuntimeError):
    """transformers' FSDP cpu-ram-efficient loading did not give a meta model on this rank."""


_SEED_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}


def build_seed_flow(path: str, *, allow_non_meta: bool = False) -> nn.Module:
    """transformers' own "cpu-ram-efficient loading" on a non-zero local rank.

    Requires an initialised ``torch.distributed`` group and ``LOCAL_RANK`` != 0 in the env; sets
    ``ACCELERATE_USE_FSDP=true`` and ``FSDP_CPU_RAM_EFFICIENT_LOADING=true`` for the duration of
    ``Cls.from_pretrained(path)`` (then restores the env).

    WHAT 5.24 ACTUALLY DOES (read from modeling_utils and verified for every case with a
    2-process gloo group, rank 1 = this function): the flag only changes the post-load steps.
    ``_load_pretrained_model`` has no rank check, so rank 1 READS THE WHOLE CHECKPOINT like rank 0
    and NOTHING is on meta: every parameter and persistent buffer is real (CPU) and bit-identical
    to ``load_reference``.  ``_move_missing_keys_from_meta_to_device`` then puts
    ``torch.zeros_like`` placeholders into every non-persistent buffer, ``_initialize_missing_keys``
    flags only the ``state_dict()`` tensors as initialised, and ``initialize_weights`` re-runs
    ``_init_weights`` on the modules, which recomputes the non-persistent buffers (rotary
    ``inv_freq``/``original_inv_freq``, Gemma3 ``embed_scale``, BERT ``position_ids`` /
    ``token_type_ids``) while the guarded ``init.*`` functions skip the flagged loaded params.
    Result on rank 1 for all cases here: every tensor, non-persistent buffers included, equals
    the reference bit for bit, ties hold (``tie_weights`` runs as usual), logits are identical.
    Rank 0 (``LOCAL_RANK=0``) with the same env is also identical to the reference.

    So in 5.24 this flow CANNOT produce a meta model: by default this function runs the flow
    and raises ``SeedFlowUnsupported`` describing what it got; ``allow_non_meta=True`` returns
    the (fully loaded, real) model instead.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("build_seed_flow needs an initialised torch.distributed process group")
    if int(os.environ.get("LOCAL_RANK", "-1")) == 0:
        raise RuntimeError("build_seed_flow is the non-zero-rank flow; LOCAL_RANK must be != 0")
    if "LOCAL_RANK" not in os.environ:
        raise RuntimeError("build_seed_flow: set LOCAL_RANK (!= 0) in the environment")
    old = {k: os.environ.get(k) for k in _SEED_ENV}
    os.environ.update(_SEED_ENV)
    try:
        model = _model_cls(path).from_pretrained(path).eval()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    on_meta = [n for n, t in _all_tensors(model) if t.is_meta]
    total = len(list(_all_tensors(model)))
    if len(on_meta) == total or allow_non_meta:
        return model
    raise SeedFlowUnsupported(
        f"transformers {_tf().__version__}: FSDP cpu-ram-efficient loading on LOCAL_RANK="
        f"{os.environ['LOCAL_RANK']} did not give a meta model ({len(on_meta)}/{total} tensors on meta): "
        "this version loads the full checkpoint on every rank (then zero-fills and re-initialises the "
        "non-persistent buffers). Build the meta skeleton with build_meta() instead "
        "(or pass allow_non_meta=True to get the real model)."
    )


def _all_tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> tensor for every parameter and buffer name (tied names each listed)."""
    return dict(_all_tensors(model))


def tie_groups(model: nn.Module) -> set[frozenset[str]]:
    """The sets of names that share one tensor object."""
    groups: dict[int, set[str]] = {}
    for n, t in _all_tensors(model):
        groups.setdefault(id(t), set()).add(n)
    return {frozenset(g) for g in groups.values()}


def one_allocation(tensors: list[torch.Tensor], align: int = 64, slack: int = 0) -> list[str]:
    """Problems with how materialize's tensors hold their memory: each must have a storage of its own
    (offset 0, exactly its bytes: torch.save, pickle, deepcopy and resize_ then see one tensor, as after
    one allocation per tensor), and those storages must lie back to back in one buffer (one
    allocation: disjoint, spread over no more than their bytes plus alignment, plus `slack` bytes
    where tensors left out of `tensors` lay among them). Empty tensors hold no memory."""
    bad, spans = [], {}
    for t in tensors:
        st = t.untyped_storage()
        extent = t.numel() and (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()
        if t.storage_offset() or st.nbytes() != extent:
            bad.append(f"a {t.dtype} tensor of shape {tuple(t.shape)} sits at offset {t.storage_offset()} of a "
                       f"storage of {st.nbytes()} bytes (expected its own {extent})")
        if extent:
            spans[st.data_ptr()] = extent
    starts = sorted(spans)
    for a, b in zip(starts, starts[1:]):
        if a + spans[a] > b:
            bad.append(f"storages overlap at {b - starts[0]}")
    if starts and starts[-1] + spans[starts[-1]] - starts[0] > slack + sum(-(-n // align) * align for n in spans.values()):
        bad.append(f"{len(starts)} storages spread over {starts[-1] + spans[starts[-1]] - starts[0]} bytes: not "
                   "one buffer")
    return bad


def buffers_in_params_block(model: nn.Module) -> list[str]:
    """The model's non-empty buffers whose memory lies between its parameters' first and last byte
    (materialize's buffers must have left the parameters' block where it moves them)."""
    params = list(model.parameters())
    lo = min(p.data_ptr() for p in params)
    hi = max(p.data_ptr() + p.untyped_storage().nbytes() for p in params)
    return [f"buffer {n} still lies in the parameters' block" for n, b in model.named_buffers()
            if b.numel() and lo <= b.data_ptr() < hi]


def train_losses(model: nn.Module, inputs: dict, opt, *, steps: int = 3, backward=None) -> list[float]:
    """`steps` optimizer steps of causal-LM loss on fixed `inputs`; the loss of each step."""
    losses = []
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        (backward or (lambda t: t.backward()))(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def non_persistent_buffers(model: nn.Module) -> list[tuple[str, torch.dtype]]:
    """(name, dtype) of the buffers that are not in ``state_dict()``."""
    sd = model.state_dict()
    return [(n, b.dtype) for n, b in model.named_buffers(remove_duplicate=False) if n not in sd]


def example_inputs(model: nn.Module, *, batch: int = 2, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic forward inputs on the model's device: only ``input_ids`` (int64, [batch, seq]).

    Nothing else is passed on purpose: position ids, token type ids and masks then come from the
    model itself -- BERT uses its non-persistent ``position_ids``/``token_type_ids`` buffers, so a
    wrong buffer shows up in the logits.  Token 0 is avoided (BERT/GPT-2 pad conventions).
    ``seq`` stays below every case's position limit and above gemma3's sliding window.
    """
    cfg = model.config
    vocab = getattr(cfg, "vocab_size", None) or cfg.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=gen, dtype=torch.int64)
    try:
        dev = next(model.parameters()).device
    except StopIteration:
        dev = torch.device("cpu")
    return {"input_ids": ids.to(dev)}


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``model(**inputs).logits`` under ``torch.no_grad()`` (no KV cache)."""
    kw = dict(inputs)
    if "use_cache" in _forward_params(model):
        kw.setdefault("use_cache", False)
    with torch.no_grad():
        out = model(**kw)
    return out.logits


def _forward_params(model: nn.Module) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


# ---------------------------------------------------------------------------------------------
# plain nn.Module cases
# ---------------------------------------------------------------------------------------------
#
# Each builder: ``build(device="cpu", seed=0) -> nn.Module`` (eval mode).  On a real device every
# parameter and persistent buffer is filled from a seeded ``torch.Generator`` (cpu), so two builds
# are bit-identical; on ``meta`` nothing is filled.  Non-persistent buffers are deterministic
# functions of the constructor (arange/linspace/...), i.e. recomputable locally, and are on
# ``meta`` in a meta build.  Each module has ``example_input()`` (deterministic, cpu) and a
# ``forward`` that touches every tensor that is not empty.


def _fill_(module: nn.Module, seed: int) -> nn.Module:
    """Deterministically fill params + persistent buffers (not non-persistent ones)."""
    if any(t.is_meta for _, t in _all_tensors(module)):
        return module
    gen = torch.Generator().manual_seed(seed)
    sd_names = set(module.state_dict().keys())
    seen: set[int] = set()
    with torch.no_grad():
        for name, t in _all_tensors(module):
            if id(t) in seen or name not in sd_names:
                continue
            seen.add(id(t))
            if t.numel() == 0:
                continue
            if name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.dtype == torch.bool:
                t.copy_(torch.rand(t.shape, generator=gen) < 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype))
            else:
                t.copy_(torch.randint(-1000, 1000, t.shape, generator=gen).to(t.dtype))
    return module


class BatchNormNet(nn.Module):
    """Linear → BatchNorm1d and Conv2d → BatchNorm2d; running stats nonzero, num_batches_tracked=7 (int64)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def example_input(self):
        g = torch.Generator().manual_seed(1)
        return (torch.randn(5, 6, generator=g), torch.randn(2, 3, 5, 5, generator=g))

    def forward(self, x):
        a, b = x
        return self.bn1(self.fc(a)).sum() + self.bn2(self.conv(b)).sum()


class BufferNet(nn.Module):
    """Integer / bool / non-persistent buffers.

    persistent: ``counts`` int32 [5], ``mask`` bool [6];
    non-persistent: ``table`` float32 [4, 3] (a sinusoid table), ``index`` int64 [7] (arange).
    """

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("counts", torch.zeros(5, dtype=torch.int32))
        self.register_buffer("mask", torch.zeros(6, dtype=torch.bool))
        pos = torch.arange(4, dtype=torch.float32)[:, None]
        freq = torch.arange(1, 4, dtype=torch.float32)[None, :]
        self.register_buffer("table", torch.sin(pos / freq), persistent=False)
        self.register_buffer("index", torch.arange(7, dtype=torch.int64) * 3, persistent=False)

    def example_input(self):
        return torch.randn(4, 3, generator=torch.Generator().manual_seed(1))

    def forward(self, x):
        y = self.lin(x) + self.table
        return y.sum() + self.counts.sum() + self.mask.sum() + self.index.sum()


class TiedNet(nn.Module):
    """One Parameter under three names: ``a.weight``, ``b.weight``, ``c.inner.weight``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4)
        self.c = nn.Module()
        self.c.inner = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.c.inner.weight = self.a.weight

    def example_input(self):
        return torch.randn(2, 4, generator=torch.Generator().manual_seed(1))

    def forward(self, x):
        return self.c.inner(self.b(self.a(x)))


class OddParamsNet(nn.Module):
    """Frozen, empty, 0-dim, float64 and float16 parameters.

    ``frozen`` [3] requires_grad=False; ``empty`` (0,), ``empty2`` (3, 0); ``scalar`` 0-dim;
    ``w64`` float64 [3, 3] and ``b64`` float64 [3]; ``h16`` float16 [4].
    """

    def __init__(self):
        super().__init__()
        self.frozen = nn.Parameter(torch.empty(3), requires_grad=False)
        self.empty = nn.Parameter(torch.empty(0))
        self.empty2 = nn.Parameter(torch.empty(3, 0))
        self.scalar = nn.Parameter(torch.empty(()))
        self.w64 = nn.Parameter(torch.empty(3, 3, dtype=torch.float64))
        self.b64 = nn.Parameter(torch.empty(3, dtype=torch.float64))
        self.h16 = nn.Parameter(torch.empty(4, dtype=torch.float16))

    def example_input(self):
        return torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def forward(self, x):
        y = x @ self.w64 + self.b64 + self.frozen.double() * self.scalar.double()
        return y.sum() + self.h16.double().sum() + self.empty.sum() + self.empty2.sum()


class KitchenSink(nn.Module):
    """All of the above in one module (plus an extra tie across the sub-models)."""

    def __init__(self):
        super().__init__()
        self.bn = BatchNormNet()
        self.buf = BufferNet()
        self.tied = TiedNet()
        self.odd = OddParamsNet()
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.tied.a.weight  # now under four names

    def example_input(self):
        return (self.bn.example_input(), self.buf.example_input(), self.tied.example_input(), self.odd.example_input())

    def forward(self, x):
        a, b, c, d = x
        return self.bn(a) + self.buf(b) + self.tied(c).sum() + self.head(c).sum() + self.odd(d)


def _builder(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    def build(device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
        with torch.device(device):
            module = cls()
        return _fill_(module, seed).eval()

    build.__name__ = f"build_{cls.__name__}"
    build.__doc__ = f"{cls.__name__} on ``device`` (seeded values on a real device). {cls.__doc__ or ''}"
    return build


PLAIN_CASES: dict[str, Callable[..., nn.Module]] = {
    "batchnorm": _builder(BatchNormNet),
    "buffers": _builder(BufferNet),
    "tied3": _builder(TiedNet),
    "odd_params": _builder(OddParamsNet),
    "kitchen_sink": _builder(KitchenSink),
}


def wrap_layers(model: nn.Module, how: str) -> nn.Module:
    """Wrap each decoder layer (``model.model.layers``) the way torchtitan-style code does before
    loading: activation checkpointing (``"ac"``) and/or ``torch.compile`` (``"compile"``, which
    compiles nothing until a forward). Parameter names then hold ``_checkpoint_wrapped_module`` /
    ``_orig_mod`` segments that a checkpoint's keys lack."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.model.layers
    for i, layer in enumerate(layers):
        if "ac" in how:
            layer = checkpoint_wrapper(layer)
        if "compile" in how:
            layer = torch.compile(layer)
        layers[i] = layer
    return model


def unwrap_layers(model: nn.Module) -> nn.Module:
    """Undo `wrap_layers` (the same layer objects, so an eager forward runs them as loaded)."""
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layer = getattr(layer, "_orig_mod", layer)
        layers[i] = getattr(layer, "_checkpoint_wrapped_module", layer)
    return model


def replica(build, ref: nn.Module | None, real: bool) -> nn.Module:
    """`build()` holding `ref`'s values (rank src in the src-model flow), or on ``meta``."""
    if not real:
        with torch.device("meta"):
            return build()
    model = build()
    model.load_state_dict(ref.state_dict())
    return model

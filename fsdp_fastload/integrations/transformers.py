"""transformers: give a skeleton built from a config the dtypes `from_pretrained` would give it.

`from_pretrained(path, dtype=torch.float16)` keeps the tensors its model class names in
`_keep_in_fp32_modules` in float32 (T5's `wo`, ...), and with `torch.float16` or `torch.bfloat16`
those in `_keep_in_fp32_modules_strict` (the routers of DeepSeek-V3-style MoE models: `gate.weight`,
`e_score_correction_bias`). `from_config(config, dtype=...)` on `meta` does not, and `materialize`
keeps the module's dtypes: so such a skeleton loads those tensors in half precision (from a
checkpoint), or differs from rank 0's `from_pretrained` model (`MaterializeError`: "... has dtype
torch.float32 on rank 0 but torch.bfloat16 on rank 1"). One call on every rank, before
`fully_shard` and `materialize`, gives the skeleton `from_pretrained`'s dtypes:

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    from_pretrained_dtypes(model, torch.bfloat16)

`materialize` warns when it sees a transformers model whose half-precision tensors
`from_pretrained` would keep in float32.
"""
from __future__ import annotations

import re
import sys

import torch
from torch import nn

_HALF = (torch.float16, torch.bfloat16)


def from_pretrained_dtypes(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Make float32 the floating parameters and persistent buffers of `model` (a transformers model,
    on `meta` or not) that ``from_pretrained(..., dtype=dtype)`` keeps in float32; return their
    names. Ties stay one tensor; `requires_grad` and parameter attributes are kept. Nothing else
    changes, and a model without such modules (most) is left as it is.

    Example::

        >>> import torch, transformers
        >>> from fsdp_fastload.integrations.transformers import from_pretrained_dtypes
        >>> config = transformers.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1,
        ...                                num_heads=2, decoder_start_token_id=0)
        >>> with torch.device("meta"):
        ...     model = transformers.T5ForConditionalGeneration(config).to(torch.float16)
        >>> from_pretrained_dtypes(model, torch.float16)[:1]
        ['encoder.block.0.layer.1.DenseReluDense.wo.weight']
        >>> model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
        torch.float32
    """
    from ..manifest import build_manifest, owner_table

    pattern = _fp32_pattern(model, dtype)
    if pattern is None:
        return []
    changed: list[str] = []
    # the manifest's walk: one entry per tensor, all its names (ties) and every (module, attribute)
    # holding it; persistent if any name is (what from_pretrained loads, and so converts)
    for e in build_manifest(model):
        if (not e.persistent or not e.dtype.is_floating_point or e.dtype == torch.float32
                or not any(pattern.search(n) for n in e.names)):
            continue
        t = e.tensor
        with torch.no_grad():
            data = t.detach().to(torch.float32)
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(data, requires_grad=t.requires_grad)
            new.__dict__.update({k: v for k, v in t.__dict__.items() if k not in new.__dict__})
        else:
            new = data
        for mod, attr in e.owners:
            owner_table(mod, attr, e.kind)[attr] = new
        changed.extend(e.names)
    return changed


def broken_ties(model: nn.Module) -> list[tuple[str, str]]:
    """The (name, name) pairs a transformers model's config ties (``all_tied_weights_keys``) that
    are two tensors in `model`: a model built under accelerate's ``init_empty_weights()`` (which makes
    a fresh meta parameter at every registration) until ``model.tie_weights()`` is called. [] for
    anything else, or where a name does not resolve."""
    ties = getattr(model, "all_tied_weights_keys", None) if "transformers" in sys.modules else None
    if not isinstance(ties, dict):
        return []
    out = []
    for target, source in ties.items():
        try:
            a, b = model.get_parameter(target), model.get_parameter(source)
        except (AttributeError, TypeError):  # a pattern, a buffer, a wrapped path: not ours to judge
            continue
        if a is not b:
            out.append((target, source))
    return out


def half_tensors_kept_in_fp32(model: nn.Module, entries) -> list[str]:
    """The names (all names of a tie) of `entries` (manifest entries: `names`, `dtype`,
    `persistent`) in half precision that ``from_pretrained`` with that dtype would keep in float32;
    [] for anything not a transformers model, or a transformers without this machinery. Names are
    only matched when the model keeps something in float32 (most models do not: then this costs a
    set of dtypes)."""
    tf = sys.modules.get("transformers")
    if tf is None or not isinstance(model, getattr(tf, "PreTrainedModel", ())):
        return []
    patterns = {d: _fp32_pattern(model, d) for d in {e.dtype for e in entries} if d in _HALF}
    patterns = {d: p for d, p in patterns.items() if p is not None}
    if not patterns:
        return []
    # (persistent ones only: from_pretrained loads, and so converts, nothing else)
    return [n for e in entries if e.persistent and e.dtype in patterns for n in e.names
            if patterns[e.dtype].search(n)]


def _fp32_pattern(model: nn.Module, dtype: torch.dtype):
    """transformers' own rule (`PreTrainedModel._get_dtype_plan`, matched the way its loader matches
    checkpoint keys), or None when nothing is kept in float32."""
    get_plan = getattr(model, "_get_dtype_plan", None)
    if get_plan is None:
        return None
    try:
        plan = get_plan(dtype)
    except Exception:  # noqa: BLE001  another transformers: nothing to say
        return None
    if not plan:
        return None
    globs = [g for g, d in plan.items() if d == torch.float32]
    if not globs:
        return None
    try:
        from transformers.core_model_loading import build_glob_alternation

        return build_glob_alternation(globs)[0]
    except Exception:  # noqa: BLE001  (the same construction, if transformers moves it)
        return re.compile("|".join(f"(?:{g.replace('*', '.*')})" for g in globs))

"""materialize(..., state_dict=...) on real gloo ranks: every rank meta, src streams the checkpoint."""
from __future__ import annotations

import json
import os
import re
import struct

import pytest
import torch
from torch import nn

import models
from dist_harness import run_ranks
from test_materialize import compare

from fsdp_fastload.source import CheckpointError, checkpoint_files, parse_header

KEYS_MATCH = [n for n, s in models.TRANSFORMERS_CASES.items() if s.checkpoint_keys_match]


def _hf_forward(model):
    return models.logits(model, models.example_inputs(model))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    out = {name: models.make_checkpoint(name, root) for name in models.TRANSFORMERS_CASES}
    out["llama-sharded"] = models.make_checkpoint("llama", root, shard=True)
    out["gemma3-sharded"] = models.make_checkpoint("gemma3", root, shard=True)
    out["mixtral-sharded"] = models.make_checkpoint("mixtral", root, shard=True)
    return out


def _source(kind, path):
    if kind == "dir":
        return path
    if kind == "file":
        (f,) = checkpoint_files(path)
        return f
    from safetensors.torch import load_file  # a mapping of (mmap-backed) tensors
    sd = {}
    for f in checkpoint_files(path):
        sd.update(load_file(f))
    return sd


def _sd_worker(rank, world, cases, kind, dtype):
    from fsdp_fastload import materialize

    out = {}
    for name, path in cases.items():
        try:
            model = models.build_meta(path, dtype)
            sd = _source(kind, path) if rank == 0 else None
            materialize(model, "cpu", state_dict=sd, poison=True, verify=True, bucket_size=1 << 16)
            out[name] = compare(model, models.load_reference(path, dtype), _hf_forward)
        except Exception as e:
            out[name] = [f"raised {type(e).__name__}: {e}"]
    return out


def _check(results):
    for rank, res in enumerate(results):
        for name, bad in res.items():
            assert bad == [], f"rank {rank} {name}: {bad}"


@pytest.mark.parametrize("world", [2, 3])
def test_directories_bit_exact(ckpts, world):
    cases = {n: ckpts[n] for n in KEYS_MATCH + ["llama-sharded", "gemma3-sharded"]}
    _check(run_ranks(_sd_worker, world, cases, "dir", None))


@pytest.mark.parametrize("cases,dtype", [
    (["mixtral", "qwen2_moe", "mixtral-sharded"], None),
    (["mixtral"], torch.bfloat16),  # fp32 experts into a bf16 model: cast first, as transformers does
])
def test_fused_moe_checkpoints_bit_exact(ckpts, cases, dtype):
    """MoE checkpoints store one 2-D tensor per expert (Mixtral under other names too); transformers
    stacks them into 3-D parameters on load with its own conversion operations, which src applies
    to each fused parameter as it sends it (verify=True: every rank checks its values too)."""
    _check(run_ranks(_sd_worker, 2, {n: ckpts[n] for n in cases}, "dir", dtype))


@pytest.mark.parametrize("kind", ["file", "mapping"])
def test_file_and_mapping_sources(ckpts, kind):
    names = ["llama", "qwen2_tied", "bert_mlm"] + (["gemma3-sharded"] if kind == "mapping" else [])
    _check(run_ranks(_sd_worker, 2, {n: ckpts[n] for n in names}, kind, None))


@pytest.mark.parametrize("names,dtype", [
    (["llama_bf16", "gemma3_bf16"], torch.float32),   # bf16 checkpoint into fp32: send bf16, upcast after
    (["llama", "gemma3", "bert_mlm"], torch.bfloat16),  # fp32 checkpoint into bf16: src converts
    (["llama"], torch.float16),
])
def test_dtype_conversion_equals_from_pretrained_dtype(ckpts, names, dtype):
    _check(run_ranks(_sd_worker, 2, {n: ckpts[n] for n in names}, "dir", dtype))


# --------------------------------------------------------------------------- bad keys, every rank

def _bad_keys_worker(rank, world, ckpts):
    from safetensors.torch import load_file

    from fsdp_fastload import MaterializeError, materialize

    base = load_file(os.path.join(ckpts["llama"], "model.safetensors"))
    missing = {k: v for k, v in base.items() if not k.endswith("layers.1.mlp.up_proj.weight")}
    extra = {**base, "model.extra.weight": torch.zeros(2)}
    shaped = {**base, "model.norm.weight": torch.zeros(7)}
    typed = {**base, "model.norm.weight": base["model.norm.weight"].to(torch.int32)}
    cases = {
        "missing": ({"state_dict": missing}, r"rank 0: 1 persistent tensor\(s\) missing from the "
                                             r"checkpoint: \['model.layers.1.mlp.up_proj.weight'\]"),
        "strict": ({"state_dict": extra, "strict": True},
                   r"1 unexpected key\(s\) in the checkpoint \(strict=True\): \['model.extra.weight'\]"),
        "shape": ({"state_dict": shaped}, r"'model.norm.weight' has shape \(7,\) in the checkpoint but "
                                          r"\(64,\) in the model"),
        "dtype": ({"state_dict": typed}, r"'model.norm.weight' is torch.int32 in the checkpoint but "
                                         r"torch.float32 in the model; only floating-point"),
        # an expert missing: transformers' conversion cannot stack the layer's experts (not followed)
        "moe_names": ({"state_dict": {k: v for k, v in load_file(os.path.join(ckpts["mixtral"], "model.safetensors")).items()
                                      if k != "model.layers.1.block_sparse_moe.experts.3.w1.weight"}},
                      r"rank 0: 1 persistent tensor\(s\) missing from the checkpoint: "
                      r"\['model.layers.1.mlp.experts.gate_up_proj'\].*transformers' own conversion.*"
                      r"from_pretrained on src"),
        # a layer wrapped the way PEFT's LoRA wraps it (base_layer + lora_A): the base checkpoint lacks both
        "peft": ({"state_dict": base}, r"missing from the checkpoint: \['model.layers.0.self_attn.q_proj.base_layer.weight', "
                                       r"'model.layers.0.self_attn.q_proj.lora_A.weight'\].*looks wrapped by PEFT.*"
                                       r"materialize the base model first, then apply get_peft_model"),
    }
    out = {}
    for name, (kw, _) in cases.items():
        path = ckpts["mixtral"] if name == "moe_names" else ckpts["llama"]
        model = models.build_meta(path)
        if name == "peft":
            attn = model.model.layers[0].self_attn
            lora = nn.Module()
            lora.base_layer, lora.lora_A = attn.q_proj, nn.Linear(64, 2, bias=False, device="meta")
            attn.q_proj = lora
        if rank != 0:
            kw = {k: v for k, v in kw.items() if k != "state_dict"}
        try:
            materialize(model, "cpu", **kw)
            out[name] = "no error"
        except MaterializeError as e:
            out[name] = str(e)
            still_meta = all(t.is_meta for t in model.state_dict().values())
            out[name] += "" if still_meta else " | MODEL CHANGED"
    # every rank built under accelerate's init_empty_weights() without tie_weights(): the tie is lost
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    with init_empty_weights():
        untied = type(models.build_meta(ckpts["qwen2_tied"]))._from_config(AutoConfig.from_pretrained(ckpts["qwen2_tied"]))
    try:
        materialize(untied, "cpu", state_dict=ckpts["qwen2_tied"] if rank == 0 else None)
        out["untied"] = "no error"
    except MaterializeError as e:
        out["untied"] = str(e)
    cases["untied"] = (None, r"rank 0: 1 persistent tensor\(s\) missing from the checkpoint: \['lm_head.weight'\]\. "
                             r"'lm_head.weight' is not tied to 'model.embed_tokens.weight' although the model's config "
                             r"ties them: a model built under accelerate's init_empty_weights\(\) loses its ties\. Call "
                             r"model.tie_weights\(\) on every rank after building it\.$")
    # unexpected keys without strict: a warning on src, and the load is exact
    model = models.build_meta(ckpts["llama"])
    import warnings
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        materialize(model, "cpu", state_dict=extra if rank == 0 else None)
    out["warned"] = [str(x.message) for x in w if "not in the model's state_dict() were ignored" in str(x.message)]
    out["exact"] = compare(model, models.load_reference(ckpts["llama"]), _hf_forward)
    return {k: (v, cases[k][1]) if k in cases else v for k, v in out.items()}


def test_bad_keys_raise_on_every_rank(ckpts):
    for rank, res in enumerate(run_ranks(_bad_keys_worker, 2, ckpts)):
        assert res.pop("exact") == []
        warned = res.pop("warned")
        assert (len(warned) == 1 and "model.extra.weight" in warned[0]) if rank == 0 else warned == []
        for name, (msg, pattern) in res.items():
            assert "MODEL CHANGED" not in msg, msg
            assert re.search(pattern, msg), f"rank {rank} {name}: {msg!r} !~ {pattern!r}"
            assert f"this is rank {rank}" in msg


def _warnings_as_errors_worker(rank, world, ckpts):
    """src runs under a warnings filter that makes warnings errors (python -W error): the warnings it
    gives before any data moves (unexpected keys here) must reach every rank as the error, not leave
    the others waiting for src in the agreement."""
    import warnings

    from safetensors.torch import load_file

    from fsdp_fastload import MaterializeError, materialize

    path = ckpts["llama"]
    sd = dict(load_file(os.path.join(path, "model.safetensors")), **{"model.extra.weight": torch.ones(2)})
    model = models.build_meta(path)
    with warnings.catch_warnings():
        if rank == 0:
            warnings.simplefilter("error")
        try:
            materialize(model, "cpu", state_dict=sd if rank == 0 else None)
            return "no error"
        except MaterializeError as e:
            return str(e) + ("" if all(t.is_meta for t in model.state_dict().values()) else " | MODEL CHANGED")


def test_warnings_turned_into_errors_on_src_raise_on_every_rank(ckpts):
    for rank, msg in enumerate(run_ranks(_warnings_as_errors_worker, 2, ckpts, env={"PG_TIMEOUT": "30"},
                                         timeout=90)):
        assert re.search(r"rank 0: UserWarning raised as an error by the warnings filter of rank 0: "
                         r"fsdp_fastload.materialize: 1 checkpoint key\(s\) not in the model's state_dict\(\) "
                         r"were ignored: \['model.extra.weight'\]", msg), f"rank {rank}: {msg}"
        assert f"this is rank {rank}" in msg and "MODEL CHANGED" not in msg, msg


def _tie_conflict_worker(rank, world, tied, untied):
    """`untied`: `tied`'s checkpoint with its own, different `lm_head.weight` while the config still
    ties it to `model.embed_tokens.weight` (from_pretrained unties such a pair, with a warning)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from fsdp_fastload import MaterializeError, materialize

    f = os.path.join(untied, "model.safetensors")
    values = load_file(f)
    same = dict(values, **{"lm_head.weight": values["model.embed_tokens.weight"].clone()})
    out = {}
    for name, sd in (("dir", untied), ("file", f), ("mapping", values)):
        model = models.build_meta(tied)
        try:
            materialize(model, "cpu", state_dict=sd if rank == 0 else None)
            out[name] = "no error"
        except MaterializeError as e:
            out[name] = str(e) + ("" if all(t.is_meta for t in model.state_dict().values()) else " | MODEL CHANGED")
    # equal values under both names (distinct tensors): one tied tensor, as from_pretrained ties them
    model = models.build_meta(tied)
    materialize(model, "cpu", state_dict=same if rank == 0 else None)
    out["equal"] = compare(model, models.load_reference(tied), _hf_forward)
    # the fix the error names: the skeleton untied, like from_pretrained's model of this checkpoint
    ref = models.load_reference(untied)
    config = AutoConfig.from_pretrained(untied)
    config.tie_word_embeddings = False
    with torch.device("meta"):
        model = type(ref)._from_config(config).eval()
    materialize(model, "cpu", state_dict=untied if rank == 0 else None)
    out["fixed"] = compare(model, ref, _hf_forward)
    out["ref_untied"] = ref.lm_head.weight is not ref.model.embed_tokens.weight
    return out


def test_tied_names_with_different_values_raise_on_every_rank(ckpts, tmp_path):
    """A checkpoint holding different values under two names the model ties: taking either would
    silently differ from from_pretrained (which unties the pair), so every rank raises naming both,
    from a directory, a file and a mapping, and the model stays on meta; equal values load tied, and
    the skeleton built untied loads bit-exact with from_pretrained."""
    import shutil

    from safetensors.torch import load_file, save_file

    untied = str(tmp_path / "untied")
    shutil.copytree(ckpts["qwen2_tied"], untied)
    f = os.path.join(untied, "model.safetensors")
    values = load_file(f)
    values["lm_head.weight"] = values["model.embed_tokens.weight"] * 2
    save_file(values, f, metadata={"format": "pt"})
    pattern = (r"rank 0: the checkpoint holds different values for 'model.embed_tokens.weight' and "
               r"'lm_head.weight', which the model ties \(one tensor\).*config.tie_word_embeddings=False")
    for rank, res in enumerate(run_ranks(_tie_conflict_worker, 2, ckpts["qwen2_tied"], untied)):
        assert res.pop("ref_untied"), "from_pretrained no longer unties such a checkpoint: revisit the error"
        assert res.pop("equal") == [], f"rank {rank}"
        assert res.pop("fixed") == [], f"rank {rank}"
        for name, msg in res.items():
            assert re.search(pattern, msg) and f"this is rank {rank}" in msg, f"rank {rank} {name}: {msg}"
            assert "MODEL CHANGED" not in msg, msg


def _stale_buffer_worker(rank, world, path):
    import warnings

    from safetensors.torch import load_file

    from fsdp_fastload import materialize

    ref = models.load_reference(path)  # from_pretrained: the file's inv_freq is ignored, recomputed
    f = os.path.join(path, "model.safetensors")
    out = {}
    for name, sd in (("dir", path), ("file", f), ("mapping", load_file(f))):
        model = models.build_meta(path)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            materialize(model, "cpu", state_dict=sd if rank == 0 else None)
        out[name] = {"warned": [str(x.message) for x in w if "were ignored" in str(x.message)],
                     "diff": compare(model, ref, _hf_forward),
                     "from_mapping": torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq * 2)}
    return out


def test_checkpoint_values_of_non_persistent_buffers_are_ignored(ckpts, tmp_path):
    """A checkpoint file holding a value for a non-persistent buffer (an older version of the model
    saved it: a rounded rotary `inv_freq`, here doubled) is ignored like from_pretrained ignores it
    (an unexpected key, named in src's warning; the buffer recomputed): bit-exact with from_pretrained,
    logits included. A mapping's value is used (how a src hands over buffers it computed itself)."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "stale")
    shutil.copytree(ckpts["llama"], path)
    f = os.path.join(path, "model.safetensors")
    values = load_file(f)
    values["model.rotary_emb.inv_freq"] = models.load_reference(ckpts["llama"]).model.rotary_emb.inv_freq * 2
    save_file(values, f, metadata={"format": "pt"})
    for rank, res in enumerate(run_ranks(_stale_buffer_worker, 2, path)):
        for name in ("dir", "file"):
            assert res[name]["diff"] == [], f"rank {rank} {name}: {res[name]['diff']}"
            want = ["model.rotary_emb.inv_freq"] if rank == 0 else []
            assert [w.split(": ", 2)[-1] for w in res[name]["warned"]] == [str(want)] * bool(want), res[name]
        assert res["mapping"]["from_mapping"], f"rank {rank}: the mapping's inv_freq was not used"
        assert res["mapping"]["warned"] == []


def _default_device_worker(rank, world, path):
    from fsdp_fastload import materialize

    out = {}
    for how in ("context", "global"):
        for flow in ("model", "checkpoint"):
            model = models.load_reference(path) if flow == "model" and rank == 0 else models.build_meta(path)
            sd = path if flow == "checkpoint" and rank == 0 else None
            if how == "context":  # called inside the block that built the skeleton
                with torch.device("meta"):
                    materialize(model, "cpu", state_dict=sd)
            else:
                torch.set_default_device("meta")
                try:
                    materialize(model, "cpu", state_dict=sd)
                finally:
                    torch.set_default_device(None)
            out[f"{how} {flow}"] = compare(model, models.load_reference(path), _hf_forward)
    return out


def test_called_where_the_default_device_is_meta(ckpts):
    """materialize called inside `with torch.device("meta"):` (the block that built the skeleton) or
    after `torch.set_default_device("meta")`: its own host tensors stay on the CPU, and the load is
    bit-exact (it raised "Cannot copy out of meta tensor")."""
    for rank, res in enumerate(run_ranks(_default_device_worker, 2, ckpts["llama"])):
        for name, diff in res.items():
            assert diff == [], f"rank {rank} {name}: {diff}"


def test_tied_names_compare_by_value_and_bits():
    """The tie check on its own (no ranks): the same memory or equal values (NaNs with equal bits
    too) match as one tensor; another shape, other values, or an integer where the model holds floats
    are named."""
    from fsdp_fastload.manifest import build_manifest
    from fsdp_fastload.source import match

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

    with torch.device("meta"):
        entries = build_manifest(Tied())
    w = torch.randn(3, 3)
    nan = torch.full((3, 3), float("nan"))
    ok = {"view": w.view(3, 3), "clone": w.clone(), "nan": nan.clone()}
    for name, second in ok.items():
        first = nan if name == "nan" else w
        plan, error = match(entries, {"a.weight": first, "b.weight": second}, strict=True)
        assert error is None and plan is not None, f"{name}: {error}"
    bad = {"values": (w, w * 2, "values"), "shape": (w, w.reshape(9), "shapes"),
           "int": (torch.ones(3, 3), torch.ones(3, 3, dtype=torch.int64), "values")}
    for name, (first, second, what) in bad.items():
        plan, error = match(entries, {"a.weight": first, "b.weight": second}, strict=True)
        assert plan is None and re.search(rf"different {what} for 'a.weight' and 'b.weight', which the model "
                                          r"ties", error), f"{name}: {error}"


# --------------------------------------------------------------------------- non-persistent buffers

class ScaledEmbedding(nn.Embedding):
    """An embedding owning a non-persistent scale; its reset_parameters re-randomises the weight too
    (the shape of the seed's bug: a whole-module initializer next to loaded weights)."""

    def __init__(self, n, d):
        super().__init__(n, d)
        self.register_buffer("scale", torch.tensor(d ** 0.5), persistent=False)

    def reset_parameters(self):
        super().reset_parameters()  # would destroy a loaded weight
        if hasattr(self, "scale"):
            self.scale.fill_(self.embedding_dim ** 0.5)

    def forward(self, x):
        return super().forward(x) * self.scale


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = ScaledEmbedding(10, 4)
        self.buf = models.BufferNet()

    def forward(self, x):
        return self.emb(x).sum() + self.buf(self.buf.example_input())


def _buffer_worker(rank, world, with_callback):
    from fsdp_fastload import MaterializeError, materialize

    torch.manual_seed(0)
    ref = Net()
    sd = ref.state_dict()
    with torch.device("meta"):
        model = Net()

    def buffer_init(mod):
        if isinstance(mod, models.BufferNet):
            pos = torch.arange(4, dtype=torch.float32)[:, None]
            mod.table.copy_(torch.sin(pos / torch.arange(1, 4, dtype=torch.float32)[None, :]))
            mod.index = torch.arange(7, dtype=torch.int64) * 3  # assigned, not written in place

    try:
        materialize(model, "cpu", state_dict=sd if rank == 0 else None,
                    buffer_init=buffer_init if with_callback else None)
    except MaterializeError as e:
        return str(e), all(t.is_meta for t in model.state_dict().values())
    return compare(model, ref, lambda m: m(torch.arange(6))), None


def test_buffers_recomputed_without_touching_loaded_weights():
    for rank, (bad, _) in enumerate(run_ranks(_buffer_worker, 2, True)):
        assert bad == [], f"rank {rank}: {bad}"


def test_unwritten_buffer_is_an_error_naming_it():
    for rank, (msg, still_meta) in enumerate(run_ranks(_buffer_worker, 2, False)):
        assert re.search(r"2 non-persistent buffer\(s\) were neither sent by src nor written by any "
                         r"initializer: 'buf.table' \(torch.float32, \[4, 3\]; tried: nothing\); "
                         r"'buf.index'.*Pass buffer_init=", msg), msg
        assert still_meta, "a failed call must leave the module as it was"


class EveryDtype(nn.Module):
    """A parameter or buffer in each dtype a safetensors file can hold (FP8 with their AMD FNUZ
    variants, the MX E8M0 scale, packed float4 pairs, unsigned ints, complex), filled from random
    bytes (any bit pattern: NaN and inf encodings too); `empty`: uninitialized (for a meta skeleton)."""

    # every dtype safetensors 0.8's save_file writes, listed here (not taken from the code under test)
    DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
              torch.float8_e5m2fnuz, torch.float8_e8m0fnu, torch.float4_e2m1fn_x2, torch.uint16, torch.uint32,
              torch.uint64, torch.complex64)

    def __init__(self, empty: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for i, dt in enumerate(self.DTYPES):
            shape = (3, 2 + i % 3)
            nbytes = shape[0] * shape[1] * dt.itemsize
            t = (torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g).view(dt).view(shape)
                 if not empty else torch.empty(shape, dtype=dt))
            name = "t_" + str(dt).replace("torch.", "")  # (not `bfloat16`: a Module method)
            if i % 2:
                self.register_buffer(name, t)
            else:
                self.register_parameter(name, nn.Parameter(t, requires_grad=False))


def _bytes_of(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _dtype_worker(rank, world, path):
    from safetensors.torch import load_file

    from fsdp_fastload import materialize

    ref = EveryDtype()
    out = []
    for flow in ("dir", "file", "mapping", "model"):
        if rank == 0 and flow == "model":
            model = EveryDtype()
        else:
            with torch.device("meta"):
                model = EveryDtype(empty=True)
        sd = {"dir": os.path.dirname(path), "file": path, "mapping": load_file(path) if rank == 0 else None,
              "model": None}[flow]
        materialize(model, "cpu", state_dict=sd if rank == 0 else None, verify=True, poison=True)
        for name, want in ref.state_dict().items():
            got = model.state_dict()[name]
            if (got.dtype, got.shape) != (want.dtype, want.shape) or not torch.equal(_bytes_of(got), _bytes_of(want)):
                out.append(f"{flow}: {name} {got.dtype} {tuple(got.shape)} differs")
    return out


def test_every_safetensors_dtype_bit_exact(tmp_path):
    """Each dtype safetensors writes (F8_E4M3FNUZ, F8_E8M0 and F4 among them; F4's header counts
    float4 values, torch's dtype their byte pairs) loads bit for bit, from a file, a directory, a
    mapping and a src model, with checksums on."""
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "model.safetensors")
    ref = EveryDtype()
    save_file(ref.state_dict(), path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    fp4 = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])["t_float4_e2m1fn_x2"]  # float4 values: 2 a byte
    assert fp4["dtype"] == "F4" and fp4["shape"] == [3, 2 * ref.t_float4_e2m1fn_x2.shape[1]], fp4
    assert {k: (v.dtype, v.shape) for k, v in load_file(path).items()} == \
        {k: (v.dtype, v.shape) for k, v in ref.state_dict().items()}
    for rank, bad in enumerate(run_ranks(_dtype_worker, 2, path)):
        assert bad == [], f"rank {rank}: {bad}"


# --------------------------------------------------------------------------- file validation

def _write(path, header: dict | bytes, data: bytes = b"", n: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return str(path)


BAD_FILES = [
    ("truncated", lambda p: open(p, "wb").write(b"\x01\x02") and str(p), "shorter than the 8-byte header"),
    ("length", lambda p: _write(p, {}, n=1 << 40), "header length 1099511627776 runs past the end"),
    ("json", lambda p: _write(p, b"{not json"), "header is not valid JSON"),
    ("dtype", lambda p: _write(p, {"a": {"dtype": "F12", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "tensor 'a': unknown dtype 'F12'"),
    ("span", lambda p: _write(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8),
     r"tensor 'a': shape \[2\] x 4 bytes = 8 bytes, but its span is 4 bytes"),
    ("outside", lambda p: _write(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
     r"data_offsets \[0, 16\] fall outside the data section of 8 bytes"),
    ("overlap", lambda p: _write(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
     r"tensors 'a' \[0, 8\) and 'b' \[4, 12\) overlap"),
    ("shape", lambda p: _write(p, {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}),
     "is not a list of non-negative integers"),
    ("torch_save", lambda p: torch.save({"w": torch.zeros(4)}, p) or str(p),
     r"not safetensors\. It looks like a torch\.save / pickle file: pass its contents as a mapping"),
]


@pytest.mark.parametrize("name,make,msg", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_parse_header_rejects_lying_files(tmp_path, name, make, msg):
    path = make(tmp_path / f"{name}.safetensors")
    with pytest.raises(CheckpointError, match=msg) as e:
        parse_header(path)
    assert path in str(e.value)


def test_parse_header_refuses_a_fifo_without_waiting(tmp_path):
    """A FIFO under a checkpoint's name (opened for reading, it would block until a writer came) is
    refused at once, naming it: the open does not wait (O_NONBLOCK) and its type is checked."""
    import threading

    path = str(tmp_path / "model.safetensors")
    os.mkfifo(path)
    got: list = []

    def parse():
        try:
            parse_header(path)
            got.append("no error")
        except Exception as e:  # noqa: BLE001
            got.append(e)
    t = threading.Thread(target=parse, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # blocked in open: let it go (a writer end unblocks it), then fail
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
        pytest.fail("parse_header waited on a FIFO")
    assert len(got) == 1 and isinstance(got[0], CheckpointError), got
    assert str(got[0]) == f"{path}: not a regular file. Pass a safetensors file or a checkpoint directory."


def test_parse_header_accepts_real_file(ckpts):
    (f,) = checkpoint_files(ckpts["llama"])
    from safetensors import safe_open
    with safe_open(f, "pt") as s:
        keys = set(s.keys())
        hdr = parse_header(f)
        assert set(hdr) == keys
        for k in keys:
            t = s.get_tensor(k)
            assert hdr[k].dtype == t.dtype and hdr[k].shape == tuple(t.shape)


def test_checkpoint_dirs(tmp_path, ckpts):
    with pytest.raises(CheckpointError, match=r"holds no .safetensors file \(and no model.safetensors.index.json\)\. Save"):
        checkpoint_files(str(tmp_path))
    bins = tmp_path / "bins"
    bins.mkdir()
    torch.save({"w": torch.zeros(2)}, bins / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"It holds \['pytorch_model.bin'\]: pass their contents as a mapping "
                                              r"\(state_dict=torch.load\(file, mmap=True, weights_only=True\)"):
        checkpoint_files(str(bins))
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"names shard files that do not exist: \['model-00001"):
        checkpoint_files(str(tmp_path))
    idx.write_text(json.dumps({"weight_map": {"a": 3}}))
    with pytest.raises(CheckpointError, match=r"not a valid safetensors index \(weight_map values must be file names\)"):
        checkpoint_files(str(tmp_path))
    # save_pretrained into a directory of the other layout leaves both: from_pretrained takes the single file
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert checkpoint_files(str(tmp_path)) == [str(tmp_path / "model.safetensors")]
    assert len(checkpoint_files(ckpts["llama-sharded"])) > 1


_FD_LIMIT_SCRIPT = r"""
import os, resource, sys, torch
from torch import nn
from safetensors.torch import save_file
from fsdp_fastload import MaterializeError, materialize

d = sys.argv[1]
model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)])
sd = model.state_dict()
keys = list(sd)
for k, key in enumerate(keys):  # one file per tensor: 16 files
    save_file({key: sd[key].contiguous()}, os.path.join(d, f"part{k}.safetensors"))
open(os.path.join(d, "model.safetensors.index.json"), "w").write(
    '{"weight_map": {%s}}' % ", ".join(f'"{key}": "part{k}.safetensors"' for k, key in enumerate(keys)))
used = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 6, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
meta = nn.Sequential(*[nn.Linear(4, 4, device="meta") for _ in range(8)])
try:
    materialize(meta, "cpu", state_dict=d)
    print("no error")
except MaterializeError as e:
    print(e)
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 40, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
materialize(meta, "cpu", state_dict=d)  # enough descriptors: loads, and gives them all back
assert all(torch.equal(a, b) for a, b in zip(meta.state_dict().values(), sd.values()))
print("fds after", len(os.listdir("/proc/self/fd")) - used)
"""


def test_too_many_checkpoint_files_for_the_open_file_limit_is_named(tmp_path):
    """Every file of a checkpoint stays open while it loads: past the process's limit on open files
    the error names the file and the limit to raise; under it the load works and leaves no file open."""
    import subprocess
    import sys

    got = subprocess.run([sys.executable, "-c", _FD_LIMIT_SCRIPT, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    first, after = got.stdout.strip().splitlines()
    assert re.match(rf"fsdp_fastload\.materialize: {re.escape(str(tmp_path))}/part\d+\.safetensors: cannot open it "
                    r"\(Too many open files\): materialize keeps every file of a checkpoint open while it loads\. "
                    r"Raise this process's limit on open files above the number of checkpoint files "
                    r"\(`ulimit -n`, or resource\.setrlimit\(resource\.RLIMIT_NOFILE, \.\.\.\) before the call\)\.$",
                    first), first
    assert after == "fds after 0", after


def _bad_file_worker(rank, world, path):
    from fsdp_fastload import MaterializeError, materialize

    model = nn.Linear(2, 2, device="meta")
    try:
        materialize(model, "cpu", state_dict=path if rank == 0 else None)
    except MaterializeError as e:
        return str(e)
    return "no error"


def test_bad_file_raises_on_every_rank(tmp_path):
    path = _write(tmp_path / "bad.safetensors", b"{not json")
    for rank, msg in enumerate(run_ranks(_bad_file_worker, 2, path)):
        assert f"rank 0: {path}: header is not valid JSON" in msg and f"this is rank {rank}" in msg, msg


def _renamed_worker(rank, world, cases):
    """Checkpoints whose keys transformers renames on load, read by src straight from the files."""
    import transformers

    from fsdp_fastload import materialize

    out = {}
    for name, (path, cls_name) in cases.items():
        cls = getattr(transformers, cls_name)
        with torch.device("meta"):
            model = cls._from_config(transformers.AutoConfig.from_pretrained(path)).eval()
        materialize(model, "cpu", state_dict=path if rank == 0 else None, poison=True, verify=True,
                    bucket_size=1 << 14)
        ref = cls.from_pretrained(path).eval()
        fwd = (lambda m: m(**models.example_inputs(m)).last_hidden_state.detach()) if cls_name == "LlamaModel" \
            else _hf_forward
        out[name] = compare(model, ref, fwd)
    return out


def test_keys_transformers_renames_on_load(ckpts, tmp_path):
    """GPT-NeoX's checkpoint says `embed_out.weight` (the model: `lm_head.weight`), and a
    `...ForCausalLM` checkpoint loads into the base model with its `model.` prefix stripped: src applies
    the renaming `from_pretrained` applies, and every rank equals `from_pretrained` bit for bit."""
    import transformers

    torch.manual_seed(0)
    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=128))
    neox.save_pretrained(tmp_path / "neox")
    (f,) = checkpoint_files(str(tmp_path / "neox"))
    assert "embed_out.weight" in parse_header(f) and "lm_head.weight" in neox.state_dict()
    cases = {"gpt_neox": (str(tmp_path / "neox"), "GPTNeoXForCausalLM"),
             "causal_lm_into_base": (ckpts["llama"], "LlamaModel")}
    _check(run_ranks(_renamed_worker, 2, cases))


def _fp32_kept_worker(rank, world, path, flow):
    """fp16 T5: from_pretrained keeps `wo` in float32; a from_config skeleton does not, unless
    `from_pretrained_dtypes` gives it from_pretrained's dtypes."""
    import warnings

    import transformers

    from fsdp_fastload import materialize
    from fsdp_fastload.integrations.transformers import from_pretrained_dtypes

    cls, half = transformers.T5ForConditionalGeneration, torch.float16
    ref = cls.from_pretrained(path, dtype=half).eval()
    if flow == "model" and rank == 0:
        model = cls.from_pretrained(path, dtype=half).eval()
        changed = []
    else:
        with torch.device("meta"):
            model = cls._from_config(transformers.AutoConfig.from_pretrained(path), dtype=half).eval()
        changed = from_pretrained_dtypes(model, half) if flow != "no_helper" else []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        materialize(model, "cpu", state_dict=path if (flow != "model" and rank == 0) else None, verify=True)
    warned = [str(w.message) for w in seen if "_keep_in_fp32_modules" in str(w.message)]
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(0))

    def fwd(m):
        with torch.no_grad():
            return m(input_ids=ids, decoder_input_ids=ids[:, :5]).logits

    return {"changed": changed, "warned": warned, "bad": compare(model, ref, fwd),
            "wo": str(model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype)}


def test_skeleton_gets_from_pretrained_fp32_modules(tmp_path):
    """A fp16 T5 skeleton from `_from_config` has `wo` in fp16 where from_pretrained keeps float32:
    materialize warns on every rank (and the module's dtype wins); after `from_pretrained_dtypes` the
    skeleton matches, nothing is warned, and both flows equal from_pretrained bit for bit."""
    import transformers

    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        decoder_start_token_id=0)).save_pretrained(tmp_path)
    for rank, r in enumerate(run_ranks(_fp32_kept_worker, 2, str(tmp_path), "no_helper")):
        assert r["warned"] and "from_pretrained_dtypes" in r["warned"][0] and r["wo"] == "torch.float16", (rank, r)
        assert r["bad"], (rank, r)  # the module's dtype won: not equal to from_pretrained
    for flow in ("dir", "model"):
        for rank, r in enumerate(run_ranks(_fp32_kept_worker, 2, str(tmp_path), flow)):
            assert r["bad"] == [] and r["warned"] == [] and r["wo"] == "torch.float32", (flow, rank, r)
            if flow == "dir" or rank == 1:
                assert "encoder.block.0.layer.1.DenseReluDense.wo.weight" in r["changed"], (flow, rank, r)


def test_from_pretrained_dtypes_leaves_what_from_pretrained_does_not_load():
    """Non-persistent buffers are not loaded by from_pretrained, so not converted by it: the helper
    leaves them, and the warning does not count them (else it would outlive the fix)."""
    import transformers

    from fsdp_fastload.integrations.transformers import from_pretrained_dtypes, half_tensors_kept_in_fp32
    from fsdp_fastload.manifest import build_manifest

    config = transformers.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                   decoder_start_token_id=0)
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(config).to(torch.float16)
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    wo.register_buffer("scale", torch.ones(2, dtype=torch.float16, device="meta"), persistent=False)
    assert "encoder.block.0.layer.1.DenseReluDense.wo.weight" in half_tensors_kept_in_fp32(model, build_manifest(model))
    changed = from_pretrained_dtypes(model, torch.float16)
    assert "encoder.block.0.layer.1.DenseReluDense.wo.weight" in changed and wo.weight.dtype == torch.float32
    assert wo.scale.dtype == torch.float16 and not any(n.endswith("wo.scale") for n in changed)
    assert half_tensors_kept_in_fp32(model, build_manifest(model)) == []
    assert from_pretrained_dtypes(model, torch.bfloat16) == []  # T5 keeps wo in fp32 for fp16 only


def _wrapped_worker(rank, world, cases, hows):
    from fsdp_fastload import materialize

    out = {}
    for name, path in cases.items():
        for how in hows:
            model = models.wrap_layers(models.build_meta(path), how)
            materialize(model, "cpu", state_dict=path if rank == 0 else None, poison=True, verify=True)
            ref = models.wrap_layers(models.load_reference(path), how)
            bad = compare(model, ref)  # names with the wrappers' segments, as the module has them
            models.unwrap_layers(model)
            models.unwrap_layers(ref)
            out[f"{name} {how}"] = bad + compare(model, ref, _hf_forward)  # eager forward
    return out


def test_wrapped_layers_load_from_a_plain_checkpoint(ckpts):
    """torchtitan-style code wraps layers (activation checkpointing, torch.compile) before loading:
    the checkpoint's keys lack the `_checkpoint_wrapped_module` / `_orig_mod` segments."""
    cases = {n: ckpts[n] for n in ("llama", "qwen2_tied")}
    _check(run_ranks(_wrapped_worker, 2, cases, ("ac", "compile", "compile_ac"), timeout=300))


def _empty_weights_worker(rank, world, cases):
    """Skeletons built the way accelerate's docs build them: `init_empty_weights()` (parameters on
    meta, buffers real on CPU), then `tie_weights()`; src holds the from_pretrained model or the
    checkpoint directory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from fsdp_fastload import materialize

    out = {}
    for name, path in cases.items():
        ref = models.load_reference(path)
        for flow in ("model", "dir"):
            if rank == 0 and flow == "model":
                model = models.load_reference(path)
            else:
                with init_empty_weights():
                    model = type(ref)._from_config(AutoConfig.from_pretrained(path))
                model.tie_weights()
                model.eval()
            materialize(model, "cpu", state_dict=path if rank == 0 and flow == "dir" else None, verify=True)
            out[f"{name} {flow}"] = compare(model, ref, _hf_forward)
    return out


def test_accelerate_init_empty_weights_skeletons(ckpts):
    cases = {n: ckpts[n] for n in ("llama", "gpt2", "bert_mlm", "qwen2_tied")}
    _check(run_ranks(_empty_weights_worker, 2, cases, timeout=300))


class _RescalesOnLoad(nn.Module):
    """A load pre-hook that changes values under the same key (a legacy checkpoint's scale)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.norm = nn.BatchNorm1d(3)  # torch's own override (old checkpoints' num_batches_tracked): no warning
        self.lin.register_load_state_dict_pre_hook(
            lambda mod, sd, prefix, *a: sd.__setitem__(prefix + "bias", sd[prefix + "bias"] * 2))


def test_modules_with_their_own_load_logic_are_named():
    import warnings

    from fsdp_fastload import materialize

    sd = _RescalesOnLoad().state_dict()
    model = _RescalesOnLoad().to("meta")
    with pytest.warns(UserWarning, match=r"1 module\(s\) have their own load_state_dict logic .* e\.g\. "
                                         r"\['lin \(Linear\)'\]; materialize installs the checkpoint's tensors "
                                         r"as they are"):
        materialize(model, "cpu", state_dict=sd)
    assert torch.equal(model.lin.bias, sd["lin.bias"])  # as the checkpoint holds it, as the warning says
    plain = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    sd = plain.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        materialize(plain.to("meta"), "cpu", state_dict=sd)


class _ResizesOnLoad(nn.Module):
    """Running statistics that start empty and take the checkpoint's shape when loaded, as torch's
    per-channel quantization observers do in their own `_load_from_state_dict`."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.register_buffer("running_max", torch.empty(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.running_max.resize_(state_dict[prefix + "running_max"].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _resizing_worker(rank, world, sd):
    from fsdp_fastload import MaterializeError, materialize

    model = nn.Sequential(_ResizesOnLoad()).to("meta")
    try:
        materialize(model, "cpu", state_dict=sd if rank == 0 else None)
    except MaterializeError as e:
        return str(e), model[0].running_max.is_meta
    return "no error", None


def test_shape_errors_name_modules_with_their_own_load_logic():
    """A shape the module's own load logic would adapt (load_state_dict resizes the buffer; materialize
    runs no such logic): every rank's error names the tensor, the module with its own logic, and the
    fix; the model stays on meta."""
    src = nn.Sequential(_ResizesOnLoad())
    src[0].running_max = torch.rand(4)
    sd = src.state_dict()
    plain = nn.Sequential(_ResizesOnLoad())
    plain.load_state_dict(sd)  # what the module's own logic does in a single process
    assert torch.equal(plain[0].running_max, sd["0.running_max"])
    for rank, (msg, still_meta) in enumerate(run_ranks(_resizing_worker, 2, sd)):
        assert re.search(r"'0\.running_max' has shape \(4,\) in the checkpoint but \(0,\) in the model\. 1 module\(s\) "
                         r"have their own load_state_dict logic, which materialize does not run, e\.g\. "
                         r"\['0 \(_ResizesOnLoad\)'\]: .*give the skeleton the checkpoint's names and shapes on every "
                         r"rank before materialize", msg), f"rank {rank}: {msg}"
        assert still_meta, f"rank {rank}: a failed call must leave the module as it was"

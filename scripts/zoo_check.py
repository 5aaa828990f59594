"""Acceptance sweep over transformers architectures that the test suite does not list.

For each architecture: a tiny model built from a config (seeded), saved with `save_pretrained`
(safetensors); then 2 gloo ranks load it with `materialize` both ways -- rank 0's `from_pretrained`
model to a meta skeleton on rank 1 (`model`), and every rank meta with rank 0 passing the checkpoint
directory (`dir`) -- and every rank compares every parameter and buffer (tied names included), the
tie groups and the forward output bit for bit with single-process `from_pretrained`; then, sharded
with FSDP2 (`fsdp2`: `fully_shard` on every block of every ModuleList, then the root, on a 2-rank CPU
mesh, rank 0 passing the directory), every parameter's `full_tensor()`, every buffer, the ties and
the sharded forward output (checkpoints whose tensors transformers fuses on load, MoE experts,
included). Only the cases listed in `REFUSED` may instead be refused, with the error named there.

    python scripts/zoo_check.py                 # every architecture below
    python scripts/zoo_check.py t5 whisper      # some of them

Run by tests/test_zoo.py; a few minutes on 2 cores.
"""
from __future__ import annotations

import faulthandler
import os
import queue
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TXT = dict(vocab_size=99)
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
LM = dict(TXT, **SMALL)
ARCHS = {
    # name: (config class, config kwargs, model class, inputs kind)
    "t5": ("T5Config", dict(TXT, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                            decoder_start_token_id=0), "T5ForConditionalGeneration", "seq2seq"),
    "bart": ("BartConfig", dict(TXT, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                                max_position_embeddings=64), "BartForConditionalGeneration", "seq2seq"),
    "opt": ("OPTConfig", dict(TXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=37,
                              max_position_embeddings=64, word_embed_proj_dim=32), "OPTForCausalLM", "ids"),
    "bloom": ("BloomConfig", dict(TXT, hidden_size=32, n_layer=2, n_head=4), "BloomForCausalLM", "ids"),
    "falcon": ("FalconConfig", dict(TXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
               "FalconForCausalLM", "ids"),
    "gpt_neox": ("GPTNeoXConfig", dict(LM, max_position_embeddings=64), "GPTNeoXForCausalLM", "ids"),
    "phi3": ("Phi3Config", dict(LM, pad_token_id=0), "Phi3ForCausalLM", "ids"),
    "qwen3": ("Qwen3Config", dict(LM, num_key_value_heads=2, head_dim=8), "Qwen3ForCausalLM", "ids"),
    "mamba": ("MambaConfig", dict(TXT, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                                  conv_kernel=4), "MambaForCausalLM", "ids"),
    "gptj": ("GPTJConfig", dict(TXT, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
             "GPTJForCausalLM", "ids"),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(TXT, n_embd=32, n_layer=2, n_head=4, n_positions=64),
                    "GPTBigCodeForCausalLM", "ids"),
    "roberta": ("RobertaConfig", dict(LM, max_position_embeddings=64), "RobertaForMaskedLM", "ids"),
    "albert": ("AlbertConfig", dict(LM, embedding_size=16, max_position_embeddings=64), "AlbertForMaskedLM", "ids"),
    "deberta_v2": ("DebertaV2Config", dict(LM, max_position_embeddings=64, relative_attention=True,
                                           position_buckets=8, max_relative_positions=16,
                                           pos_att_type=["p2c", "c2p"]), "DebertaV2ForMaskedLM", "ids"),
    "vit": ("ViTConfig", dict(SMALL, image_size=32, patch_size=8, num_labels=3), "ViTForImageClassification",
            "pixels"),
    "whisper": ("WhisperConfig", dict(TXT, d_model=32, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                                      decoder_ffn_dim=37, num_mel_bins=16, max_source_positions=32,
                                      max_target_positions=32, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2, decoder_start_token_id=1),
                "WhisperForConditionalGeneration", "audio"),
    "gemma2": ("Gemma2Config", dict(LM, num_key_value_heads=2, head_dim=8, pad_token_id=0),
               "Gemma2ForCausalLM", "ids"),
    "starcoder2": ("Starcoder2Config", dict(LM, num_key_value_heads=2), "Starcoder2ForCausalLM", "ids"),
    "olmo2": ("Olmo2Config", dict(LM, pad_token_id=0), "Olmo2ForCausalLM", "ids"),
    "electra": ("ElectraConfig", dict(LM, embedding_size=16, max_position_embeddings=64), "ElectraForMaskedLM",
                "ids"),
    "wav2vec2": ("Wav2Vec2Config", dict(TXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=37, conv_dim=(8, 8), conv_stride=(5, 2),
                                        conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                        num_conv_pos_embedding_groups=4), "Wav2Vec2ForCTC", "wave"),
    "mixtral": ("MixtralConfig", dict(LM, intermediate_size=48, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2),
                "MixtralForCausalLM", "ids"),
    # MoE whose experts transformers fuses on load (src applies its conversion), hybrids, SSMs, others
    "jamba": ("JambaConfig", dict(LM, intermediate_size=48, num_key_value_heads=2, num_experts=2, num_experts_per_tok=1,
                                  attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=1,
                                  expert_layer_period=2, mamba_d_conv=4, mamba_d_state=8, mamba_expand=2,
                                  use_mamba_kernels=False), "JambaForCausalLM", "ids"),
    "deepseek_v3": ("DeepseekV3Config", dict(LM, num_key_value_heads=4, first_k_dense_replace=1, kv_lora_rank=16,
                                             moe_intermediate_size=16, n_group=1, n_routed_experts=4,
                                             n_shared_experts=1, num_experts_per_tok=2, q_lora_rank=16,
                                             qk_nope_head_dim=4, qk_rope_head_dim=4, topk_group=1, v_head_dim=8),
                    "DeepseekV3ForCausalLM", "ids"),
    "olmoe": ("OlmoeConfig", dict(LM, intermediate_size=48, num_key_value_heads=2, num_experts=4,
                                  num_experts_per_tok=2), "OlmoeForCausalLM", "ids"),
    "phimoe": ("PhimoeConfig", dict(LM, intermediate_size=48, num_key_value_heads=2, num_local_experts=4,
                                    num_experts_per_tok=2), "PhimoeForCausalLM", "ids"),
    "switch_transformers": ("SwitchTransformersConfig", dict(TXT, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                                             num_decoder_layers=2, num_heads=4, num_experts=2,
                                                             num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                                                             decoder_start_token_id=0),
                            "SwitchTransformersForConditionalGeneration", "seq2seq"),
    "falcon_h1": ("FalconH1Config", dict(LM, intermediate_size=64, num_key_value_heads=2, mamba_d_ssm=64,
                                         mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=16,
                                         ssm_multipliers=[0.5, 2.0, 1.0, 1.5, 0.25]), "FalconH1ForCausalLM", "ids"),
    "recurrent_gemma": ("RecurrentGemmaConfig", dict(LM, num_key_value_heads=2, head_dim=8, attention_window_size=8,
                                                     block_types=["recurrent", "attention"], conv1d_width=4,
                                                     lru_width=32), "RecurrentGemmaForCausalLM", "ids"),
    "mamba2": ("Mamba2Config", dict(TXT, hidden_size=32, num_hidden_layers=2, chunk_size=16, conv_kernel=4, expand=2,
                                    head_dim=8, n_groups=1, num_heads=8, state_size=8), "Mamba2ForCausalLM", "ids"),
    "rwkv": ("RwkvConfig", dict(TXT, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, context_length=64,
                                intermediate_size=37), "RwkvForCausalLM", "ids"),
    "reformer": ("ReformerConfig", dict(TXT, hidden_size=32, num_attention_heads=4, attention_head_size=8,
                                        attn_layers=["local", "lsh"], axial_pos_embds_dim=[16, 16],
                                        axial_pos_shape=[4, 16], feed_forward_size=37, hash_seed=0, is_decoder=True,
                                        local_attn_chunk_length=4, lsh_attn_chunk_length=4,
                                        max_position_embeddings=64, num_buckets=2), "ReformerModelWithLMHead", "ids"),
    "marian": ("MarianConfig", dict(TXT, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                    decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                                    max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                    decoder_start_token_id=1, decoder_vocab_size=99), "MarianMTModel", "seq2seq"),
    "longt5": ("LongT5Config", dict(TXT, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                    decoder_start_token_id=0, encoder_attention_type="local", local_radius=2),
               "LongT5ForConditionalGeneration", "seq2seq"),
    "funnel": ("FunnelConfig", dict(TXT, d_model=32, n_head=4, d_head=8, d_inner=37, block_sizes=[1, 1],
                                    num_decoder_layers=1), "FunnelForMaskedLM", "ids"),
    "swin": ("SwinConfig", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                window_size=4, num_labels=3), "SwinForImageClassification", "pixels"),
    "dinov3_vit": ("DINOv3ViTConfig", dict(SMALL, intermediate_size=64, image_size=32, patch_size=8,
                                           num_register_tokens=0), "DINOv3ViTModel", "pixels"),
    "detr": ("DetrConfig", dict(use_timm_backbone=False, use_pretrained_backbone=False,
                                backbone_config=dict(model_type="resnet", embedding_size=8, hidden_sizes=[8, 16],
                                                     depths=[1, 1], out_features=["stage1", "stage2"]),
                                d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, num_queries=5,
                                num_labels=3), "DetrForObjectDetection", "pixels"),
    "zamba": ("ZambaConfig", dict(LM, num_hidden_layers=3, layers_block_type=["mamba", "hybrid", "hybrid"],
                                  num_key_value_heads=4, attention_hidden_size=64, attention_head_dim=16,
                                  mamba_d_state=8, mamba_dt_rank=4, mamba_expand=2, n_mamba_heads=2,
                                  attn_layer_period=2, attn_layer_offset=1, use_mamba_kernels=False),
              "ZambaForCausalLM", "ids"),  # one block shared by its hybrid layers
    "llava": ("LlavaConfig", dict(text_config=dict(LM, model_type="llama", num_key_value_heads=2),
                                  vision_config=dict(SMALL, model_type="clip_vision_model", image_size=16,
                                                     patch_size=8), image_token_index=98),
              "LlavaForConditionalGeneration", "ids"),
    "clip": ("CLIPConfig", dict(text_config=dict(LM, max_position_embeddings=64),
                                vision_config=dict(SMALL, image_size=32, patch_size=8),
                                projection_dim=16), "CLIPModel", "clip"),
}


def _inputs(kind: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (2, 10), generator=g)
    if kind == "ids":
        return {"input_ids": ids}
    if kind == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :6]}
    if kind == "wave":
        return {"input_values": torch.randn(2, 400, generator=g)}
    if kind == "pixels":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    if kind == "audio":
        return {"input_features": torch.randn(2, 16, 64, generator=g), "decoder_input_ids": ids[:, :6]}
    if kind == "clip":
        return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    raise ValueError(kind)


def _output(model, kind: str) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**_inputs(kind))
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


def _tensors(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}


def _ties(model) -> set:
    groups: dict = {}
    for n, t in _tensors(model).items():
        groups.setdefault(id(t), set()).add(n)
    return {frozenset(g) for g in groups.values()}


def _compare(model, ref, kind: str, grad_from=None) -> list[str]:
    """Differences from `ref`; `requires_grad` is compared with `grad_from`'s (default `ref`). A
    DTensor (an FSDP2 shard) is compared by its full tensor (collective), and its class is not
    compared (a DTensor parameter stands for the plain one)."""
    from torch.distributed.tensor import DTensor

    got, want = _tensors(model), _tensors(ref)
    grads = {n: t.requires_grad for n, t in _tensors(grad_from if grad_from is not None else ref).items()}
    bad = [f"names differ: {sorted(set(got) ^ set(want))[:5]}"] if set(got) != set(want) else []
    for n in sorted(want):  # (sorted: every rank runs the full_tensor collectives in one order)
        t, w = got.get(n), want[n]
        if t is None:
            continue
        sharded = isinstance(t, DTensor)
        v = t.full_tensor() if sharded else t
        if not w.numel() and sharded:  # FSDP2's own full shape for an empty tensor may be (0, ...)
            v = v.reshape(w.shape)
        if v.is_meta or v.dtype != w.dtype or v.shape != w.shape or not torch.equal(v, w):
            bad.append(f"{n}: differs ({'meta' if v.is_meta else v.dtype})")
        elif (type(t) is not type(w) and not sharded) or t.requires_grad != grads.get(n):
            bad.append(f"{n}: class/requires_grad differ")
    if _ties(model) != _ties(ref):
        bad.append("tie groups differ")
    if not bad:
        outs, refs = _output(model, kind), _output(ref, kind)
        if len(outs) != len(refs) or not all(torch.equal(a, b) for a, b in zip(outs, refs)):
            bad.append("forward output differs")
    return bad


from zoo_more import FULLY_SHARD_REFUSES, MORE  # noqa: E402  (same directory: scripts/)

for _name, _case in MORE.items():
    ARCHS.setdefault(_name, _case)

FLOWS = ("model", "dir", "fsdp2")
# (architecture, flow) -> a piece of the refusal expected there; every other case must load bit-exact
REFUSED = {
    ("clip", "fsdp2"): "fully_shard refuses",  # FSDP2 itself: a scalar parameter (logit_scale)
    # a block shared by several layers, each layer wrapped by its own fully_shard: FSDP2 splits the tie
    ("zamba", "fsdp2"): "in one fully_shard group",
    **{(name, "fsdp2"): "fully_shard refuses" for name in ("funnel", *FULLY_SHARD_REFUSES)},
}


def _shard(model, mesh):
    """torchtitan's recipe, by structure: every block of every outermost ModuleList (not the lists
    inside a block: T5's and ALBERT's blocks hold their own), then the root."""
    from torch.distributed.fsdp import fully_shard

    blocks, inside = [], set()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and not any(name.startswith(b + ".") for b in inside):
            for i, block in enumerate(m):
                blocks.append(block)
                inside.add(f"{name}.{i}")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _worker(rank: int, port: int, names: list[str], root: str, q) -> None:
    faulthandler.enable(all_threads=True)  # a rank that crashes (abort, segfault) prints every thread's stack
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import transformers

    from fsdp_fastload import MaterializeError, materialize

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    results = {}
    for name in names:
        cfg_cls, _, model_cls, kind = ARCHS[name]
        path = os.path.join(root, name)
        cls = getattr(transformers, model_cls)
        for flow in FLOWS:
            q.put(("case", rank, f"{name} {flow}"))  # the parent's watchdog: progress, and where a rank died
            try:
                ref = cls.from_pretrained(path).eval()
                config = transformers.AutoConfig.from_pretrained(path)
                if flow == "model" and rank == 0:
                    model = cls.from_pretrained(path).eval()
                else:
                    with torch.device("meta"):
                        model = cls._from_config(config).eval()
                    if flow == "fsdp2":
                        try:
                            _shard(model, mesh)
                        except Exception as e:  # noqa: BLE001  FSDP2's own limits (scalar parameters)
                            results[(name, flow)] = f"fully_shard refuses: {type(e).__name__}: {str(e)[:120]}"
                            continue
                try:
                    materialize(model, "cpu", state_dict=path if (flow != "model" and rank == 0) else None)
                except MaterializeError as e:
                    msg = str(e)
                    results[(name, flow)] = "refused: " + msg
                    continue
                # `dir`: every rank builds the model, so `requires_grad` is the model's own (transformers
                # 5 drops requires_grad=False on load: Whisper's positions); `model`: src's, as loaded.
                fresh = None
                if flow != "model":
                    with torch.device("meta"):
                        fresh = cls._from_config(config)
                bad = _compare(model, ref, kind, grad_from=fresh)
                results[(name, flow)] = "ok" if not bad else "MISMATCH: " + "; ".join(bad[:5])
            except Exception as e:  # noqa: BLE001  report, go on with the next case
                results[(name, flow)] = f"crash: {type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            dist.barrier()
    q.put(("done", rank, results))
    dist.destroy_process_group()


STALL = 300  # seconds a rank may spend on one case (a few on this VM) before the sweep is called hung


def _collect(procs, q, stall: float = STALL) -> tuple[dict, str | None]:
    """Every rank's results, or what went wrong: a rank that exited without reporting (its exit code,
    and the case it was in), or no rank starting a new case for `stall` seconds (a hang)."""
    got, case = {}, {}
    last = time.monotonic()
    dead_since = None
    while len(got) < len(procs):
        try:
            kind, rank, payload = q.get(timeout=1.0)
        except queue.Empty:
            now = time.monotonic()
            dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
            if dead:  # (a rank's last messages may still be on their way: wait 5 s for them)
                dead_since = dead_since or now
                if now - dead_since > 5:
                    return got, "; ".join(
                        f"rank {r} exited with code {procs[r].exitcode}"
                        f"{' (killed by signal ' + str(-procs[r].exitcode) + ')' if procs[r].exitcode < 0 else ''}"
                        f" without reporting, in case '{case.get(r, 'before the first')}'" for r in dead)
            elif now - last > stall:
                return got, (f"no rank started a new case for {stall:.0f} s (hang?); each rank's current case: "
                             f"{ {r: case.get(r) for r in range(len(procs))} }")
            continue
        last = time.monotonic()
        if kind == "case":
            case[rank] = payload
        else:
            got[rank] = payload
    return got, None


def main(argv: list[str]) -> int:
    import socket

    import transformers

    names = argv or list(ARCHS)
    root = tempfile.mkdtemp(prefix="fsdp_fastload_zoo_")
    built = []
    for name in names:
        cfg_cls, kw, model_cls, _ = ARCHS[name]
        try:
            torch.manual_seed(0)
            config = getattr(transformers, cfg_cls)(**kw)
            model = getattr(transformers, model_cls)(config)
            model.save_pretrained(os.path.join(root, name))
            built.append(name)
        except Exception as e:  # noqa: BLE001
            print(f"{name:12s} cannot build here: {type(e).__name__}: {str(e)[:200]}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, built, root, q)) for r in range(2)]
    for p in procs:
        p.start()
    got, problem = _collect(procs, q)  # the watchdog: a hang or a dead rank is a failure, said at once
    if problem is not None:
        print(f"FAILED: {problem}")
        for p in procs:
            p.kill()
        return 1
    for p in procs:
        p.join()
    failed = 0
    for name in built:
        for flow in FLOWS:
            rows = [got[r][(name, flow)] for r in range(2)]
            expected = REFUSED.get((name, flow))
            ok = all(r == "ok" or (expected is not None and expected in r) for r in rows)
            failed += not ok
            print(f"{name:12s} {flow:5s} " + " | ".join(f"rank {r}: {row[:300]}" for r, row in enumerate(rows)))
    print(f"{len(built)} architectures, {failed} failing case(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python
"""Does a weight's address change a model's logits on this GPU? (Why layout.CUDA_ALIGN is 512.)

Loads bf16 and float32 Llamas onto the GPU with `.to("cuda")` (every tensor where the caching
allocator puts it), then copies every parameter and buffer into one flat buffer at offsets that are
multiples of 512 plus a shift, and compares the logits bit for bit with the `.to("cuda")` model's.

    python benchmarks/gpu_align_probe.py
"""
import copy

import torch
import transformers


def placed(model, shift: int):
    """A copy of `model` (on the GPU) whose tensors sit at 512*k + shift bytes in one buffer."""
    m = copy.deepcopy(model)
    tensors = [(mod, kind, name, t) for mod in m.modules()
               for kind, table in (("p", mod._parameters), ("b", mod._buffers))
               for name, t in table.items() if t is not None]
    sizes = [(t.numel() * t.element_size() + 511) // 512 * 512 + 512 for *_, t in tensors]
    flat = torch.empty(sum(sizes), dtype=torch.uint8, device="cuda")
    off, seen = 0, {}
    for (mod, kind, name, t), size in zip(tensors, sizes):
        if id(t) not in seen:
            view = flat[off + shift:off + shift + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            view.copy_(t.detach())
            seen[id(t)] = torch.nn.Parameter(view, t.requires_grad) if kind == "p" else view
            off += size
        (mod._parameters if kind == "p" else mod._buffers)[name] = seen[id(t)]
    return m


CONFIGS = {
    # the tests' tiny Llama (tests/models.py _DECODER): where 64-byte offsets failed on an H100
    "tiny": dict(hidden_size=64, num_hidden_layers=2, vocab_size=256, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "512": dict(hidden_size=512, num_hidden_layers=4, vocab_size=8000, intermediate_size=1376,
                num_attention_heads=8, num_key_value_heads=8),
}


def main():
    print("| model | dtype | shift (bytes past a 512-byte line) | logits equal to .to('cuda') |")
    print("| --- | --- | --- | --- |")
    for name, kw in CONFIGS.items():
        cfg = transformers.LlamaConfig(**kw)
        ids = torch.randint(1, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
        for dtype in (torch.bfloat16, torch.float32):
            torch.manual_seed(0)
            ref = transformers.LlamaForCausalLM(cfg).to(dtype).eval().cuda()
            with torch.no_grad():
                want = ref(ids).logits
                for shift in (0, 16, 64, 128, 256):
                    got = placed(ref, shift)(ids).logits
                    diff = (got.float() - want.float()).abs().max().item()
                    print(f"| {name} | {dtype} | {shift} | {torch.equal(got, want)} (max diff {diff:.3g}) |")


if __name__ == "__main__":
    main()

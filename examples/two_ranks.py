"""A minimal 2-rank gloo run: rank 0 loads a tiny transformers model, rank 1 builds it on meta,
`materialize` gives rank 1 the identical model. Run: torchrun --nproc-per-node 2 examples/two_ranks.py
"""
import os
import tempfile

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from fsdp_fastload import materialize

dist.init_process_group("gloo")
rank = dist.get_rank()
ckpt = os.path.join(tempfile.gettempdir(), "fsdp_fastload_example")
config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256)
if rank == 0 and not os.path.exists(os.path.join(ckpt, "config.json")):
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(ckpt)
dist.barrier()

if rank == 0:
    model = LlamaForCausalLM.from_pretrained(ckpt)
else:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
materialize(model, "cpu", verify=True)

ids = torch.arange(16).reshape(2, 8)
logits = model(input_ids=ids).logits
ref = LlamaForCausalLM.from_pretrained(ckpt)(input_ids=ids).logits
assert torch.equal(logits, ref)
print(f"rank {rank}: {sum(p.numel() for p in model.parameters())} params, logits identical to from_pretrained")
dist.destroy_process_group()

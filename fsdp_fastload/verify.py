"""`verify=True`: per-tensor checksums all-gathered and compared with src's; names any tensor that differs."""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from .agree import MaterializeError
from .fill import byte_view
from .manifest import Entry

_CHUNK = 1 << 24


def checksum(t: torch.Tensor) -> int:
    """A 63-bit checksum of `t`'s bytes: CRC32 on the host; a position-weighted sum on devices (so
    compare only checksums of tensors on the same kind of device)."""
    b = byte_view(t)
    if b.device.type == "cpu":
        return zlib.crc32(memoryview(b.numpy())) if b.numel() else 0
    s1 = torch.zeros((), dtype=torch.int64, device=b.device)
    s2 = torch.zeros((), dtype=torch.int64, device=b.device)
    for start in range(0, b.numel(), _CHUNK):
        c = b[start:start + _CHUNK].to(torch.int64)
        w = torch.arange(start, start + c.numel(), device=b.device, dtype=torch.int64) % 65521 + 1
        s1 += c.sum()
        s2 += (c * w).sum()
    return int((s1 * 1_000_003 + s2).item()) & ((1 << 63) - 1)


def verify(entries: list[Entry], views: list[torch.Tensor], *, group, src: int, rank: int,
           comm_device: torch.device) -> None:
    mine = torch.tensor([checksum(v) for v in views], dtype=torch.int64, device=comm_device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    ref = gathered[ranks.index(src)].cpu()
    bad = []
    for r, g in zip(ranks, gathered):
        for i in torch.nonzero(g.cpu() != ref).flatten().tolist():
            bad.append(f"'{entries[i].names[0]}' on rank {r}")
    if bad:
        raise MaterializeError(
            f"fsdp_fastload.materialize verify failed on all ranks (this is rank {rank}): "
            f"{len(bad)} tensor(s) differ from rank {src}'s: {', '.join(bad[:10])}"
            f"{' ...' if len(bad) > 10 else ''}. The broadcast delivered different bytes; "
            "check the network/NCCL setup and report this as a bug.")

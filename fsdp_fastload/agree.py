"""Before any data moves: every rank learns every other rank's verdict, so all raise together.

One small all_gather of (fingerprint, has-error) per rank. Only when something is wrong does a second,
object all_gather carry the details, from which every rank builds the same message and raises.
Nobody is ever left waiting in a collective that another rank skipped.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .manifest import first_difference


class MaterializeError(RuntimeError):
    """Raised on every rank when ranks disagree or a rank cannot take part; names the rank and the fix."""


def agree(*, group, src: int, rank: int, comm_device: torch.device, fp: int, summary,
          error: str | None, extra: int = 0) -> int:
    """Raise MaterializeError on every rank if any rank has an error or a different fingerprint.

    `summary` is this rank's manifest summary, or a callable giving it: it is only needed, and
    only made, when something is wrong. Returns src's `extra` word (how src tells every rank about
    its plan in the same collective).
    """
    world = dist.get_world_size(group)
    mine = torch.tensor([fp, 1 if error else 0, extra], dtype=torch.int64, device=comm_device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    with _peer_errors(rank):
        dist.all_gather(gathered, mine, group=group)
    rows = [tuple(int(x) for x in g.cpu()) for g in gathered]
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    src_i = ranks.index(src)
    if all(r[1] == 0 for r in rows) and all(r[0] == rows[src_i][0] for r in rows):
        return rows[src_i][2]
    details: list = [None] * world
    with _peer_errors(rank):
        dist.all_gather_object(details, (rank, error, summary() if callable(summary) else summary),
                               group=group)
    problems = [f"rank {r}: {err}" for r, err, _ in details if err]
    if not problems:
        ref = details[src_i][2]
        for r, _, summ in details:
            if summ != ref:
                problems.append(first_difference(ref, src, summ, r))
                problems.append(
                    "Every rank must build the same architecture (same config, dtype, ties and buffer "
                    "persistence) before calling materialize.")
                break
        else:
            problems.append("the models agree but the ranks passed different src= or verify= values; "
                            "pass the same on every rank.")
    raise MaterializeError(f"fsdp_fastload.materialize failed on all ranks (this is rank {rank}): "
                           + "; ".join(problems))


@contextlib.contextmanager
def _peer_errors(rank: int):
    """A torch.distributed failure here (a peer gone, the group's timeout hit) as a MaterializeError."""
    try:
        yield
    except MaterializeError:
        raise
    except RuntimeError as e:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MaterializeError(
            f"fsdp_fastload.materialize (rank {rank}): exchanging status with the other ranks failed "
            f"({type(e).__name__}: {cause}). A peer rank most likely died, or did not reach materialize "
            "within the process group's timeout: look for the first error in the other ranks' logs. "
            "Nothing was installed on this rank.") from e

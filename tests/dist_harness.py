"""Run a function on N real gloo ranks (separate processes) with a watchdog: a hang is a failure.

`run_ranks(fn, world, *args)` spawns `world` processes; each initialises a process group (gloo
unless told) over TCP on loopback, calls `fn(rank, world, *args)` and reports its return value or
its exception.
The parent waits at most `timeout` seconds, kills everything still running, and fails loudly.
Fault tests name the ranks that exit on purpose (`expect_dead`); their result is a `Died`.
"""
from __future__ import annotations

import datetime
import faulthandler
import os
import queue as queue_mod
import socket
import time
import traceback

import torch.multiprocessing as mp


class RankError(Exception):
    """An exception raised on one rank: type name, message and traceback as text."""

    def __init__(self, rank, type_name, message, tb):
        super().__init__(f"rank {rank}: {type_name}: {message}")
        self.rank, self.type_name, self.message, self.tb = rank, type_name, message, tb


class Died:
    """The result of a rank in `expect_dead` that exited without reporting (exit code kept)."""

    def __init__(self, rank, exitcode):
        self.rank, self.exitcode = rank, exitcode

    def __repr__(self):
        return f"Died(rank={self.rank}, exitcode={self.exitcode})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, q, env, backend):
    faulthandler.enable(all_threads=True)  # a rank that crashes (abort, segfault) prints every thread's stack
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if "nccl" in backend:  # one GPU per rank
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=float(env.get("PG_TIMEOUT", 120))))
        result = fn(rank, world, *args)
        q.put((rank, "ok", result))
    except BaseException as e:  # report everything, including assertion errors
        q.put((rank, "error", (type(e).__name__, str(e), traceback.format_exc())))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_ranks(fn, world: int, *args, timeout: float = 240, env: dict | None = None,
              raise_errors: bool = True, expect_dead: tuple[int, ...] = (), backend: str = "gloo"):
    """Results of `fn` per rank (list indexed by rank); RankError for a rank that raised, `Died` for
    a rank in `expect_dead` that exited without reporting (any other silent exit is an error).
    `backend` is the process group's (an NCCL one puts rank r on GPU r mod the GPUs there)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, q, env, backend), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"watchdog: ranks {sorted(set(range(world)) - set(results))} of {world} did not "
                    f"finish within {timeout:.0f} s (a hang); finished: "
                    + ", ".join(f"rank {r}: {'ok' if not isinstance(v, RankError) else v}"
                                for r, v in sorted(results.items())))
            try:
                rank, status, payload = q.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None
                        and (p.exitcode != 0 or r in expect_dead)]
                if dead:
                    time.sleep(0.5)  # a last report may still be in the queue
                    while not q.empty():
                        rank, status, payload = q.get()
                        results[rank] = payload if status == "ok" else RankError(rank, *payload)
                    for r in dead:
                        if r not in results and r in expect_dead:
                            results[r] = Died(r, procs[r].exitcode)
                    dead = [r for r in dead if r not in results]
                    if dead:
                        raise RuntimeError(f"ranks {dead} died (exit codes "
                                           f"{[procs[r].exitcode for r in dead]}) without reporting")
                continue
            results[rank] = payload if status == "ok" else RankError(rank, *payload)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    out = [results[r] for r in range(world)]
    if raise_errors:
        for r in out:
            if isinstance(r, RankError):
                raise AssertionError(f"{r}\n{r.tb}")
    return out

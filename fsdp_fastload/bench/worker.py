"""One rank of one run: build the models, time one method after a barrier, sample RSS, check the result.

Started by ``runner.launch`` as ``python -m fsdp_fastload.bench --_worker CONFIG_JSON`` with the usual
torch.distributed environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). CONFIG keys: ``method``,
``model`` (a spec, see ``models``), ``result`` (path prefix of the JSON it writes), ``timeout``,
``rss_interval_ms``, ``rss`` ("kernel" or "thread"), ``check``.
"""
from __future__ import annotations

import gc
import json
import os
import threading
import time
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any

from .methods import METHODS, Ctx
from .models import open_source

SRC = 0


class RssSampler:
    """Peak RSS of this process over a timed call.

    Where Linux lets a process reset its own high-water mark (writing 5 to /proc/self/clear_refs,
    Linux >= 4.0), the peak is the kernel's `VmHWM` afterwards: exact, where a sampler sees only the
    peaks that last past its period, and nothing runs beside the timed call. Otherwise (or
    `kernel=False`) a background thread reads /proc/self/statm every ``interval`` s, a lower bound.
    (Timed alternately in one process, 8 deep loads each way, 2 ranks: the 1 ms thread did not
    slow materialize measurably, 106 vs 111 ms from the checkpoint, 154 vs 156 ms onto FSDP2.)"""

    def __init__(self, interval: float, kernel: bool = True):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.fd = os.open("/proc/self/statm", os.O_RDONLY)
        self.peak = 0
        self.samples = 0
        self.how, self.kernel = "sampled", kernel
        self._stop = threading.Event()
        self._thread = None

    def rss(self) -> int:
        return int(os.pread(self.fd, 128, 0).split()[1]) * self.page

    @staticmethod
    def _hwm() -> int | None:
        """The kernel's peak RSS of this process (VmHWM), bytes; None where it cannot be read."""
        try:
            with open("/proc/self/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return None

    def _reset_hwm(self) -> bool:
        """Set the kernel's high-water mark to the current RSS; whether Linux did."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        hwm = self._hwm()
        return hwm is not None and hwm <= self.peak + 16 * self.page

    def start(self):
        self.peak = self.rss()
        if self.kernel and self._reset_hwm():
            self.how = "kernel"
            return
        if self.interval > 0:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            r = self.rss()
            self.samples += 1
            self.peak = max(self.peak, r)
            time.sleep(self.interval)

    def stop(self) -> int:
        """The peak; ends the measurement (the thread, and the statm descriptor: one sampler per call)."""
        if self.how == "kernel":
            self.peak = max(self.peak, self._hwm() or 0)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.rss())
        os.close(self.fd)
        return self.peak


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _unique_nbytes(model) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def run_rank(cfg: dict) -> None:
    """Everything one rank does for one run; writes ``<result>.rank<r>.json``."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    m = METHODS[cfg["method"]]
    source = open_source(cfg["model"])
    out: dict[str, Any] = {"rank": rank, "method": m.name}
    torch.set_num_threads(1)

    src_model = None
    if rank == SRC and m.setup in ("plain", "fsdp2"):
        t0 = time.perf_counter()
        src_model = source.real()
        out["src_load_s"] = time.perf_counter() - t0

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=cfg["timeout"]))
    model = src_model if (m.setup == "plain" and rank == SRC) else source.meta()
    nbytes = _unique_nbytes(model)
    if m.setup == "fsdp2":
        _shard(model, source.layers(model), world)
    ctx = Ctx(rank=rank, world_size=world, src=SRC, group=dist.distributed_c10d._get_default_group(),
              ckpt_dir=source.ckpt_dir, ckpt_file=source.ckpt_file, nbytes=nbytes, src_model=src_model,
              full_sd=src_model.state_dict() if (src_model is not None and m.setup == "fsdp2") else None)
    if m.prepare is not None:
        m.prepare(model, rank, ctx)

    model, timing = _timed(m, model, rank, ctx, cfg["rss_interval_ms"] / 1000.0,
                           kernel_rss=cfg.get("rss", "kernel") == "kernel")
    out.update(timing, nbytes=nbytes)
    if m.check and cfg["check"]:
        out.update(_check(model, rank, source, src_model))
    dist.barrier()
    dist.destroy_process_group()
    Path(cfg["result"] + f".rank{rank}.json").write_text(json.dumps(out))


def _shard(model, layers, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _timed(m, model, rank: int, ctx: Ctx, rss_interval: float, kernel_rss: bool = True):
    """Run ``m.fn`` after a barrier; its time (max over ranks), this rank's CPU time in it (every
    thread, kernel time included) and this rank's peak RSS growth."""
    import torch
    import torch.distributed as dist

    gc.collect()
    sampler = RssSampler(rss_interval, kernel_rss)
    rss0, maxrss0 = sampler.rss(), _maxrss_bytes()
    sampler.start()
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    ret = m.fn(model, rank, ctx)
    t1, c1 = time.perf_counter(), time.process_time()
    peak, maxrss1 = sampler.stop(), _maxrss_bytes()
    el = torch.tensor([t1 - t0], dtype=torch.float64)
    dist.all_reduce(el, op=dist.ReduceOp.MAX)
    return (model if ret is None else ret), dict(
        local_s=t1 - t0, elapsed_s=float(el.item()), cpu_s=c1 - c0, rss_sampled_growth=peak - rss0,
        rss_maxrss_growth=max(0, maxrss1 - maxrss0), rss_growth=max(peak - rss0, maxrss1 - maxrss0, 0),
        rss_samples=sampler.samples, rss_before=rss0, rss_how=sampler.how)


def _crc(t) -> int:
    import torch

    return zlib.crc32(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _non_persistent_buffers(model):
    for mname, mod in model.named_modules():
        for b in sorted(mod._non_persistent_buffers_set):
            t = mod._buffers.get(b)
            if t is not None:
                yield (f"{mname}.{b}" if mname else b), t


def _check(model, rank: int, source, src_model) -> dict:
    """Compare every rank's state_dict (full tensors) and non-persistent buffers with rank src's real
    model, bitwise. Collective; runs after the timed phase."""
    import torch.distributed as dist

    ref = None
    if rank == SRC:
        refm = src_model if src_model is not None else source.real()
        ref = {"sd": {k: _crc(v) for k, v in refm.state_dict().items()},
               "np": {k: v.detach().cpu().clone() for k, v in _non_persistent_buffers(refm)}}
    lst = [ref]
    dist.broadcast_object_list(lst, src=SRC)
    ref = lst[0]
    return dict(params=_check_params(model, ref["sd"]), **_check_buffers(model, ref["np"]))


def _check_params(model, ref_sd: dict) -> str:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    sd = model.state_dict()
    keys = sorted(sd)

    def is_meta(t):
        return (t.to_local() if isinstance(t, DTensor) else t).is_meta

    allflags = [None] * dist.get_world_size()
    dist.all_gather_object(allflags, [is_meta(sd[k]) for k in keys])
    # the same key list on all ranks is a precondition of every method; guard anyway
    n_meta, n_bad, n_missing, first_bad = 0, 0, 0, None
    for i, k in enumerate(keys):
        t = sd[k]
        if any(f[i] for f in allflags if len(f) == len(keys)):
            n_meta += int(is_meta(t))
            continue
        if isinstance(t, DTensor):
            t = t.full_tensor()  # collective, same order on every rank
        if k not in ref_sd:
            n_missing += 1
        elif _crc(t) != ref_sd[k]:
            n_bad += 1
            first_bad = first_bad or k
    n_missing += len(set(ref_sd) - set(keys))
    if n_meta:
        return f"{n_meta} on meta"
    if n_bad or n_missing:
        return f"MISMATCH ({n_bad} differ, first {first_bad}; {n_missing} missing)"
    return "ok"


def _check_buffers(model, ref_np: dict) -> dict:
    import torch
    from torch.distributed.tensor import DTensor

    mine = dict(_non_persistent_buffers(model))
    states = []
    for k, rt in ref_np.items():
        t = mine.get(k)
        if t is None:
            states.append("missing")
            continue
        if isinstance(t, DTensor):
            t = t.to_local()
        if t.is_meta:
            states.append("meta")
        elif t.shape == rt.shape and t.dtype == rt.dtype and torch.equal(t.cpu(), rt):
            states.append("correct")
        else:
            states.append("garbage")
    return {"buffers": "/".join(sorted(set(states))) if states else "-",
            "buffer_detail": dict(zip(ref_np, states))}

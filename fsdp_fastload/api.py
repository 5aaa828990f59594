"""`materialize`: rank src's values onto every rank (manifest -> layout -> alloc -> fill -> install)."""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

from . import ops, shard
from .agree import MaterializeError, _peer_errors, agree
from .buffers import POISON, recompute
from .comm import Broadcasts, _sentence, first_line, pack_all
from .fill import Meanwhile, broadcast_fill, make_packer, read_file_tensor
from .install import commit as commit_install
from .install import own_buffers
from .install import prepare as prepare_install
from .layout import Layout, device_align, memory_facts, plan
from .manifest import Entry, aliased, build_manifest, fingerprint, summary
from .source import (CheckpointError, FileTensor, MatchError, extra_state_key, file_backed, hf_renamed, match,
                     open_source)
from .verify import verify as _verify

logger = logging.getLogger("fsdp_fastload")

_TUNING = {
    "bucket_size": None,  # bytes per packed broadcast; None: total/32 clamped to [4, 16] MiB
    "direct_min": None,  # tensors this big get broadcasts of their own (sent in place); None: bucket/2
    "max_inflight": 4,  # broadcasts in flight before waiting on the oldest
    "poison": False,  # fill fresh storage with 0xFF first (NaN in floats): proves every byte is written
    "progress": None,  # None: a progress line on src for loads > 1 GiB on a terminal; False: never
    "strict": False,  # state_dict: unexpected checkpoint keys are an error (else a warning on src)
    "buffer_init": None,  # callable(module) that sets a module's non-persistent buffers
    "read_threads": None,  # threads reading safetensors byte ranges on src; None: min(4, usable cores)
    "prefault": True,  # CPU targets: fault the flat buffer's pages in on a background thread, early
    "timeout": None,  # seconds one wait on a broadcast may block; None: max(60, bytes sent / 50 MB/s)
    # src reads its tensors mapped from files (from_pretrained's) from the files; None: onto a device
    "read_mapped": None,
}
# Below this a thread is not worth starting. Above it, faulting in on a thread pays: fresh memory
# costs ~0.4 s/GB to touch on a 2-core VM, and receivers wait for src's plan anyway (measured on the
# 58 MB / 1,443-tensor model: receivers' fill 47 -> 26 ms with the buffer faulted in ahead).
PREFAULT_MIN = 1 << 20
# Bytes an automatically sized FSDP2 scatter moves at least, all ranks' pieces together (src stages
# two of them). On 2 cores, the deep model (58 MB; its bucket 4 MiB) onto FSDP2 from the checkpoint,
# interleaved rounds of 14 loads: the fill's median 53.0 -> 46.8 ms over 8 rounds (shorter in 5), and
# 52.5 -> 48.3 ms over 6 with 8 MiB buckets passed (shorter in all 6).
SCATTER_MIN = 8 << 20
# Objects made per piece of the work done while bytes arrive (~2-7 us each: ~1 ms or less a piece).
_PIECE = 192
_SUPPORTED_CLASSES = ("Parameter", "Tensor", "DTensor")

last_stats: dict = {}  # timings of the most recent call on this rank (for the CLI and benchmarks)


def materialize(module: nn.Module, device: torch.device | str | None = None, *, src: int = 0,
                group: dist.ProcessGroup | None = None, state_dict=None, verify: bool = False,
                **tuning) -> nn.Module:
    """Give every rank rank `src`'s parameters and buffers, on `device`, in one collective call.

    1. Values: on rank ``src`` from ``state_dict`` if given (a mapping name -> tensor, a
       ``.safetensors`` file, or a directory with ``model.safetensors`` or sharded files and their
       index), else from ``module`` itself (real tensors, mmap-backed is fine). Every other rank
       passes ``state_dict=None`` and a ``module`` of the same architecture, usually on ``meta``.
    2. Afterwards, on every rank: every parameter and buffer is on ``device`` and bit-identical to
       what single-process loading gives; ties are one object under every name (a checkpoint with
       different values under two tied names is an error: ``from_pretrained`` would untie them); ``nn.Parameter``
       kept, ``requires_grad`` as on src; the module's dtypes win over the checkpoint's; each tensor
       keeps its skeleton's layout (strides); modules' extra state (``get_extra_state``) comes from src.
    3. Non-persistent buffers come from src when its model or mapping has them (a checkpoint file's
       values for them are ignored, as ``from_pretrained`` ignores them); otherwise every rank recomputes them
       locally (transformers ``_init_weights``, the module's ``reset_parameters``/``init_weights``,
       or ``buffer_init``) without touching anything loaded. A buffer nobody wrote is an error.
    4. Ranks whose models differ, or any rank with a bad argument, raise ``MaterializeError`` on
       every rank before any data moves; a failed call leaves the module as it was.
    5. Once data moves: a peer that dies or stalls makes every surviving rank raise
       ``MaterializeError`` (naming the bucket and bytes) within ``timeout`` seconds per wait on a
       broadcast; a checkpoint that src cannot read after all (truncated after its header was
       checked) is raised on every rank after the last bucket. Nothing is installed in either case.

    Args:
        module: the model (modified in place and returned).
        device: target device; ``None`` means ``cuda:<LOCAL_RANK>`` under NCCL, else ``cpu``.
        src: global rank holding the values.
        group: process group (default: the world). Without an initialised process group the call
            works locally (``src`` must be 0).
        state_dict: the source on rank ``src`` (see 1); ``None`` on the other ranks.
        verify: all-gather per-tensor checksums afterwards and raise naming any tensor that differs.
        **tuning: ``bucket_size`` (bytes; auto 4-16 MiB), ``direct_min`` (half a bucket), ``max_inflight`` (4), ``poison`` (False),
            ``progress`` (None: auto), ``strict`` (False), ``buffer_init`` (None),
            ``read_threads`` (None: 4, or fewer where this process may use fewer cores),
            ``read_mapped`` (None: when ``device`` is not the CPU; True: src
            reads its tensors that are mapped from files, as ``from_pretrained`` leaves them, from
            the files with ``pread`` instead of through the mapping, where no page of them was
            written since; see README),
            ``timeout`` (seconds any one wait on a bucket broadcast may block;
            None: ``max(60, bytes sent / 50 MB/s)``, so only a dead or stuck peer trips it. The
            agreement before any data moves waits as long as the process group's timeout, since
            src may still be loading the model).

    Example::

        >>> import torch, torch.distributed as dist
        >>> from fsdp_fastload import materialize
        >>> rank = dist.get_rank() if dist.is_initialized() else 0
        >>> if rank == 0:
        ...     model = torch.nn.Linear(4, 2)            # or from_pretrained(...)
        ... else:
        ...     with torch.device("meta"):
        ...         model = torch.nn.Linear(4, 2)
        >>> model = materialize(model, "cpu")
        >>> model.weight.device
        device(type='cpu')
    """
    opts = {**_TUNING, **tuning}
    if opts["read_threads"] is None:
        opts["read_threads"] = _default_read_threads()
    with _gc_paused(), _host_default_device():
        return _materialize(module, device, src=src, group=group, state_dict=state_dict, verify=verify,
                            opts=opts, bad_options=_bad_options(tuning))


def _default_read_threads() -> int:
    """src's reader threads: 4, or as many as the cores this process may run on if fewer. A reader
    more than the cores only takes one from the transfer and from src's own work (2 cores, the
    deep model onto FSDP2 from the checkpoint, 8 interleaved rounds of 14 loads: medians 90 ms with
    2 threads, 94.5 ms with 4, 2 faster in 7 rounds of 8; the 492 MB model from the checkpoint
    without FSDP2, 7 rounds of 6 loads: 363 vs 349 ms, 2 faster in 3 of 7, within this VM's noise).
    Hosts with 4 cores or more keep 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 4
    return max(1, min(4, cores))


def _bad_options(tuning: dict) -> str | None:
    """What is wrong with the tuning options (unknown, or of the wrong type), for the agreement: one
    rank's typo must not leave the others waiting in a collective it never reaches."""
    unknown = set(tuning) - set(_TUNING)
    if unknown:
        return f"unknown tuning option(s) {sorted(unknown)}; known: {sorted(_TUNING)}"

    def number(v, low):
        return not isinstance(v, bool) and isinstance(v, (int, float)) and v >= low

    def count(v, low):
        return not isinstance(v, bool) and isinstance(v, int) and v >= low

    checks = {"bucket_size": lambda v: v is None or number(v, 1),
              "direct_min": lambda v: v is None or number(v, 0),
              "max_inflight": lambda v: count(v, 1), "read_threads": lambda v: v is None or count(v, 0),
              "buffer_init": lambda v: v is None or callable(v),
              "read_mapped": lambda v: v is None or isinstance(v, bool)}
    what = {"bucket_size": "None or a positive number of bytes", "direct_min": "None or a number of bytes >= 0",
            "max_inflight": "an int >= 1", "read_threads": "None or an int >= 0", "buffer_init": "None or a callable",
            "read_mapped": "None, True or False"}
    bad = [k for k, ok in checks.items() if k in tuning and not ok(tuning[k])]
    if bad:
        return "; ".join(f"{k}={tuning[k]!r} must be {what[k]}" for k in bad)
    return None


@contextlib.contextmanager
def _gc_paused():
    """A collection of a big process's object graph (transformers and torch make it large), set off
    by the many small objects made here, costs 0.1-0.2 s and frees nothing of ours: defer it until
    the call returns (measured: resuming the collector mid-call made a 1,443-tensor load 4x slower)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _host_default_device():
    """The CPU as the default device for the call when the caller's is another: a call made inside
    the `with torch.device("meta"):` block that built the skeleton, or after
    `torch.set_default_device(...)`, would otherwise make this library's own host tensors (the
    agreement's, the reads', recomputed buffers' scratch) on `meta` or a GPU. Nothing is entered in
    the common case: a device mode costs ~1 us on every torch call."""
    get = getattr(torch, "get_default_device", None)  # (torch >= 2.3)
    if get is None or get().type == "cpu":
        yield
        return
    with torch.device("cpu"):
        yield


def _materialize(module, device, *, src, group, state_dict, verify, opts, bad_options=None) -> nn.Module:
    t_start = time.perf_counter()

    distributed = dist.is_available() and dist.is_initialized()
    if not distributed:
        if group is not None:
            raise MaterializeError("fsdp_fastload.materialize: a group was given but torch.distributed "
                                   "is not initialised. Call dist.init_process_group first.")
        if src != 0:
            raise MaterializeError(f"fsdp_fastload.materialize: src={src} without an initialised process "
                                   "group; a single process is rank 0. Pass src=0.")
        rank, is_src, backend, ranks = 0, True, "", [0]
    else:
        rank = dist.get_rank()
        ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
        if src not in ranks:
            raise MaterializeError(
                f"fsdp_fastload.materialize (rank {rank}): src={src} is not in the process group "
                f"(its global ranks are {ranks[:8]}{'...' if len(ranks) > 8 else ''}). "
                "Pass the global rank of a group member as src.")
        if rank not in ranks:
            raise MaterializeError(f"fsdp_fastload.materialize (rank {rank}): this rank is not in the "
                                   "given group; call materialize only on the group's members.")
        is_src, backend = rank == src, str(dist.get_backend(group))

    # 1. manifest, local checks, the src's plan; then agreement across ranks before any data moves.
    error: str | None = bad_options
    try:
        device = _resolve_device(device, backend)
    except ValueError as e:
        error, device = error or str(e), torch.device("cpu")
    except RuntimeError as e:  # torch.device() of a name or index this host does not have
        error, device = error or (f"device={device!r} is not usable on this rank ({first_line(e)}). Pass 'cpu' "
                                  "or 'cuda:<local rank>'."), torch.device("cpu")
    comm_device = torch.device("cpu") if "gloo" in backend or not backend else device
    if error is None and distributed and device.type == "cpu" and "gloo" not in backend:
        error = (f"backend '{backend}' cannot broadcast CPU tensors (device={device}). "
                 "Use a gloo process group for CPU targets, or pass a CUDA device.")
    extra_mods: list = []  # (path, module) of modules with extra state (get_extra_state)
    try:
        entries = build_manifest(module, extra_mods)
    except Exception as e:  # noqa: BLE001  (e.g. a lazy module's uninitialized parameter): every rank hears it
        entries, error = [], error or _unreadable_module(module, e)
    raised: list[str] = []  # warnings a warnings filter turned into exceptions, before the agreement
    with _warning_raised(raised):
        _warn_kept_in_fp32(module, entries, rank)
        if is_src:
            _warn_aliased(entries, rank)
    if error is None:
        error = _check_local(entries, is_src=is_src, state_dict=state_dict)
    timeout = opts["timeout"]
    if error is None and timeout is not None and (isinstance(timeout, bool) or not isinstance(
            timeout, (int, float)) or not 0 < timeout < float("inf")):
        error = (f"timeout must be a positive, finite number of seconds (got {timeout!r}). "
                 "Pass timeout=None for the default.")
    # DTensor (FSDP2) entries: only local shards are allocated, filled by scatters (see shard.py).
    shd = [i for i, e in enumerate(entries) if e.cls == "DTensor"]
    rep = [i for i, e in enumerate(entries) if e.cls != "DTensor"] if shd else list(range(len(entries)))
    rep_entries, shd_entries = [entries[i] for i in rep], [entries[i] for i in shd]
    geos: list = []
    if shd and error is None:
        cache: dict = {}
        geos = [shard.geometry(entries[i], ranks, cache) for i in shd]
        error = next((g for g in geos if isinstance(g, str)), None)
    slots = shard.slot_entries(shd_entries, geos) if shd and error is None else []
    src_plan = None
    extra_values: dict | None = None  # src: module path -> extra state to give every rank
    if error is None and is_src and state_dict is not None:
        try:
            source = open_source(state_dict)
            extra_values = _extra_from_checkpoint(source, extra_mods)
            unsaved = _unsaved(module)
            src_plan, error = match(entries, source, strict=opts["strict"], unsaved=unsaved)
            if error is not None:  # keys transformers renames on load (embed_out -> lm_head, ...)?
                renamed = hf_renamed(module, source, {n: e.dtype for e in entries for n in e.names})
                if renamed is not None and renamed.keys() != source.keys():
                    # what transformers would see: its error too (e.g. the one fused parameter an
                    # incomplete layer of experts cannot make, not every renamed key)
                    src_plan, error = match(entries, renamed, strict=opts["strict"], unsaved=unsaved)
        except CheckpointError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001  (a mapping that fails to give its values, ...): every rank hears it
            error = f"reading state_dict failed: {_sentence(e)}"
        own: list = []
        with _warning_raised(raised):  # (hints for the error text: never a reason for src to raise alone)
            own = _own_load_logic(module) if isinstance(error, MatchError) else []
            if error is not None and getattr(error, "missing", None):
                error += _missing_hints(module, error.missing, sharded=bool(shd))
        if own:  # keys or shapes the module's own load logic would have adapted (an observer resizing
            # its running min/max, a renaming pre-hook): which modules have some, and the way around
            error += (f"{'' if error.endswith('.') else '.'} {len(own)} module(s) have their own "
                      f"load_state_dict logic, which materialize does not run, e.g. {own[:3]}: if it adapts "
                      "these keys or shapes (a quantization observer resizes its statistics to the checkpoint's, "
                      "a pre-hook renames keys), give the skeleton the checkpoint's names and shapes on every "
                      "rank before materialize.")
        with _warning_raised(raised):
            if src_plan is not None:
                _warn_own_load_logic(module)
            if src_plan is not None and src_plan.unexpected:
                warnings.warn(f"fsdp_fastload.materialize: {len(src_plan.unexpected)} checkpoint key(s) not "
                              f"in the model's state_dict() were ignored: {src_plan.unexpected[:10]}",
                              stacklevel=3)  # (the caller of materialize)
    if error is None and raised:
        error = raised[0]
    if error is None and is_src and extra_mods and state_dict is None:
        try:  # src's own modules' extra state, for the receivers
            extra_values = {path: m.get_extra_state() for path, m in extra_mods}
        except Exception as e:  # noqa: BLE001  every rank hears it before any data moves
            error = f"get_extra_state() of a module failed on src: {_sentence(e)}"
    layout = shd_layout = None
    sources = wire_all = facts = shd_facts = rep_sources = None
    mapped_bytes = 0  # src: bytes read from the files its tensors are mapped from (read_mapped)
    if error is None and is_src:
        try:
            sources, rep_sources, wire_all, facts, shd_facts, layout, shd_layout, mapped_bytes = _plan_src(
                entries, rep, rep_entries, shd, slots, src_plan, opts, world=len(ranks),
                align=device_align(device), device=device)
        except Exception as e:  # noqa: BLE001  src cannot plan: every rank hears why before any data moves
            error = f"planning the transfer failed: {_sentence(e)}"
    fp = fingerprint(entries, (src, bool(verify), [path for path, _ in extra_mods])) if distributed else 0
    # CPU targets: the flat buffer is allocated now (a rank that cannot have it says so in the
    # agreement) and its pages faulted in on a background thread while this rank waits for src's
    # plan, then ahead of the transfer (receivers size it from their own manifest; a layout that
    # turns out larger gets a buffer of its own).
    # src keeps its own tensors when they already live on `device`: it sends from them (no copy).
    kept = is_src and error is None and src_plan is None and not shd and _all_kept_in_place(entries, device, facts)
    early = prefaulting = None
    if error is None and device.type == "cpu" and not kept and (layout is not None or not is_src):
        nbytes = (sum(lay.main_total for lay in (layout, shd_layout) if lay is not None) if is_src
                  else _main_estimate(entries, rep, shd, geos, device_align(device)))
        try:
            early = ops.alloc(nbytes, device)
        except RuntimeError as e:  # out of memory: every rank hears of it before any data moves
            error = _no_memory(nbytes, device, e, "tensors")
        else:
            if opts["prefault"] and not opts["poison"] and nbytes >= PREFAULT_MIN:
                prefaulting = ops.Prefault(early)
    if distributed:
        encoded = _encode(layout, shd_layout, entries)
        n = agree(group=group, src=src, rank=rank, comm_device=comm_device,
                  fp=fp, summary=lambda: summary(entries), error=error,
                  extra=len(encoded))
        # src's layout reaches every rank in one small broadcast: receivers never guess it.
        shipped = torch.tensor(encoded, dtype=torch.int64) if is_src else torch.empty(n, dtype=torch.int64)
        shipped = shipped.to(comm_device)
        dist.broadcast(shipped, src=src, group=group)
        if not is_src:
            layout, shd_layout = _decode(shipped.tolist(), entries)
    elif error:
        raise MaterializeError(f"fsdp_fastload.materialize: {error}")
    t_agree = time.perf_counter()
    fill = dict(src=src, group=group, device=device, max_inflight=opts["max_inflight"],
                progress=opts["progress"], timeout=timeout)
    settle = dict(distributed=distributed, group=group, src=src, rank=rank, comm_device=comm_device)

    # 2-3. layout, one allocation (plus a wire buffer for dtype-converted tensors), all views.
    if kept:
        t_alloc = time.perf_counter()
        if distributed:
            failed = None
            try:
                packer = make_packer(sources, layout, read_threads=opts["read_threads"],
                                     names=[e.names[0] for e in entries], facts=facts,
                                     numels=[e.numel for e in entries])
            except Exception as e:  # noqa: BLE001  sent unpacked (from scratch); every rank raises it after
                packer, failed = _Unpacked(), _preparing_failed(e)
            problem = broadcast_fill(None, layout, is_src=True, packer=packer, **fill)
            _settle(failed or problem, **settle)
            _share_extra_state(extra_mods, extra_values, **settle)  # src keeps its own
        t_fill = time.perf_counter()
        if verify and distributed:
            _verify(entries, [e.tensor for e in entries], group=group, src=src, rank=rank,
                    comm_device=comm_device)
        _log(rank=rank, is_src=is_src, entries=entries, layouts=[layout], device=device,
             phases={"agree": t_agree - t_start, "alloc": 0.0, "fill": t_fill - t_alloc,
                     "install": time.perf_counter() - t_fill})
        return module
    parts = [(layout, rep_entries)]
    if shd:
        parts.append((shd_layout, slots))
    main_sizes = [lay.main_total for lay, _ in parts]
    wire_sizes = [lay.wire_total - lay.direct for lay, _ in parts]
    if early is not None and early.numel() < sum(main_sizes):
        early = None  # too small after all: let it go before the buffer that replaces it is made
    # From here on a rank that fails (no memory for a buffer, src unable to prepare its reads) still
    # takes part in every transfer, into a scratch buffer, and says why in the agreement after the
    # fill (`Degraded`): its peers never wait in a collective for a rank that gave up.
    degraded = Degraded(parts, distributed, device)
    main = wirebuf = None
    try:
        main = early[:sum(main_sizes)] if early is not None else ops.alloc(sum(main_sizes), device)
        wirebuf = ops.alloc(sum(wire_sizes), device)
    except RuntimeError as e:  # out of memory
        nbytes = sum(main_sizes) if main is None else sum(wire_sizes)
        degraded.fail(_no_memory(nbytes, device, e, "tensors" if main is None else
                                 "tensors sent in a smaller dtype (converted after the transfer)"))
    bufs, targets = [], []
    if degraded.problem is None:
        if opts["poison"]:
            ops.poison_(main)
            ops.poison_(wirebuf)
        main_off = wire_off = 0
        for (lay, _), msize, wsize in zip(parts, main_sizes, wire_sizes):
            m, w = main[main_off:main_off + msize], wirebuf[wire_off:wire_off + wsize]
            main_off, wire_off = main_off + msize, wire_off + wsize
            bufs.append((m, w))
            targets.append(_target(m, w, lay.direct))
    part_views, conversions, prepared, shd_local = [], [], [], []
    me = ranks.index(rank)

    def carve_pieces():
        """All views (and the parameters to install) in a few C++ calls, then the objects to install
        a few hundred at a time (pieces of ~1 ms, between yields): needs no values, so it runs while
        the bytes arrive, in the time this rank would otherwise wait (see `fill.Meanwhile`)."""
        for (lay, ents), (m, w) in zip(parts, bufs):
            strides = None
            if lay is layout and strided:  # channels_last, transposed: carved in their skeleton's order
                strides = [e.carve_strides() for e in ents]
            # each its own storage over the buffer: torch.save, pickle, deepcopy and resize_ then see
            # one tensor's bytes (a storage shared by all of them breaks each, differently); an empty
            # one holds no memory, so one grown later (an observer's running min/max) moves out
            views = ops.carve_owned(m, ops.encode_spec([e.dtype for e in ents], lay.final,
                                                       [e.shape for e in ents], strides))
            # converted after the transfer: sent in a smaller dtype, or contiguous for a strided tensor
            conv = [i for i, e in enumerate(ents)
                    if lay.wire_dtype[i] is not None and (lay.wire_dtype[i] != e.dtype or e.strides is not None)]
            wire_views = ops.carve(w, ops.encode_spec([lay.wire_dtype[i] for i in conv],
                                                      [lay.wire[i] - lay.direct for i in conv],
                                                      [ents[i].shape for i in conv]))
            part_views.append(views)
            conversions.append([(views[i], wv) for i, wv in zip(conv, wire_views)])
        if shd:  # this rank's shard of each sharded entry, at the start of its slot (its storage,
            # offset 0, as FSDP2's own padded shard: a DTensor over an offset view does not pickle);
            # one as_strided each (a slice and a view cost ~3x as much: ~4 ms at 1,443 shards)
            strides: dict = {}  # per geometry (the layers repeat a handful)
            for slot, g in zip(part_views[1], geos):
                st = strides.get(id(g))
                if st is None:
                    st = strides[id(g)] = ops.contiguous_strides(g.boxes[me][0])
                shd_local.append(slot.as_strided(g.boxes[me][0], st))
        yield
        for a in range(0, len(rep_entries), _PIECE):
            prepared.extend(prepare_install(rep_entries[a:a + _PIECE], part_views[0][a:a + _PIECE]))
            yield
        if local or shd_missing:  # reads no value: recomputed while the bytes arrive, agreed on afterwards
            recomputed.append(_recompute(module, entries, rep, part_views[0], local, opts["buffer_init"],
                                         {shd[k]: (shd_local[k], geos[k].boxes[me]) for k in shd_missing},
                                         device))
            yield
        if shd:
            yield from shard.prepare_shards(module, shd_entries, part_views[1], shd_local, shd_prepared,
                                            piece=_PIECE)

    local = [i for i in range(len(rep_entries)) if layout.wire_dtype[i] is None]
    strided = any(e.strides is not None for e in rep_entries)
    # sharded tensors src does not send (a parameter transformers never saves): recomputed whole,
    # each rank keeping its box
    shd_missing = [k for k in range(len(shd_entries)) if shd_layout.wire_dtype[k] is None] if shd else []
    shd_prepared: list = []
    recomputed: list = []  # the error (or None) of recomputing the local buffers
    t_alloc = time.perf_counter()

    # 4. fill: bucket by bucket, src packing/reading the next while the current one is in flight.
    packer = packers = None
    if is_src and degraded.problem is None:
        try:
            if layout.buckets:
                packer = make_packer(rep_sources, layout, read_threads=opts["read_threads"], facts=facts,
                                     names=[e.names[0] for e in rep_entries], numels=[e.numel for e in rep_entries])
            if shd:
                packers = shard.rank_packers([sources[i] for i in shd], shd_entries, geos, shd_layout,
                                             facts=shd_facts, read_threads=opts["read_threads"])
        except Exception as e:  # noqa: BLE001  (src's own failure: every rank raises it after the fill)
            degraded.fail(_preparing_failed(e))
    if degraded.problem is not None:
        targets = degraded.targets(main)
        if is_src:  # src sends every bucket as it is (unpacked)
            packer = _Unpacked()
            packers = [packer] * len(ranks) if shd else None
    problems: list = [degraded.problem]  # this rank's own: a failure here, src's read/pack failure,
    # a failure while the bytes arrived
    if distributed and layout.buckets:
        # With shards the views are made during the scatters instead (the time waited here is short).
        problems.append(broadcast_fill(targets[0], layout, is_src=is_src, packer=packer,
                                       meanwhile=None if shd or degraded.problem else carve_pieces, **fill))
    else:  # one process, or nothing replicated to send (every rank has the same layout: no collective)
        if packer is not None:
            pack_all(targets[0], layout, packer)
        if not shd and degraded.problem is None:
            later = Meanwhile(carve_pieces)
            later.finish()
            problems.append(later.problem())
    if shd:
        sends = Broadcasts(shd_layout, src=src, group=group, op="scatter", max_inflight=opts["max_inflight"],
                           timeout=timeout, poll=device.type == "cuda")
        problems.append(shard.scatter_fill(
            targets[1], shd_layout, is_src=is_src, packers=packers, src=src, group=group, device=device,
            sends=sends, progress=opts["progress"], meanwhile=None if degraded.problem else carve_pieces))
    if local or shd_missing:  # non-persistent buffers nobody sent, recomputed during the fill
        problems.append(recomputed[0] if recomputed else None)
    # 5. one agreement after every fill: all ranks raise together, or all go on to install.
    _settle(next((p for p in problems if p), None), **settle)
    extra_values = _share_extra_state(extra_mods, extra_values, **settle)
    views = part_views[0]
    for pairs in conversions:
        for v, w in pairs:
            v.copy_(w)  # "send bf16, upcast after": the module's dtype wins
    del conversions, wirebuf
    if prefaulting is not None:
        prefaulting.join()
    if shd:
        shard.zero_padding(part_views[1], shd_entries, geos, me)
    t_fill = time.perf_counter()

    # 6. verify, install.
    if verify and distributed:
        _verify(rep_entries, views, group=group, src=src, rank=rank, comm_device=comm_device)
        if shd:
            per_rank = [shard.local_sources(sources[i], entries[i], g, read_threads=opts["read_threads"])
                        if sources[i] is not None else None for i, g in zip(shd, geos)] if is_src else None
            shard.verify_shards(shd_entries, part_views[1], geos, per_rank, group=group, src=src,
                                rank=rank, comm_device=comm_device)
    own_buffers(rep_entries, prepared, device)
    commit_install(rep_entries, prepared)
    if shd:
        shard.install_shards(shd_entries, part_views[1], shd_prepared)
    if extra_values and not (is_src and state_dict is None):  # src of a module keeps its own
        _set_extra_state(extra_mods, extra_values, rank)
    t_end = time.perf_counter()

    _log(rank=rank, is_src=is_src, entries=entries, layouts=[lay for lay, _ in parts], device=device,
         phases={"agree": t_agree - t_start, "alloc": t_alloc - t_agree, "fill": t_fill - t_alloc,
                 "install": t_end - t_fill}, mapped_bytes=mapped_bytes)
    return module


def _extra_from_checkpoint(source: dict, extra_mods: list) -> dict | None:
    """The `<path>._extra_state` values of the modules with extra state, taken out of `source` (so
    they are not unexpected tensors); a safetensors entry is read whole. Warns about those missing."""
    if not extra_mods:
        return None
    out, missing = {}, []
    for path, _ in extra_mods:
        v = source.pop(extra_state_key(path), None)
        if v is None:
            missing.append(path or "<root>")
        else:
            out[path] = read_file_tensor(v) if isinstance(v, FileTensor) else v
    if missing:
        warnings.warn(f"fsdp_fastload.materialize: the checkpoint has no extra state (`_extra_state`) for "
                      f"{len(missing)} module(s) that keep one, e.g. {missing[:5]}: they keep their own "
                      "(set_extra_state is not called).", stacklevel=4)
    return out


def _share_extra_state(extra_mods: list, values: dict | None, *, distributed: bool, group, src: int, rank: int,
                       comm_device) -> dict | None:
    """src's extra state for every rank (one object broadcast after the fill's agreement, when the
    modules have any: the fingerprint made sure every rank has the same such modules)."""
    if not extra_mods or not distributed:
        return values
    box = [values]
    with _peer_errors(rank):
        dist.broadcast_object_list(box, src=src, group=group,
                                   device=comm_device if comm_device.type == "cuda" else None)
    return box[0]


def _set_extra_state(extra_mods: list, values: dict, rank: int) -> None:
    for path, m in extra_mods:
        if path in values:
            try:
                m.set_extra_state(values[path])
            except Exception as e:
                raise MaterializeError(
                    f"fsdp_fastload.materialize (rank {rank}): set_extra_state of '{path or '<root>'}' "
                    f"({type(m).__name__}) failed: {_sentence(e)} Its tensors are installed; its extra "
                    "state is not.") from e


def _plan_src(entries: list[Entry], rep: list[int], rep_entries: list[Entry], shd: list[int],
              slots: list[Entry], src_plan, opts: dict, *, world: int, align: int,
              device: torch.device) -> tuple:
    """src's (sources, those of the replicated entries, wire dtypes, memory facts of the replicated
    sources and of the sharded ones, layout, shards' layout, bytes to read from the files its tensors
    are mapped from)."""
    sources = src_plan.sources if src_plan is not None else [e.tensor for e in entries]
    wire_all = src_plan.wire if src_plan is not None else [e.dtype for e in entries]
    bucket = opts["bucket_size"] or _auto_bucket(sum(e.nbytes for e in entries))
    direct_min = opts["direct_min"] or bucket // 2
    rep_args = dict(bucket_size=bucket, direct_min=direct_min, wire=[wire_all[i] for i in rep], align=align)
    rep_sources = [sources[i] for i in rep]
    facts = memory_facts(rep_sources)
    shd_facts = memory_facts([sources[i] for i in shd]) if shd else []
    read_mapped, mapped_bytes = opts["read_mapped"], 0
    if read_mapped or (read_mapped is None and device.type != "cpu"):
        # Tensors mapped from files (from_pretrained's model, or its state_dict() passed as
        # state_dict=): read from the files (see source.file_backed). By default onto devices only:
        # on one H100 src's fill ran 1.3-1.9x faster so; on a 2-core VM copying out of the mapping
        # was the faster.
        mapped = file_backed(facts + shd_facts, [e.shape for e in rep_entries] + [entries[i].shape for i in shd])
        if any(m is not None for m in mapped):
            sources = list(sources)
            for k, m in enumerate(mapped):
                if m is None:
                    continue
                mapped_bytes += m.nbytes
                if k < len(rep):
                    rep_sources[k] = sources[rep[k]] = m
                    facts[k] = None
                else:
                    sources[shd[k - len(rep)]] = m
                    shd_facts[k - len(rep)] = None
    layout = plan(rep_entries, sources=rep_sources, facts=facts, **rep_args)
    if layout.main_total > _main_estimate(entries, rep, [], [], align):
        # Runs of src's memory keep the gaps between its tensors (malloc's headers: ~40% more bytes
        # on 100k tensors of 640 B). Past the allowance receivers size their early buffer with,
        # the gaps would cost wire bytes and every receiver a second buffer: plan compact, packed.
        layout = plan(rep_entries, **rep_args)
    shd_layout = None
    if shd:  # each scatter moves `world` pieces: keep src's staging near a bucket; an automatic one
        # moves at least SCATTER_MIN in all (a scatter's fixed cost, src packing a piece per rank and
        # the collective, over more bytes)
        moved = bucket if opts["bucket_size"] else max(bucket, SCATTER_MIN)
        shd_layout = plan(slots, direct_min=direct_min, bucket_size=max(moved // world, 1 << 20),
                          wire=[wire_all[i] for i in shd], align=align)
    return sources, rep_sources, wire_all, facts, shd_facts, layout, shd_layout, mapped_bytes


def _missing_hints(module: nn.Module, missing: list[str], *, sharded: bool) -> str:
    """Why a checkpoint may lack a tensor the model has, where the model shows it: a tie the model
    lost (accelerate's init_empty_weights), PEFT's wrapping, or one FSDP2 split."""
    hints = ""
    if "transformers" in sys.modules:
        from .integrations.transformers import broken_ties

        lost = [(a, b) for a, b in broken_ties(module) if a in missing or b in missing]
        if lost:
            a, b = lost[0]
            hints += (f" '{a}' is not tied to '{b}' although the model's config ties them"
                      f"{f' (and {len(lost) - 1} more)' if len(lost) > 1 else ''}: a model built under "
                      "accelerate's init_empty_weights() loses its ties. Call model.tie_weights() on every rank "
                      "after building it.")
    if any(".base_layer." in k or ".lora_" in k for k in missing):  # PEFT's adapter layers
        hints += (" The model looks wrapped by PEFT (base_layer / lora_ names), whose adapters and renamed "
                  "paths the base checkpoint does not hold: materialize the base model first, then apply "
                  "get_peft_model on every rank (or load the wrapped model on src and call materialize "
                  "without state_dict).")
    if sharded:
        hints += (" If the model shares a parameter between modules that two fully_shard calls wrap "
                  "(tied embeddings, a block reused by several layers), FSDP2 made it two tensors and a "
                  "checkpoint holds it once: wrap the modules that share parameters in one fully_shard group.")
    return hints


class Degraded:
    """A rank that failed after the agreement (before any byte moved) but must stay in step: it
    receives (src: sends, unpacked) every bucket into one scratch buffer, installs nothing, and its
    `problem` goes into the agreement after the fill, where every rank raises it together.

    Without a process group there is nobody to keep in step: `fail` raises at once."""

    def __init__(self, parts: list, distributed: bool, device: torch.device):
        self.parts, self.distributed, self.device = parts, distributed, device
        self.problem: str | None = None

    def fail(self, problem: str) -> None:
        if not self.distributed:
            raise MaterializeError(f"fsdp_fastload.materialize: {problem}")
        self.problem = self.problem or problem

    def targets(self, main: torch.Tensor | None) -> list:
        """Each part's bucket [a, b) lands at the start of one scratch buffer: `main` (this rank's flat
        buffer, if it was allocated) if it is large enough, else a buffer of the largest bucket."""
        biggest = max((b - a for lay, _ in self.parts for a, b in lay.buckets), default=0)
        if main is None or main.numel() < biggest:
            try:
                main = ops.alloc(biggest, self.device)
            except RuntimeError as e:  # not even one bucket: this rank cannot stay in step
                raise MaterializeError(
                    f"fsdp_fastload.materialize: {self.problem} Not even a {biggest / 2**20:.0f} MiB scratch "
                    f"buffer could be allocated to stay in step with the other ranks ({e}); they will fail "
                    "on their next transfer's timeout.") from e

        def target(a: int, b: int) -> torch.Tensor:
            return main[:b - a]
        return [target] * len(self.parts)


class _Unpacked:
    """Stands in for the packer(s) of a src that failed after the agreement (see `Degraded`):
    buckets go out as they are, nothing is sent from src's tensors."""

    wrote_host = False

    def direct_view(self, a: int, b: int) -> None:
        return None

    def pack(self, a: int, b: int, dst: torch.Tensor, **_) -> None:
        return None

    def describe(self, a: int, b: int) -> str:
        return ""


def _preparing_failed(e: BaseException) -> str:
    """The agreement's text when src cannot prepare its reads/copies (builds no packer)."""
    return f"preparing to read/send the tensors failed: {_sentence(e)} Nothing was installed."


def _no_memory(nbytes: int, device: torch.device, e: BaseException, what: str) -> str:
    """The agreement's text for a buffer this rank could not allocate."""
    where = ("Free device memory on this rank (torch.cuda.empty_cache() returns the caching allocator's "
             "unused blocks), or load into CPU first" if device.type == "cuda" else
             "Free host memory on this rank, or start fewer ranks per host")
    return (f"could not allocate the {nbytes / 2**20:.0f} MiB buffer for the {what} on {device} "
            f"({first_line(e)}). {where}.")


def _settle(problem: str | None, *, distributed: bool, group, src: int, rank: int, comm_device) -> None:
    """After the fill: every rank raises together if any rank had a problem (`problem`: this rank's).
    Every rank calls this exactly once per call when distributed, whatever its path."""
    if distributed:
        agree(group=group, src=src, rank=rank, comm_device=comm_device, fp=0, summary=[], error=problem)
    elif problem:
        raise MaterializeError(f"fsdp_fastload.materialize: {problem}")


def _recompute(module: nn.Module, entries: list[Entry], rep: list[int], views: list[torch.Tensor],
               local: list[int], buffer_init, sharded: dict, device: torch.device) -> str | None:
    """Non-persistent buffers nobody sends (`local`: indices into the replicated entries `rep`),
    written by their initializers into `views`, poisoned first so that one nobody wrote is caught;
    the error text or None (see `buffers.recompute`). `sharded`: entry index -> (this rank's local
    shard view, its (shape, offset) box) of DTensors nobody sends: an initializer writes the whole
    tensor into a temporary one, of which each rank keeps its box."""
    def poison(t: torch.Tensor) -> None:  # its bytes: a dense tensor, strided or not, covers its span
        if t.numel():
            ops.poison_(t.as_strided((t.numel(),), (1,)).view(torch.uint8), POISON)

    for i in local:
        poison(views[i])
    all_views: list = [None] * len(entries)
    for k, i in enumerate(rep):
        all_views[i] = views[k]
    for i in sharded:
        e = entries[i]
        all_views[i] = full = torch.empty(e.shape, dtype=e.dtype, device=device)
        poison(full)
    error = recompute(module, entries, all_views, [rep[i] for i in local] + list(sharded), buffer_init)
    if error is None:
        for i, (mine, (shape, offset)) in sharded.items():
            mine.copy_(shard.box_of(all_views[i], shape, offset))
    return error


def _main_estimate(entries: list[Entry], rep: list[int], shd: list[int], geos: list, align: int) -> int:
    """A receiver's guess of src's flat buffer size: every tensor (a shard's slot) aligned to
    `align`, plus a little for gaps src keeps inside runs of back-to-back tensors."""
    a = align - 1
    n = sum((entries[i].nbytes + a) & ~a for i in rep)
    n += sum((g.slot_numel * entries[i].dtype.itemsize + a) & ~a for i, g in zip(shd, geos))
    return n + n // 64 + (1 << 16)


def _target(main: torch.Tensor, wirebuf: torch.Tensor, direct: int):
    """Where the bytes [a, b) of a layout's wire space land: final storage, or the wire buffer."""
    def target(a: int, b: int) -> torch.Tensor:
        return main[a:b] if b <= direct else wirebuf[a - direct:b - direct]
    return target


def _encode(layout: Layout | None, shd_layout: Layout | None, entries: list[Entry]) -> list[int]:
    """src's plan for the receivers: both layouts, then src's `requires_grad` per entry."""
    if layout is None:
        return []
    rep = layout.encode()
    shd = shd_layout.encode() if shd_layout is not None else []
    return [len(rep), len(shd), *rep, *shd, *(e.requires_grad for e in entries)]


def _decode(v: list[int], entries: list[Entry]) -> tuple[Layout, Layout | None]:
    """Inverse of `_encode`; every entry takes src's `requires_grad` (the fingerprint leaves it out)."""
    n, m = v[0], v[1]
    for e, flag in zip(entries, v[2 + n + m:]):
        e.requires_grad = bool(flag)
    return Layout.decode(v[2:2 + n]), (Layout.decode(v[2 + n:2 + n + m]) if m else None)


def _auto_bucket(total: int) -> int:
    """~32 buckets, so packing/reading the next overlaps sending the current one, within [4, 16] MiB:
    smaller buckets pay the collective's per-call cost more often (measured on gloo), larger ones
    delay the first send and grow src's staging."""
    size = 4 << 20
    while size < (16 << 20) and size * 32 < total:
        size *= 2
    return size


def _all_kept_in_place(entries: list[Entry], device: torch.device, facts: list) -> bool:
    """Whether src's own tensors are all plain, contiguous and already on `device` (`facts`: their
    `layout.memory_facts`)."""
    plain = (torch.Tensor, nn.Parameter)
    if any(f is None for f in facts) or not all(type(e.tensor) in plain for e in entries):
        return False
    if device.type == "cpu":
        return all(f[4] < 0 for f in facts)
    return all(e.tensor.device == device for e in entries)


def _resolve_device(device, backend: str) -> torch.device:
    if device is None:
        if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("device='meta' is not a place to load to. Pass 'cpu' or 'cuda:<local rank>'.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device} but CUDA is not available on this rank. "
                             "Pass device='cpu' (with a gloo process group) or run on a GPU machine.")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _unsaved(module: nn.Module) -> frozenset:
    """Names a transformers model's `save_pretrained` leaves out on purpose (`_keys_to_ignore_on_save`,
    gathered over its submodules when it is built): `from_pretrained` recomputes them."""
    keys = getattr(module, "_keys_to_ignore_on_save", None) if "transformers" in sys.modules else None
    return frozenset(k for k in keys if isinstance(k, str)) if keys else frozenset()


def _own_load_logic(module: nn.Module) -> list[str]:
    """The submodules ("path (Class)") of a plain module (not a transformers model, whose reference
    loader, from_pretrained, runs no module load hooks either) with their own load logic: a class
    overriding `_load_from_state_dict` (outside torch.nn's own, which only upgrade old checkpoints) or
    load_state_dict pre-hooks (other than torch's own). load_state_dict runs that logic; materialize
    installs the checkpoint's tensors as they are."""
    if "transformers" in sys.modules:
        from transformers import PreTrainedModel

        if isinstance(module, PreTrainedModel):
            return []
    base, classes = nn.Module._load_from_state_dict, {}

    def overrides(cls) -> bool:  # asked once per class, not per module (~1,600 modules in a deep model)
        got = classes.get(cls)
        if got is None:
            f = cls._load_from_state_dict
            got = classes[cls] = f is not base and not f.__module__.startswith("torch.nn.")
        return got

    def hooked(m) -> bool:  # torch's own pre-hooks (weight_norm's old key names) only rename keys
        return any(not getattr(getattr(h, "hook", h), "__module__", "").startswith("torch.")
                   for h in m._load_state_dict_pre_hooks.values())

    if not any((m._load_state_dict_pre_hooks and hooked(m)) or overrides(type(m)) for m in module.modules()):
        return []
    return [f"{name or '<root>'} ({type(m).__name__})" for name, m in module.named_modules()
            if (m._load_state_dict_pre_hooks and hooked(m)) or overrides(type(m))]


def _warn_own_load_logic(module: nn.Module) -> None:
    """src reads a checkpoint into a plain module with its own load logic (`_own_load_logic`): say
    that materialize does not run it, naming the modules."""
    own = _own_load_logic(module)
    if own:
        warnings.warn(
            f"fsdp_fastload.materialize: {len(own)} module(s) have their own load_state_dict logic "
            f"(a _load_from_state_dict override or load pre-hooks), e.g. {own[:5]}; materialize installs the "
            "checkpoint's tensors as they are and does not run it. If that logic changes values (not only "
            "key names), call load_state_dict on src and materialize(model) without state_dict.", stacklevel=4)


@contextlib.contextmanager
def _warning_raised(raised: list):
    """Before the agreement, a warning that this process's warnings filter turns into an exception
    (``python -W error``, pytest's ``filterwarnings = error``) goes into `raised`, for the agreement:
    every rank then raises it, where src raising it alone would leave the others waiting. Any other
    failure of a warning's own checks is only logged: no warning is a reason to fail a load."""
    try:
        yield
    except Warning as w:
        raised.append(f"{type(w).__name__} raised as an error by the warnings filter of rank "
                      f"{dist.get_rank() if dist.is_initialized() else 0}: {w}")
    except Exception:  # noqa: BLE001
        logger.debug("fsdp_fastload: a check that only warns failed", exc_info=True)


def _warn_kept_in_fp32(module: nn.Module, entries: list[Entry], rank: int) -> None:
    """A transformers model whose half-precision tensors `from_pretrained` would keep in float32
    (`_keep_in_fp32_modules[_strict]`): usually a skeleton built with `from_config(dtype=...)`,
    which will not equal `from_pretrained` (the module's dtypes win). Say so, and how to fix it."""
    if "transformers" not in sys.modules:  # then `module` is no transformers model
        return
    from .integrations.transformers import half_tensors_kept_in_fp32

    kept = half_tensors_kept_in_fp32(module, entries)
    if kept:
        dtype = next(e.dtype for e in entries if kept[0] in e.names)
        warnings.warn(
            f"fsdp_fastload.materialize (rank {rank}): {len(kept)} tensor(s) of this {type(module).__name__} are "
            f"{dtype} but from_pretrained(..., dtype={dtype}) keeps them in float32 (the model's "
            f"_keep_in_fp32_modules), e.g. {kept[:3]}; the module's dtypes win, so the result will not equal "
            "from_pretrained. Call fsdp_fastload.integrations.transformers.from_pretrained_dtypes(model, "
            f"{dtype}) on every rank after building the model (before fully_shard).", stacklevel=4)


def _warn_aliased(entries: list[Entry], rank: int) -> None:
    """Distinct tensors of the model that share memory (see `manifest.aliased`): say that they will not
    after materialize, and how to keep the relation. (On src only: every rank has the same model.)"""
    pairs = aliased(entries)
    if pairs:
        warnings.warn(
            f"fsdp_fastload.materialize (rank {rank}): {len(pairs)} pair(s) of tensors of this model share "
            f"memory without being one tensor (a view of another, or made from its .data), e.g. {pairs[:3]}. "
            "materialize gives each tensor memory of its own, so afterwards they hold the same values but an "
            "in-place change to one (an optimizer step) no longer shows in the other. If the module relies "
            "on that, re-create the view on every rank after materialize (e.g. mod.w_t = mod.weight.detach().t()), "
            "or register the same tensor object under both names (a tie, which materialize keeps).", stacklevel=4)


def _unreadable_module(module: nn.Module, e: BaseException) -> str:
    """The agreement's text when this rank's module cannot be walked (its tensors' shapes unknown)."""
    lazy = [n for n, p in module.named_parameters(remove_duplicate=False)
            if isinstance(p, nn.parameter.UninitializedTensorMixin)]
    lazy += [n for n, b in module.named_buffers(remove_duplicate=False)
             if isinstance(b, nn.parameter.UninitializedTensorMixin)]
    if lazy:
        return (f"{len(lazy)} parameter(s)/buffer(s) of lazy modules are not initialized yet, e.g. {lazy[:5]}: "
                "their shapes are unknown. Run one forward pass on every rank first (on meta inputs for a "
                "meta skeleton), or build those modules with explicit sizes.")
    return f"reading the module's parameters and buffers failed: {_sentence(e)}"


def _check_local(entries: list[Entry], *, is_src: bool, state_dict) -> str | None:
    """Problems this rank can see alone; reported to every rank through `agree`."""
    odd = [e.names[0] + f" ({e.cls})" for e in entries if e.cls not in _SUPPORTED_CLASSES]
    if odd:
        return (f"not supported: tensor subclasses {odd[:5]}{' ...' if len(odd) > 5 else ''} "
                "(quantized parameters, for instance). Materialize the plain model first, then "
                "quantize it.")
    codes, strided = ops.DTYPE_CODE, torch.strided
    odd = [f"{e.names[0]} ({e.dtype})" for e in entries if e.dtype not in codes]
    if odd:
        return (f"not supported: dtype of {odd[:5]}{' ...' if len(odd) > 5 else ''}; supported: "
                f"{', '.join(str(d).replace('torch.', '') for d in codes)}. Convert those tensors (e.g. "
                "complex32 to complex64) before materialize, or keep them out of the module.")
    odd = [f"{e.names[0]} ({e.tensor.layout})" for e in entries if e.tensor.layout is not strided]
    if odd:
        return (f"not supported: sparse or other non-strided tensors {odd[:5]}{' ...' if len(odd) > 5 else ''}. "
                "Register them dense (t.to_dense()), or keep them out of the module.")
    if not is_src:
        if state_dict is not None:
            return ("state_dict was passed on a rank that is not src; only src reads the checkpoint. "
                    "Pass state_dict=... if rank == src else None.")
        return None
    if state_dict is not None:
        return None
    sharded = [e.names[0] for e in entries if e.cls == "DTensor"]
    if sharded:
        return (f"src holds {len(sharded)} DTensor (sharded) parameter(s), e.g. {sharded[:5]}, and no "
                "state_dict: a shard cannot give the other ranks theirs. Pass the full state on src: "
                "state_dict= a checkpoint directory, a .safetensors file or a mapping of full tensors "
                "(e.g. from_pretrained(...).state_dict()).")
    meta = [e.names[0] for e in entries if e.tensor.is_meta]
    if meta:
        return (f"src holds {len(meta)} tensor(s) on the meta device, e.g. {meta[:10]}. "
                "src must hold the real values: load the model on src (from_pretrained or "
                "load_state_dict(assign=True)), or pass state_dict= (a mapping, a .safetensors file "
                "or a checkpoint directory) on src.")
    return None


def _log(*, rank, is_src, entries, layouts, device, phases, mapped_bytes: int = 0) -> None:
    total = sum(phases.values())
    nbytes = sum(e.nbytes for e in entries)
    sent = sum(lay.wire_total for lay in layouts)
    buckets = sum(len(lay.buckets) for lay in layouts)
    last_stats.clear()
    last_stats.update(rank=rank, bytes=nbytes, sent_bytes=sent, tensors=len(entries),
                      buckets=buckets, device=str(device), seconds=total, read_from_mapped_files=mapped_bytes,
                      **{f"{k}_s": v for k, v in phases.items()})
    if is_src and logger.isEnabledFor(logging.INFO):
        fill = phases["fill"]
        logger.info(
            "fsdp_fastload.materialize: %.1f MB (%.1f MB sent), %d tensors, %d buckets to %s in %.3f s "
            "(agree %.3f, alloc %.3f, fill %.3f at %.2f GB/s, install %.3f)",
            nbytes / 1e6, sent / 1e6, len(entries), buckets, device, total,
            phases["agree"], phases["alloc"], fill,
            sent / fill / 1e9 if fill > 0 else float("inf"), phases["install"])

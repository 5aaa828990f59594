"""The fill's broadcasts when something goes wrong: bounded waits, clear errors, ranks failing together.

Two kinds of failure, two answers:

- a peer dies or stalls: every wait on a bucket's broadcast is bounded by a timeout through
  ``work.wait(timeout=...)`` (gloo honours it: the wait raises "Operation timed out!", tested with
  torch 2.13; NCCL's ``WorkNCCL::wait`` takes the same argument, not yet run here). A dead peer's
  closed connection fails the wait at once. The torch.distributed error becomes a
  ``MaterializeError`` naming this rank, the bucket, its bytes and the timeout. Each surviving rank
  raises its own; nobody waits for a rank that is gone.
- src cannot produce a bucket (a checkpoint truncated or unreadable after its header was checked):
  src cannot skip a broadcast the receivers are waiting in, so it keeps sending (the remaining
  buckets unpacked); the fill returns src's error, and the one agreement after every fill (in
  ``api``, with any rank's own failure while the bytes arrived) makes every rank raise it together.

Either way nothing has been installed yet: src's module and the receivers' meta modules are unchanged.
"""
from __future__ import annotations

import datetime
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .agree import MaterializeError
from .layout import Layout

MIN_TIMEOUT_S = 60.0
SLOWEST_RATE = 50e6  # bytes/s: a load slower than this end to end is treated as stuck
POLL_S = 2e-5  # seconds between checks of a CUDA collective's completion (see `Broadcasts.poll`)


def default_timeout(nbytes: int) -> float:
    """Seconds any one wait on a broadcast may block: ``max(60, nbytes / 50 MB/s)``.

    One wait never legitimately takes longer than the whole load at 50 MB/s, so only a dead or
    stuck peer trips it; a minute at least covers src's slow first reads and page faults.

    Example::

        >>> default_timeout(1 << 20), default_timeout(10**10)
        (60.0, 200.0)
    """
    return max(MIN_TIMEOUT_S, nbytes / SLOWEST_RATE)


@dataclass
class _Sent:
    bucket: int
    work: object
    done: bool = False


class Broadcasts:
    """The async bucket collectives of one fill: at most `max_inflight` in flight, every wait bounded.

    `send(k, buf)` broadcasts bucket k from src (with `op="scatter"`: scatters `scatter_list`, given
    on src, each rank receiving its piece into `buf`); `wait(sent)` waits for one; `fail(k, exc)`
    records a local error on src (which then keeps sending) in `error`; `drain()` waits for the rest.
    The caller agrees on `error` with the other ranks afterwards (one agreement for all fills).
    """

    def __init__(self, layout: Layout, *, src: int, group, max_inflight: int, timeout: float | None,
                 op: str = "broadcast", poll: bool = False):
        self.layout, self.src, self.group, self.max_inflight = layout, src, group, max_inflight
        self.op = op
        # NCCL: a `wait` given a timeout blocks the host in a loop that sleeps 1 ms between checks
        # (10 ms in older torch), late by up to that much for a bucket that takes ~0.1 ms over NVLink;
        # polling `is_completed` (a CUDA event query) first notices the end within ~0.1 ms. Not for
        # gloo, whose wait sleeps on a condition variable and is woken at once.
        self.poll = poll
        self.timeout = default_timeout(layout.wire_total) if timeout is None else float(timeout)
        self.rank = dist.get_rank()
        self.inflight: deque[_Sent] = deque()
        self.error: str | None = None
        # work to do instead of blocking on a transfer: called until the transfer completes or it
        # returns False (nothing left); see `fill.Meanwhile`
        self.idle: Callable[[], bool] | None = None

    def send(self, k: int, buf: torch.Tensor, scatter_list: list | None = None) -> _Sent:
        while len(self.inflight) >= self.max_inflight:
            self.wait(self.inflight.popleft())
        try:
            if self.op == "scatter":
                work = dist.scatter(buf, scatter_list, src=self.src, group=self.group, async_op=True)
            else:
                work = dist.broadcast(buf, src=self.src, group=self.group, async_op=True)
        except RuntimeError as e:
            raise self._comm_error(k, e, 0.0) from e
        sent = _Sent(k, work)
        self.inflight.append(sent)
        return sent

    def wait(self, sent: _Sent) -> None:
        if sent.done:
            return
        idle = self.idle
        while idle is not None and not sent.work.is_completed():
            if not idle():
                self.idle = idle = None
        t0 = time.perf_counter()
        left = self.timeout
        if self.poll:
            while not sent.work.is_completed() and time.perf_counter() - t0 < self.timeout:
                time.sleep(POLL_S)
            left = self.timeout - (time.perf_counter() - t0)
        try:
            # kNoTimeout is 0 ms in c10d: never let a tiny timeout round down to "wait forever".
            sent.work.wait(timeout=datetime.timedelta(seconds=max(left, 0.001)))
        except RuntimeError as e:
            raise self._comm_error(sent.bucket, e, time.perf_counter() - t0) from e
        sent.done = True

    def fail(self, k: int, exc: BaseException, what: str = "") -> None:
        """src could not pack bucket k (`what`: its tensors): remember why; the broadcasts go on (see
        `finish`)."""
        a, b = self.layout.buckets[k]
        self.error = (
            f"src could not read/pack bucket {k + 1} of {len(self.layout.buckets)} (bytes [{a}, {b}) of "
            f"{self.layout.wire_total}{what}): {_sentence(exc)} If a checkpoint file changed after "
            "materialize read its header (truncated, rewritten, a failing disk), restore it and retry. "
            "Nothing was installed on any rank.")

    def drain(self) -> None:
        """Wait for every collective still in flight."""
        while self.inflight:
            self.wait(self.inflight.popleft())

    def _comm_error(self, k: int, e: RuntimeError, waited: float) -> MaterializeError:
        a, b = self.layout.buckets[k]
        what = (f"fsdp_fastload.materialize (rank {self.rank}): the {self.op} of bucket {k + 1} of "
                f"{len(self.layout.buckets)} (bytes [{a}, {b}) of {self.layout.wire_total}, from src "
                f"rank {self.src})")
        cause = first_line(e)
        if "timed out" in cause.lower():
            problem = (f"timed out (waited {waited:.1f} s, timeout={self.timeout:g} s). A peer rank "
                       "stalled or died")
        else:
            problem = (f"failed after {waited:.1f} s (timeout={self.timeout:g} s): "
                       f"{_sentence(type(e).__name__ + ': ' + cause)} A peer rank most likely died")
        return MaterializeError(
            f"{what} {problem}: look for the first error in the other ranks' logs. Nothing was "
            "installed on this rank (its module is as it was). Restart the job; if a load this slow "
            "is expected, pass a larger materialize(..., timeout=<seconds>).")


def pack_all(target, layout: Layout, packer) -> None:
    """Without a process group: pack every bucket locally; a failure is a MaterializeError."""
    for k, (a, b) in enumerate(layout.buckets):
        try:
            packer.pack(a, b, target(a, b))
        except Exception as e:  # noqa: BLE001  (any failure here is src's, named below)
            raise MaterializeError(
                f"fsdp_fastload.materialize: could not read/pack bucket {k + 1} of {len(layout.buckets)} "
                f"(bytes [{a}, {b}){packer.describe(a, b)}): {_sentence(e)} Check that the checkpoint is complete and "
                "unchanged; the module was left as it was.") from e


def first_line(e: BaseException) -> str:
    """An exception's first line of text (torch's allocator and c10d errors run to many), or its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _sentence(e) -> str:
    """An exception (or text) as 'Type: message.', ending in a full stop."""
    s = f"{type(e).__name__}: {e}" if isinstance(e, BaseException) else str(e)
    s = s.strip()
    return s if s.endswith((".", "!", "?")) else s + "."

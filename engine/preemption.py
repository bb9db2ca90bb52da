"""Stopping on a signal without losing work: SIGTERM, SIGINT and SIGUSR1 (what SLURM and
Kubernetes send before killing a job) ask the run to stop after the current optimizer
update; every rank agrees on the same update, one checkpoint is written, and the process
exits with utils.EXIT_PREEMPTED so a scheduler can requeue it. A second signal exits at once.

Agreeing is a collective. After updates it runs about every CHECK_SECONDS of training, not
every update: the ranks share the slowest rank's seconds per update with the flag, so
all of them compute the same next check.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

# a signal stops the run after about this many seconds of training at most
CHECK_SECONDS = 1.0
MAX_CHECK_INTERVAL = 10_000  # updates

STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, 'SIGUSR1', None)) if s is not None)


class StopRequest:
    """Remembers the first stop signal; `agreed()` tells every rank whether any rank got one,
    `agreed_after_update()` the same at its pace."""

    def __init__(self, group: Any = None):
        self.signal_name: str | None = None
        self.group = group  # a CPU (gloo) group, so agreeing never waits for the GPU
        self._previous: dict[int, Any] = {}
        self._next_check = 0  # the update count of the next collective after an update
        self._last: tuple[int, float] | None = None  # (updates done, monotonic time) at the last one

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signal_name is not None:  # the second signal: no more waiting
            os._exit(128 + signum)
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank when any rank has been signalled (a collective on the group)."""
        return self._agree(updates_done=None)

    def agreed_after_update(self, updates_done: int) -> bool:
        """`agreed()` when the next check is due, else False without a collective. Call it
        on every rank after every update, with the same count."""
        if not _distributed():
            return self.signal_name is not None
        if updates_done < self._next_check:
            return False
        return self._agree(updates_done)

    def _agree(self, updates_done: int | None) -> bool:
        local = self.signal_name is not None
        if not _distributed():
            return local
        now = time.monotonic()
        pace = 0.0  # seconds per update since the last check after an update
        if updates_done is not None and self._last is not None and updates_done > self._last[0]:
            pace = (now - self._last[1]) / (updates_done - self._last[0])
        shared = torch.tensor([1.0 if local else 0.0, pace], dtype=torch.float64)
        dist.all_reduce(shared, op=dist.ReduceOp.MAX, group=self.group)
        flag, pace = shared.tolist()
        if updates_done is not None:
            interval = int(CHECK_SECONDS / pace) if pace > 0 else 1
            self._next_check = updates_done + min(max(interval, 1), MAX_CHECK_INTERVAL)
            self._last = (updates_done, now)
        if flag and self.signal_name is None:
            self.signal_name = 'a signal to another rank'
        return bool(flag)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()

"""Stopping on a signal without losing work: SIGTERM, SIGINT and SIGUSR1 (what SLURM and
Kubernetes send before killing a job) ask the run to stop after the current optimizer
update; every rank agrees on the same update, one checkpoint is written, and the process
exits with utils.EXIT_PREEMPTED so a scheduler can requeue it. A second signal exits at once.
"""
from __future__ import annotations

import os
import signal
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, 'SIGUSR1', None)) if s is not None)


class StopRequest:
    """Remembers the first stop signal; `agreed()` tells every rank whether any rank got one."""

    def __init__(self, group: Any = None):
        self.signal_name: str | None = None
        self.group = group  # a CPU (gloo) group, so agreeing never waits for the GPU
        self._previous: dict[int, Any] = {}

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
        local = self.signal_name is not None
        if not (dist.is_available() and dist.is_initialized()):
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if flag.item() and self.signal_name is None:
            self.signal_name = 'a signal to another rank'
        return bool(flag.item())

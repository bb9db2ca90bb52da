"""Learning-rate schedules per optimizer update, with linear warmup, and the batch-size
scaling of the configured learning rates.

The values are those of the official `build_scheduler` with the timm version it was written
for (0.4.12), for every schedule and option, group by group: a group's peak is BASE_LR x its
lr_scale (layer decay); WARMUP_LR and MIN_LR are not scaled. In particular:
- warmup ramps linearly from WARMUP_LR to the group's peak; without TRAIN.LR_SCHEDULER.
  WARMUP_PREFIX the cosine then continues at its value for the update count (counted from
  update 0, so the LR drops at the end of warmup), with it the cosine starts after warmup;
- `linear` decays from the peak after warmup to 1% of it at the end, whatever MIN_LR says;
- `step` and `multistep` count their decay points from update 0.
Written here rather than taken from timm so the whole state is the update count: a resume
with another GPU count or batch size recomputes the LR from the new schedule.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

import torch
from yacs.config import CfgNode

from config import LR_SCALINGS, LR_SCHEDULERS
from utils import ConfigError

# The official rule scales the learning rates to the batch relative to this reference batch
REFERENCE_BATCH = 512


def scaled_learning_rates(config: CfgNode, world_size: int) -> dict[str, float]:
    """BASE_LR, WARMUP_LR and MIN_LR for the effective batch (batch x world size x
    accumulation steps) under TRAIN.LR_SCALING; the runner settles them into the run's config."""
    effective = config.DATA.BATCH_SIZE * world_size * config.TRAIN.ACCUMULATION_STEPS
    rule = config.TRAIN.LR_SCALING
    if rule == 'linear':
        factor = effective / REFERENCE_BATCH
    elif rule == 'sqrt':
        factor = math.sqrt(effective / REFERENCE_BATCH)
    elif rule == 'none':
        factor = 1.0
    else:
        raise ConfigError(f"TRAIN.LR_SCALING '{rule}' is not one of {', '.join(LR_SCALINGS)}")
    return {'effective_batch': effective, 'factor': factor, 'base_lr': config.TRAIN.BASE_LR * factor,
            'warmup_lr': config.TRAIN.WARMUP_LR * factor, 'min_lr': config.TRAIN.MIN_LR * factor}


# the official `linear` schedule ends at this fraction of the peak LR
LINEAR_END_RATE = 0.01


def schedule_position(updates_done: int) -> int:
    """The schedule index the next update uses after `updates_done` updates: the official loop
    calls `step_update` with the index of the update just done, so the first two updates
    both use the warmup start and update k (from 1) uses the value at k - 1."""
    return max(updates_done - 1, 0)


class LRScheduler:
    """Sets every param group's LR to `lr_at(t, group['lr_scale'])` on `step_update(t)`;
    construction applies `t = 0`, the warmup start."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, base_lr: float, warmup_lr: float,
                 min_lr: float, warmup_steps: int, total_steps: int, warmup_prefix: bool = True,
                 decay_steps: int = 1, decay_rate: float = 0.1, milestones: Sequence[int] = (),
                 gamma: float = 0.1) -> None:
        if name not in LR_SCHEDULERS:
            raise ConfigError(f"TRAIN.LR_SCHEDULER.NAME '{name}' is not one of {', '.join(LR_SCHEDULERS)}")
        if name == 'step' and decay_steps <= 0:
            raise ConfigError(f"the step schedule needs TRAIN.LR_SCHEDULER.DECAY_EPOCHS of at least one update, "
                              f"got {decay_steps} updates")
        self.optimizer = optimizer
        self.name = name
        self.base_lr, self.warmup_lr, self.min_lr = float(base_lr), float(warmup_lr), float(min_lr)
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)
        self.warmup_prefix = bool(warmup_prefix)
        self.decay_steps, self.decay_rate = int(decay_steps), float(decay_rate)
        self.milestones, self.gamma = [int(m) for m in milestones], float(gamma)
        # the cosine's length; at least 1 so a warmup as long as the run still works
        span = self.total_steps - self.warmup_steps if self.warmup_prefix else self.total_steps
        self.cosine_steps = max(span, 1)
        self.num_updates = 0
        self.step_update(0)

    def _after_warmup(self, t: int, peak: float) -> float:
        if self.name == 'step':
            return peak * self.decay_rate ** (t // self.decay_steps)
        if self.name == 'multistep':
            return peak * self.gamma ** bisect.bisect_right(self.milestones, t)
        if self.name == 'linear':  # after warmup whatever WARMUP_PREFIX says
            done = (t - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
            return peak - (peak - peak * LINEAR_END_RATE) * done
        t = t - self.warmup_steps if self.warmup_prefix else t
        if t >= self.cosine_steps:  # one cycle, then MIN_LR
            return self.min_lr
        return self.min_lr + 0.5 * (peak - self.min_lr) * (1 + math.cos(math.pi * t / self.cosine_steps))

    def lr_at(self, t: int, lr_scale: float = 1.0) -> float:
        """The LR at schedule index `t` of a group whose peak is BASE_LR x `lr_scale`."""
        peak = self.base_lr * lr_scale
        if t < self.warmup_steps:
            return self.warmup_lr + t * (peak - self.warmup_lr) / self.warmup_steps
        return self._after_warmup(t, peak)

    def step_update(self, num_updates: int) -> None:
        """Apply the LRs at schedule index `num_updates` to every param group."""
        self.num_updates = num_updates
        for group in self.optimizer.param_groups:
            group['lr'] = self.lr_at(num_updates, group.get('lr_scale', 1.0))

    def state_dict(self) -> dict[str, Any]:
        """The schedule index plus the schedule it was counted under (plain numbers), so a
        resume can compare the schedule; only the index is restored."""
        return {'num_updates': self.num_updates, 'name': self.name, 'base_lr': self.base_lr,
                'warmup_lr': self.warmup_lr, 'min_lr': self.min_lr, 'warmup_steps': self.warmup_steps,
                'total_steps': self.total_steps, 'warmup_prefix': self.warmup_prefix,
                'decay_steps': self.decay_steps, 'decay_rate': self.decay_rate,
                'milestones': list(self.milestones), 'gamma': self.gamma}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the index and apply its LRs under this (possibly new) schedule."""
        self.step_update(int(state['num_updates']))


def build_scheduler(config: CfgNode, optimizer: torch.optim.Optimizer, n_iter_per_epoch: int) -> LRScheduler:
    """The configured schedule in optimizer updates (`n_iter_per_epoch` of them per epoch),
    between the already scaled TRAIN.BASE_LR / WARMUP_LR / MIN_LR."""
    train, sched = config.TRAIN, config.TRAIN.LR_SCHEDULER
    n = int(n_iter_per_epoch)
    return LRScheduler(
        optimizer, sched.NAME, base_lr=train.BASE_LR, warmup_lr=train.WARMUP_LR, min_lr=train.MIN_LR,
        warmup_steps=int(train.WARMUP_EPOCHS * n), total_steps=int(train.EPOCHS * n),
        warmup_prefix=sched.WARMUP_PREFIX, decay_steps=int(sched.DECAY_EPOCHS * n),
        decay_rate=sched.DECAY_RATE, milestones=[int(m * n) for m in sched.MULTISTEPS], gamma=sched.GAMMA)

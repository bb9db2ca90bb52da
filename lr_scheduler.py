"""Learning-rate schedules per optimizer update, with linear warmup, and the batch-size
scaling of the configured learning rates.

Written here rather than taken from timm: timm's warmup ramps to BASE_LR and then jumps to
the schedule's value when the warmup is not a prefix, and its state holds more than a step
count; ours is continuous at the end of warmup, and its whole state is the update count, so
a resume with another GPU count or batch size recomputes the LR from the new schedule.
With the official defaults (cosine, warmup prefix) the values equal timm's.
"""
from __future__ import annotations

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


class LRScheduler:
    """Sets every param group's LR to `lr_at(updates) * group['lr_scale']`.

    `step_update(k)` is called with the number of optimizer updates done so far, so the
    next update uses `lr_at(k)`; construction applies `lr_at(0)`, the warmup start.
    """

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
        # length of the main schedule; at least 1 so a warmup as long as the run still works
        span = self.total_steps - self.warmup_steps if self.warmup_prefix else self.total_steps
        self.main_steps = max(span, 1)
        if self.warmup_steps > 0:
            target = self._main_lr(self.warmup_steps)
            self._warmup_slope = (target - self.warmup_lr) / self.warmup_steps
        self.num_updates = 0
        self.step_update(0)

    def _main_lr(self, step: int) -> float:
        # step and multistep count their decay points from update 0 whatever WARMUP_PREFIX
        # says, as the official code (with its timm 0.4.12) does: MULTISTEPS [30, 60] decays
        # at epochs 30 and 60
        if self.name == 'step':
            return self.base_lr * self.decay_rate ** (step // self.decay_steps)
        if self.name == 'multistep':
            return self.base_lr * self.gamma ** sum(m <= step for m in self.milestones)
        t = step - self.warmup_steps if self.warmup_prefix else step
        if t >= self.main_steps:
            return self.min_lr
        if self.name == 'cosine':
            return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t / self.main_steps))
        return self.base_lr + (self.min_lr - self.base_lr) * t / self.main_steps  # linear

    def lr_at(self, num_updates: int) -> float:
        """The LR (before a group's lr_scale) for the update after `num_updates` updates."""
        if num_updates < self.warmup_steps:
            return self.warmup_lr + num_updates * self._warmup_slope
        return self._main_lr(num_updates)

    def step_update(self, num_updates: int) -> None:
        """Apply the LR for the next update to every param group."""
        self.num_updates = num_updates
        lr = self.lr_at(num_updates)
        for group in self.optimizer.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)

    def state_dict(self) -> dict[str, Any]:
        """The update count plus the schedule it was counted under (plain numbers), so a
        resume can compare the schedule; only the count is restored."""
        return {'num_updates': self.num_updates, 'name': self.name, 'base_lr': self.base_lr,
                'warmup_lr': self.warmup_lr, 'min_lr': self.min_lr, 'warmup_steps': self.warmup_steps,
                'total_steps': self.total_steps, 'warmup_prefix': self.warmup_prefix,
                'decay_steps': self.decay_steps, 'decay_rate': self.decay_rate,
                'milestones': list(self.milestones), 'gamma': self.gamma}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the update count and apply its LR under this (possibly new) schedule."""
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

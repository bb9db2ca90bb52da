"""What a training epoch reports besides its maths: a log line every PRINT_FREQ micro-steps
(ETA, LR, weight decay, step and data time, images/s, loss over the interval and the epoch,
gradient norm, loss scale, peak memory), the same scalars to TensorBoard, the compile time
once per run, and the epoch's summary (mean loss over all ranks, images/s).

Only the print steps and the epoch end wait for the device; every other step only queues work.
"""
from __future__ import annotations

import datetime
import time

import torch

from distributed.process_group import all_reduce_sum
from lr_scheduler import schedule_position
from utils import peak_memory_mb, reset_peak_memory, synchronize


class StepLogger:
    """One per run (it remembers whether the compile time was logged); `start_epoch` resets
    the per-epoch timers. It reads the run's state from the Trainer `t` each call is given."""

    def __init__(self, compiled: bool):
        self.compile_pending = compiled  # the first compiled step's time, logged once per run

    def start_epoch(self, t, epoch: int, n_steps: int, prefetcher) -> None:
        self.epoch, self.n_steps, self.prefetcher = epoch, n_steps, prefetcher
        self.start_step = self.logged_step = t.epoch_step
        # a resumed epoch starts from its saved running loss; a copy, read at the first print (no sync here)
        self.logged_loss: float | torch.Tensor = t.loss_sum.clone()
        self.epoch_start = self.interval_start = time.perf_counter()
        self.first_step_s = 0.0
        reset_peak_memory(t.device)  # the log's `mem`: this epoch's training peak, not validation's

    def step_done(self, step: int) -> None:
        """After each micro-step: with torch.compile the first one's host time is compilation."""
        if self.compile_pending and step == self.start_step:
            self.first_step_s = time.perf_counter() - self.epoch_start

    def due(self, t, step: int) -> bool:
        return (step + 1) % t.config.PRINT_FREQ == 0 or step + 1 == self.n_steps

    def log(self, t, step: int, grad_norm: torch.Tensor, batch_size: int) -> None:
        """The print step's line and scalars (waits for the device)."""
        cfg = t.config
        synchronize(t.device)
        now = time.perf_counter()
        steps = step + 1 - self.logged_step
        total, logged = t.loss_sum.item(), float(self.logged_loss)
        step_time = (now - self.interval_start) / steps
        update = self.epoch * t.updates_per_epoch + step // cfg.TRAIN.ACCUMULATION_STEPS
        lr, norm = t.scheduler.lr_at(schedule_position(update)), grad_norm.item()
        scale = t.scaler.get_scale() if t.scaler is not None else None
        if self.compile_pending:
            self._log_compile_time(t.logger, now, steps)
        eta = datetime.timedelta(seconds=int(step_time * (self.n_steps - step - 1)))
        t.logger.info(
            f'Train: [{self.epoch}/{cfg.TRAIN.EPOCHS}][{step + 1}/{self.n_steps}]  eta {eta}  lr {lr:.6g}  '
            f'wd {cfg.TRAIN.WEIGHT_DECAY:.4f}  time {step_time:.4f}  data {self.prefetcher.wait_s / steps:.4f}  '
            f'img/s {batch_size * t.ctx.world_size / step_time:.1f}  '
            f'loss {(total - logged) / steps:.4f} ({total / (step + 1):.4f})  '
            f'grad_norm {norm:.4f}' + (f'  loss_scale {scale:.0f}' if scale is not None else '')
            + f'  mem {peak_memory_mb(t.device):.0f}MB')
        t.metrics.scalars(update, {'train/loss': (total - logged) / steps, 'train/lr': lr,
                                   'train/grad_norm': norm})
        self.logged_loss, self.logged_step, self.interval_start = total, step + 1, now
        self.prefetcher.wait_s = 0.0

    def _log_compile_time(self, logger, now: float, steps: int) -> None:
        self.compile_pending = False
        rest = (now - self.epoch_start - self.first_step_s) / (steps - 1) if steps > 1 else None
        logger.info(f'torch.compile: first step took {self.first_step_s:.1f} s (compilation)'
                    + (f', the next {steps - 1} took {rest:.4f} s each' if rest is not None else ''))

    def summary(self, t, finished: bool) -> dict:
        """The epoch's mean loss over all ranks (a collective), its last LR, images/s, time and
        the updates done; `finished` logs the epoch line."""
        cfg = t.config
        synchronize(t.device)
        elapsed = time.perf_counter() - self.epoch_start
        steps_done = t.epoch_step
        totals = all_reduce_sum(torch.stack([t.loss_sum.to(torch.float64),
                                             torch.full((), steps_done, dtype=torch.float64, device=t.device)]))
        images_seen = (steps_done - self.start_step) * cfg.DATA.BATCH_SIZE * t.ctx.world_size
        last_lr = t.scheduler.lr_at(schedule_position(t.updates_done - 1))
        stats = {'train_loss': (totals[0] / totals[1]).item(), 'lr': last_lr,
                 'img_per_s': images_seen / elapsed, 'train_time': elapsed, 'updates': t.updates_done}
        if finished:
            t.logger.info(f'EPOCH {self.epoch} training took {datetime.timedelta(seconds=int(elapsed))}, '
                          f'{stats["img_per_s"]:.1f} images/s, loss {stats["train_loss"]:.4f}')
        return stats

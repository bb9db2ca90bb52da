"""The Trainer's checkpoints in the run's output folder: which one to resume from, and
writing `trainer.state_dict()` as a mid-epoch, epoch or best checkpoint (a file from rank 0,
or with fsdp a folder every rank writes its shards into), then updating `latest` and
pruning. Every write is atomic, and a failure on rank 0 is one line on every rank."""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from distributed.process_group import DistContext, broadcast_object, run_on_main
from utils import ConfigError, atomic_save

from . import folder, sharded
from .reading import newest_readable_checkpoint

if TYPE_CHECKING:
    from engine.trainer import Trainer


class Checkpointer:
    def __init__(self, output: str, ctx: DistContext, logger: logging.Logger):
        self.output, self.ctx, self.logger = output, ctx, logger

    # --- resume ---------------------------------------------------------------------------

    def find_resume(self, config) -> tuple[str | None, dict | None]:
        """Rank 0 decides: --resume wins over auto-resume (the log says so); else the newest
        readable checkpoint of the folder when TRAIN.AUTO_RESUME is on. Every rank gets the
        path; rank 0 also the contents it already read. A fresh start into a folder holding
        a run (auto-resume off) is refused."""
        path, state, refusal = None, None, None
        if self.ctx.is_main:
            path, state = self._find(config)
            refusal = None if (path or config.TRAIN.AUTO_RESUME) else self._other_run()
        path, refusal = broadcast_object((path, refusal))
        if refusal:
            raise ConfigError(refusal)
        return path, state

    def _find(self, config) -> tuple[str | None, dict | None]:
        if config.MODEL.RESUME:
            if config.TRAIN.AUTO_RESUME:
                newest = folder.resume_candidates(self.output)
                if newest and os.path.abspath(newest[0]) != os.path.abspath(config.MODEL.RESUME):
                    self.logger.info(f'--resume {config.MODEL.RESUME} is used; auto-resume would have taken '
                                     f'{newest[0]}')
            return config.MODEL.RESUME, None
        found = newest_readable_checkpoint(self.output, self.logger) if config.TRAIN.AUTO_RESUME else None
        if found:
            self.logger.info(f'auto-resume: newest checkpoint in the output folder is {found[0]}')
            return found
        return None, None

    def _other_run(self) -> str | None:
        found = folder.resume_candidates(self.output)
        if not found:
            return None
        return (f"output folder '{self.output}' already holds checkpoints of a run ({os.path.basename(found[0])}); "
                f"resume it (TRAIN.AUTO_RESUME True, or --resume), or start this one under another --tag or --output")

    def set_aside_later(self, epoch: int, updates: int, resumed_from: str | None) -> None:
        """Rank 0: checkpoints after the point training continues from (epoch `epoch` done,
        `updates` updates) belong to a timeline this run abandons."""
        if self.ctx.is_main:
            for path in folder.set_aside_later_checkpoints(self.output, epoch, updates, keep=resumed_from):
                self.logger.info(f'renamed {path} to {os.path.basename(path)}.stale: the run restarts before it')

    # --- saving ---------------------------------------------------------------------------

    def _write(self, trainer: Trainer, path: str) -> None:
        """Every rank: the trainer's state to `path`."""
        state = trainer.state_dict()
        if trainer.sharded:
            sharded.save(path, state, self.ctx)
        else:
            run_on_main(self.ctx, lambda: atomic_save(state, path))

    def save_mid_epoch(self, trainer: Trainer) -> None:
        """Every rank: a checkpoint inside the epoch, after `trainer.epoch_step` micro-batches."""
        updates = trainer.updates_done
        path = os.path.join(self.output, folder.step_checkpoint_name(updates, trainer.sharded))
        self._write(trainer, path)

        def settle() -> None:
            folder.mark_latest(self.output, path)
            folder.prune_step_checkpoints(self.output, keep_from=updates)
            self.logger.info(f'saved {path} (epoch {trainer.epoch}, micro-batch {trainer.epoch_step})')
        run_on_main(self.ctx, settle)

    def save_epoch(self, trainer: Trainer, save_epoch: bool, improved: bool, keep_last: int) -> None:
        """Every rank, after epoch `trainer.epoch - 1`: its checkpoint (when `save_epoch`) and
        the best one (when validation `improved`: a link to the epoch's file, or a write of its
        own); keeps the newest `keep_last` epoch checkpoints."""
        epoch, updates, is_sharded = trainer.epoch - 1, trainer.updates_done, trainer.sharded
        best = os.path.join(self.output, folder.best_name(is_sharded))
        if not save_epoch:
            self._write(trainer, best)
            run_on_main(self.ctx, lambda: folder.remove_other_best(self.output, is_sharded))
            self.logger.info(f'saved {best} (top-1 {trainer.max_accuracy:.2f}%)')
            return
        path = os.path.join(self.output, folder.epoch_checkpoint_name(epoch, is_sharded))
        self._write(trainer, path)

        def settle() -> None:
            folder.mark_latest(self.output, path)
            folder.prune_step_checkpoints(self.output, keep_from=updates + 1)
            self.logger.info(f'saved {path}')
            if improved:
                folder.atomic_link(path, best)
                folder.remove_other_best(self.output, is_sharded)
                self.logger.info(f'saved {best} (top-1 {trainer.max_accuracy:.2f}%)')
            for old in folder.prune_checkpoints(self.output, keep_last, epoch):
                self.logger.info(f'removed {old} (SAVE_KEEP_LAST {keep_last})')
        run_on_main(self.ctx, settle)

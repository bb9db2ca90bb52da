"""The Trainer: the one owner of a training run's state (model, training module, optimizer,
schedule, scaler, EMA, where training stands, the best accuracies, metrics) with `fit()`,
and `state_dict()` / `load_state_dict()`, the only way checkpoints are written and read.

Where training stands is `epoch` (the epoch being trained, or next to train), `epoch_step`
(its micro-batches done) and `loss_sum` (their summed loss). A checkpoint's `epoch` is the
last finished epoch (as officially); a mid-epoch checkpoint adds `epoch_step` and every
rank's running loss. Resuming either kind on the same setup continues bit for bit.
"""
from __future__ import annotations

import datetime
import time

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

from checkpoints import sharded as sharded_files
from checkpoints.checkpointer import Checkpointer
from checkpoints.experts import (
    expert_names,
    gather_model_state,
    gather_optimizer_state,
    own_model_state,
    own_optimizer_state,
)
from checkpoints.rng import capture_rng, restore_rng
from checkpoints.training_state import check_training_checkpoint, load_model_and_optimizer
from data import DevicePreprocessor
from distributed import parallel
from distributed.memory_report import estimate_memory, report_lines
from distributed.process_group import DistContext, gather_objects, run_on_main
from lr_scheduler import build_scheduler, schedule_position
from models.weights import load_model_weights
from optimizer import build_optimizer, describe_param_groups
from utils import EXIT_PREEMPTED, ConfigError, DivergedError

from .amp import make_scaler
from .guard import NonFiniteGuard
from .loops import Stop, build_criterion, compile_model, train_one_epoch, updates_per_epoch, validate
from .metrics_log import MetricsLog
from .preemption import StopRequest
from .reconstruction import pretraining_record
from .step_logger import StepLogger


class Trainer:
    """Build with the run's settled config, its model (pretrained weights already loaded) and
    loaders; `load_state_dict` a checkpoint to resume; then `fit()`. Used as a context
    manager, it closes its metrics writer at the end, whatever happened."""

    def __init__(self, config, ctx: DistContext, model: nn.Module, loader_train, loader_val, mixup_fn,
                 amp_dtype: torch.dtype | None, logger, checkpointer: Checkpointer | None = None):
        self.config, self.ctx, self.logger, self.amp_dtype = config, ctx, logger, amp_dtype
        self.device = ctx.device
        self.loader_train, self.loader_val, self.mixup_fn = loader_train, loader_val, mixup_fn
        self.updates_per_epoch = self._updates_per_epoch(len(loader_train))
        self.model = self._prepare_model(model)  # never DDP-wrapped nor compiled: checkpoints come from it
        self.optimizer = parallel.shard_optimizer(build_optimizer(config, self.model), config, ctx)
        if parallel.is_zero(self.optimizer):
            logger.info(f'ZeRO: the optimizer state is sharded over {ctx.world_size} processes')
        for line in describe_param_groups(self.optimizer):
            logger.info(f'param group: {line}')
        self.scheduler = build_scheduler(config, self.optimizer, self.updates_per_epoch)
        self.scaler = make_scaler(amp_dtype, self.device)
        self.ema = build_ema(config, self.model, logger)
        self.pretraining = config.MODEL.SIMMIM.PRETRAIN  # the model returns its own loss
        self.criterion = None if self.pretraining else build_criterion(config, mixup_fn is not None)
        # counted where the gradients live: the host for CPU-offloaded FSDP shards
        grad_device = next((p.device for p in self.model.parameters() if p.requires_grad), self.device)
        self.guard = NonFiniteGuard(grad_device, config.TRAIN.MAX_CONSECUTIVE_SKIPS)
        # SimMIM's augmentation has no random erasing
        self.prep_train = DevicePreprocessor(config, self.device, is_train=not self.pretraining)
        self.prep_val = DevicePreprocessor(config, self.device, is_train=False)
        self.train_module = parallel.training_module(self.model, config, ctx)  # DDP for ddp and zero
        # the DDP-wrapped module is compiled (as PyTorch recommends): the DDP optimizer then
        # splits the graph at the all-reduce buckets, so communication overlaps backward
        wrapped = ' (DDP-wrapped)' if self.train_module is not self.model else ''
        self.forward_module = compile_model(self.train_module, config, logger, f'training forward{wrapped}')
        self.eval_module = compile_model(self.model, config, logger, 'validation forward')
        self.metrics = MetricsLog(config.OUTPUT, ctx.is_main)
        self.step_logger = StepLogger(compiled=config.TRAIN.COMPILE)
        self.checkpointer = checkpointer or Checkpointer(config.OUTPUT, ctx, logger)
        self.stop = StopRequest(ctx.control_group)
        self.epoch, self.epoch_step = config.TRAIN.START_EPOCH, 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.max_accuracy: float | None = None
        self.max_ema_accuracy: float | None = None
        self.resumed_from: str | None = None
        # TRAIN.START_EPOCH may start later than update 0
        self.scheduler.step_update(schedule_position(self.updates_done))

    # --- building ---------------------------------------------------------------------------

    def _updates_per_epoch(self, batches: int) -> int:
        accum = self.config.TRAIN.ACCUMULATION_STEPS
        updates = updates_per_epoch(batches, accum)
        if updates == 0:
            raise ConfigError(f'TRAIN.ACCUMULATION_STEPS {accum} is more than the {batches} batches '
                              f'of an epoch; lower it or the batch size')
        if batches % accum:
            self.logger.info(f'{batches % accum} trailing batches per epoch are skipped: {batches} '
                             f'batches do not divide into updates of {accum}')
        return updates

    def _prepare_model(self, model: nn.Module) -> nn.Module:
        """Freeze what fine-tuning keeps fixed, log the memory estimate, and shard for fsdp
        (after pretrained weights loaded into the full model, before the optimizer sees it)."""
        config, logger = self.config, self.logger
        frozen = model.freeze(config.TRAIN.FREEZE_STAGES, config.TRAIN.LINEAR_PROBE)
        if frozen:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            logger.info(f'frozen (not trained, kept in eval mode): {", ".join(frozen)}; {trainable:,} of '
                        f'{sum(p.numel() for p in model.parameters()):,} parameters train')
        for line in report_lines(estimate_memory(model, config, self.ctx.world_size, self.amp_dtype), self.device):
            logger.info(f'memory per process: {line}')
        if config.TRAIN.PARALLEL == 'fsdp':
            offload = config.TRAIN.FSDP.CPU_OFFLOAD and self.device.type == 'cuda'
            parallel.shard_model(model, config, self.amp_dtype, offload)
            logger.info(f'FSDP: parameters, gradients and optimizer state sharded over {self.ctx.world_size} '
                        f'process(es), one unit per Swin block; gathered in {self.amp_dtype or torch.float32}, '
                        f'gradients reduced in {parallel.reduce_dtype(config, self.amp_dtype)}'
                        + (', shards kept in CPU memory' if offload else ''))
            if config.TRAIN.FSDP.CPU_OFFLOAD and not offload:
                logger.info('TRAIN.FSDP.CPU_OFFLOAD has nothing to do: this run is on the CPU already')
        return model

    # --- where training stands ----------------------------------------------------------------

    @property
    def updates_done(self) -> int:
        return self.epoch * self.updates_per_epoch + self.epoch_step // self.config.TRAIN.ACCUMULATION_STEPS

    @property
    def effective_batch(self) -> int:
        c = self.config
        return c.DATA.BATCH_SIZE * self.ctx.world_size * c.TRAIN.ACCUMULATION_STEPS

    @property
    def sharded(self) -> bool:
        """FSDP shards: checkpoints are torch.distributed.checkpoint folders."""
        return parallel.is_sharded(self.model)

    # --- the run ------------------------------------------------------------------------------

    def fit(self) -> int:
        """Train to TRAIN.EPOCHS, or until a stop signal; returns the exit code."""
        config, logger = self.config, self.logger
        self.checkpointer.set_aside_later(self.epoch - 1, self.updates_done, self.resumed_from)
        try:
            if self.epoch >= config.TRAIN.EPOCHS:
                logger.info(f'nothing to train: the checkpoint finished epoch {self.epoch - 1} of '
                            f'{config.TRAIN.EPOCHS}')
                return 0
            dropped = self.metrics.drop_epochs_from(self.epoch)
            if dropped:
                logger.info(f'metrics.jsonl: removed {dropped} line(s) of epochs >= {self.epoch}, which this run '
                            f'repeats')
            logger.info(f'start training: epoch {self.epoch} (micro-batch {self.epoch_step}) to '
                        f'{config.TRAIN.EPOCHS - 1}, {self.updates_per_epoch} updates per epoch')
            self.stop.install()
            began = time.perf_counter()
            while self.epoch < config.TRAIN.EPOCHS:
                if self._run_epoch() is Stop.SIGNAL:
                    return EXIT_PREEMPTED
            best = '' if self.max_accuracy is None else f'; max accuracy {self.max_accuracy:.2f}%'
            logger.info(f'Training time {datetime.timedelta(seconds=int(time.perf_counter() - began))}{best}')
            return 0
        finally:
            self.stop.uninstall()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.metrics.close()

    def _run_epoch(self) -> Stop | None:
        """Train epoch `self.epoch`, validate, record and checkpoint it."""
        config, epoch = self.config, self.epoch
        self.loader_train.sampler.set_epoch(epoch, start=self.epoch_step * config.DATA.BATCH_SIZE)
        result = train_one_epoch(self, self.loader_train, epoch)
        if result.stop is Stop.SIGNAL:
            self.logger.info(f'stopped by {self.stop.signal_name} after update {result.updates}; the checkpoint '
                             f'holds every finished update; exit code {EXIT_PREEMPTED} (resume by running the '
                             f'same command)')
            return Stop.SIGNAL
        if result.stop is Stop.DIVERGED:
            self.checkpointer.save_mid_epoch(self)
            raise DivergedError(result.message)
        record, improved = self._validate(epoch, result)
        stopping = self.stop.agreed()  # a signal during validation: this epoch's checkpoint is the last
        save_epoch = epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1 or stopping
        self.epoch, self.epoch_step = epoch + 1, 0
        self.loss_sum.zero_()
        run_on_main(self.ctx, lambda: self._record(record))
        if save_epoch or improved:
            self.checkpointer.save_epoch(self, save_epoch, improved, config.SAVE_KEEP_LAST)
        if stopping and epoch < config.TRAIN.EPOCHS - 1:
            self.logger.info(f'stopped by {self.stop.signal_name} after epoch {epoch}; exit code {EXIT_PREEMPTED}')
            return Stop.SIGNAL
        return None

    def after_update(self) -> Stop | None:
        """Called by the loop after every optimizer update: on a signal any rank received
        (checked about every second, see `preemption`), write a checkpoint and stop; else the
        periodic mid-epoch checkpoint when SAVE_STEP_FREQ is due (not at the epoch's end,
        whose own checkpoint follows)."""
        stopping = self.stop.agreed_after_update(self.updates_done)
        updates, every = self.updates_done, self.config.SAVE_STEP_FREQ
        if stopping or (every and updates % every == 0 and updates % self.updates_per_epoch):
            self.checkpointer.save_mid_epoch(self)
        return Stop.SIGNAL if stopping else None

    def _validate(self, epoch: int, result) -> tuple[dict, bool]:
        """Score the model (and the EMA); the epoch's metrics line and whether top-1 improved
        (SimMIM pre-training: the reconstruction loss, and a picture every SAVE_FREQ epochs)."""
        if self.pretraining:
            return pretraining_record(self, epoch, result), False
        val = validate(self.config, self.eval_module, self.loader_val, self.prep_val, self.device, self.amp_dtype,
                       self.logger)
        improved = self.max_accuracy is None or val['acc1'] > self.max_accuracy
        self.max_accuracy = val['acc1'] if improved else self.max_accuracy
        self.logger.info(f'Accuracy of the network on the {val["n_images"]} test images: {val["acc1"]:.2f}%  '
                         f'Max accuracy: {self.max_accuracy:.2f}%')
        record = {'epoch': epoch, 'train_loss': result.train_loss, 'acc1': val['acc1'], 'acc5': val['acc5'],
                  'val_loss': val['val_loss'], 'lr': result.lr, 'img_per_s': result.img_per_s,
                  'max_acc1': self.max_accuracy, 'n_images': val['n_images'], 'updates': result.updates,
                  'train_time': result.train_time}
        if self.ema is not None:
            record.update(self._validate_ema())
        return record, improved

    def _validate_ema(self) -> dict:
        val = validate(self.config, self.ema.module, self.loader_val, self.prep_val, self.device, self.amp_dtype,
                       self.logger)
        if self.max_ema_accuracy is None or val['acc1'] > self.max_ema_accuracy:
            self.max_ema_accuracy = val['acc1']
        self.logger.info(f'Accuracy of the EMA model on the {val["n_images"]} test images: {val["acc1"]:.2f}%  '
                         f'Max EMA accuracy: {self.max_ema_accuracy:.2f}%')
        return {'ema_acc1': val['acc1'], 'ema_acc5': val['acc5'], 'ema_val_loss': val['val_loss'],
                'max_ema_acc1': self.max_ema_accuracy}

    def _record(self, record: dict) -> None:
        """Rank 0: the epoch's metrics line and scalars."""
        self.metrics.append(record)
        self.metrics.scalars(record['epoch'], {f'epoch/{k}': record.get(k) for k in
                                               ('train_loss', 'acc1', 'acc5', 'val_loss', 'img_per_s', 'lr')})
        self.metrics.flush()

    # --- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The checkpoint of this moment. Every rank calls it (it gathers every rank's RNG
        state and running loss, and ZeRO's optimizer state on rank 0); rank 0 gets the whole
        checkpoint, other ranks what they write themselves (with fsdp their shards)."""
        ranks = gather_objects({'rng': capture_rng(), 'loss_sum': float(self.loss_sum)})
        ema = self.ema.module.state_dict() if self.ema is not None else None
        if self.sharded:
            state = sharded_files.state_dicts(self.model, self.optimizer)
        else:
            parallel.gather_optimizer_state(self.optimizer)  # a collective; ZeRO's state is then rank 0's
            if experts := expert_names(self.model):  # Swin-MoE (ddp): every rank's experts into one file
                weights = gather_model_state(self.model.state_dict(), experts)
                moments = gather_optimizer_state(self.optimizer.state_dict(), self.model, self.optimizer, experts)
                ema = gather_model_state(ema, experts) if ema is not None else None
            if not self.ctx.is_main:
                return {}
            state = ({'model': weights, 'optimizer': moments} if experts else
                     {'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict()})
        state.update({'lr_scheduler': self.scheduler.state_dict(),
                      'scaler': self.scaler.state_dict() if self.scaler else None,
                      'epoch': self.epoch - 1, 'max_accuracy': self.max_accuracy, 'config': self.config.dump(),
                      'step': self.updates_done, 'world_size': self.ctx.world_size,
                      'effective_batch': self.effective_batch,
                      'accumulation_steps': self.config.TRAIN.ACCUMULATION_STEPS, 'ranks': ranks})
        if self.epoch_step:
            state['epoch_step'] = self.epoch_step
        if ema is not None:
            state['model_ema'] = ema
            state['max_ema_accuracy'] = self.max_ema_accuracy
        return state

    def load_state_dict(self, state: dict, source: str) -> None:
        """Every rank: continue from the training checkpoint `state` read from `source`:
        weights and optimizer state strictly, the scaler, the EMA, the best accuracies, and
        where training stands (on another setup: the same point in images seen)."""
        check_training_checkpoint(state, source)
        state = self._own_experts(state, source)
        load_model_and_optimizer(self.model, self.optimizer, state, source)
        if self.scaler is not None and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        self.epoch, self.resumed_from = int(state['epoch']) + 1, source
        self.max_accuracy, self.max_ema_accuracy = state.get('max_accuracy'), state.get('max_ema_accuracy')
        if self.ema is not None:
            self._load_ema(state.get('model_ema'), source)
        self._load_position(state)
        self.scheduler.step_update(schedule_position(self.updates_done))
        self.logger.info(f'resumed from {source}: continuing at epoch {self.epoch}'
                         + (f', micro-batch {self.epoch_step}' if self.epoch_step else ''))

    def _own_experts(self, state: dict, source: str) -> dict:
        """Swin-MoE: this rank's slice of the experts a checkpoint holds for all ranks."""
        experts = expert_names(self.model)
        if not experts or sharded_files.SHARDED in state:
            return state
        state = dict(state, model=own_model_state(state['model'], self.model, experts, source),
                     optimizer=own_optimizer_state(state['optimizer'], self.model, self.optimizer, experts, source))
        if state.get('model_ema') is not None:
            state['model_ema'] = own_model_state(state['model_ema'], self.model, experts, source)
        return state

    def _load_ema(self, weights: dict | None, source: str) -> None:
        if weights is None:  # the checkpoint had no EMA: the average starts from its weights
            self.ema.set(self.model)
        else:
            load_model_weights(self.ema.module, weights, f'{source} (model_ema)')
            self.logger.info(f'model EMA restored from {source}')

    def _load_position(self, state: dict) -> None:
        """The micro-step, running loss and RNG states to continue with. On the same setup
        (process count and effective batch) exactly those saved; otherwise the same share of
        the epoch's images, rounded down to a whole update, and each rank's own seeding."""
        ranks = state.get('ranks') or []
        same_setup = len(ranks) == self.ctx.world_size and state.get('effective_batch') == self.effective_batch
        done = int(state.get('epoch_step', 0))
        if same_setup:
            self.epoch_step = done
            self.loss_sum.fill_(ranks[self.ctx.rank]['loss_sum'] if done else 0.0)
            restore_rng(ranks[self.ctx.rank]['rng'])
            return
        images = done // int(state.get('accumulation_steps', 1)) * state['effective_batch']
        accum = self.config.TRAIN.ACCUMULATION_STEPS
        self.epoch_step = min(images // self.effective_batch, self.updates_per_epoch) * accum
        before = f"{len(ranks)} process(es), effective batch {state.get('effective_batch')}"
        self.logger.info(f'the setup changed ({before} -> {self.ctx.world_size} process(es), effective batch '
                         f'{self.effective_batch}): LRs scaled for the new batch, the schedule continues at the '
                         f'same point in images seen, each rank keeps its SEED + rank seeding')


def build_ema(config, model: nn.Module, logger) -> ModelEmaV3 | None:
    """TRAIN.EMA: a copy of the weights, averaged after every update; the decay follows the
    global update count. A resumed run continues the checkpoint's average."""
    ema = config.TRAIN.EMA
    if not ema.ENABLE:
        return None
    logger.info(f'model EMA (decay {ema.DECAY}, warmup {ema.WARMUP}) starts from the weights the run starts with')
    return ModelEmaV3(model, decay=ema.DECAY, use_warmup=ema.WARMUP)

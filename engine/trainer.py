"""The training part of a run: resume, the epoch loop, checkpoints (epoch, mid-epoch,
best), and stopping on a signal or after diverging, without ever losing a finished update.

A checkpoint's `epoch` is the last finished epoch (as officially); a mid-epoch checkpoint
adds `epoch_step`, the micro-batches of the next epoch already trained, and every rank's
running loss. Resuming either kind continues bit for bit on the same setup.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

from checkpoints import files as ckpt
from checkpoints import sharded as sharded_ckpt
from data import DevicePreprocessor
from distributed import parallel
from distributed.memory_report import estimate_memory, report_lines
from distributed.process_group import DistContext, broadcast_object, gather_objects
from engine import loops
from engine.metrics_log import MetricsLog
from engine.preemption import StopRequest
from lr_scheduler import build_scheduler, scaled_learning_rates
from models.adapt import load_pretrained
from optimizer import build_optimizer, describe_param_groups
from utils import EXIT_PREEMPTED, USER_ERRORS, ConfigError, DivergedError


@dataclass
class ResumePoint:
    """Where training continues: an epoch, micro-batches of it done, and what goes with them."""
    epoch: int
    step: int = 0
    loss_sum: float = 0.0
    max_accuracy: float | None = None
    rng: dict | None = None
    path: str | None = None
    ema: dict | None = None           # the checkpoint's EMA weights
    max_ema_accuracy: float | None = None


@dataclass
class Run:
    """What the loop and the checkpoint writer share."""
    config: Any
    ctx: DistContext
    model: nn.Module               # without DDP, never compiled (with fsdp: sharded): checkpoints are written from it
    optimizer: Any
    scheduler: Any
    scaler: Any
    n_updates: int                 # optimizer updates per epoch
    logger: Any
    metrics: MetricsLog | None = None
    max_accuracy: float | None = None
    ema: Any = None                # timm ModelEmaV3 when TRAIN.EMA.ENABLE
    max_ema_accuracy: float | None = None
    eval_model: nn.Module | None = None  # torch.compile(model) for validation with TRAIN.COMPILE

    @property
    def effective_batch(self) -> int:
        c = self.config
        return c.DATA.BATCH_SIZE * self.ctx.world_size * c.TRAIN.ACCUMULATION_STEPS

    @property
    def sharded(self) -> bool:
        """FSDP shards: checkpoints are torch.distributed.checkpoint folders."""
        return parallel.is_sharded(self.model)


def train(config, ctx: DistContext, model, loader_train, loader_val, mixup_fn, prep_val, amp_dtype, logger) -> int:
    """Train to TRAIN.EPOCHS (or to a stop); returns the exit code."""
    accum = config.TRAIN.ACCUMULATION_STEPS
    n_updates = loops.updates_per_epoch(len(loader_train), accum)
    if n_updates == 0:
        raise ConfigError(f'TRAIN.ACCUMULATION_STEPS {accum} is more than the {len(loader_train)} batches '
                          f'of an epoch; lower it or the batch size')
    if len(loader_train) % accum:
        logger.info(f'{len(loader_train) % accum} trailing batches per epoch are skipped: {len(loader_train)} '
                    f'batches do not divide into updates of {accum}')
    _scale_learning_rates(config, ctx, logger)
    frozen = model.freeze(config.TRAIN.FREEZE_STAGES, config.TRAIN.LINEAR_PROBE)
    if frozen:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info(f'frozen (not trained, kept in eval mode): {", ".join(frozen)}; {trainable:,} of '
                    f'{sum(p.numel() for p in model.parameters()):,} parameters train')
    for line in report_lines(estimate_memory(model, config, ctx.world_size, amp_dtype), ctx.device):
        logger.info(f'memory per process: {line}')
    path, state = _find_resume_on_main(config, ctx, logger)
    if not path and config.MODEL.PRETRAINED:  # into the full model, before any sharding
        load_pretrained(model, config.MODEL.PRETRAINED, logger, config.MODEL.PRETRAINED_CLASS_MAP)
    if config.TRAIN.PARALLEL == 'fsdp':
        offload = config.TRAIN.FSDP.CPU_OFFLOAD and ctx.device.type == 'cuda'
        parallel.shard_model(model, config, amp_dtype, offload)
        logger.info(f'FSDP: parameters, gradients and optimizer state sharded over {ctx.world_size} process(es), '
                    f'one unit per Swin block; gathered in {amp_dtype or torch.float32}, gradients reduced in '
                    f'{parallel.reduce_dtype(config, amp_dtype)}' + (', shards kept in CPU memory' if offload else ''))
        if config.TRAIN.FSDP.CPU_OFFLOAD and not offload:
            logger.info('TRAIN.FSDP.CPU_OFFLOAD has nothing to do: this run is on the CPU already')
    optimizer = parallel.shard_optimizer(build_optimizer(config, model), config, ctx)
    if parallel.is_zero(optimizer):
        logger.info(f'ZeRO: the optimizer state is sharded over {ctx.world_size} processes')
    for line in describe_param_groups(optimizer):
        logger.info(f'param group: {line}')
    run = Run(config, ctx, model, optimizer, build_scheduler(config, optimizer, n_updates),
              loops.make_scaler(amp_dtype, ctx.device), n_updates, logger)

    if path:
        if config.MODEL.PRETRAINED:
            logger.info(f'--pretrained {config.MODEL.PRETRAINED} is not used: the run resumes from {path}')
        point = _restore(run, state if state is not None else ckpt.read_checkpoint(path), path)
    else:
        point = ResumePoint(config.TRAIN.START_EPOCH)
    run.max_accuracy, run.max_ema_accuracy = point.max_accuracy, point.max_ema_accuracy
    run.ema = _build_ema(config, model, point, logger)
    point.ema = None  # loaded: no second copy of the weights held for the whole run
    start_update = point.epoch * n_updates + point.step // accum
    run.scheduler.step_update(start_update)
    if ctx.is_main:  # checkpoints after the start belong to a timeline this run abandons
        for path in ckpt.set_aside_later_checkpoints(config.OUTPUT, point.epoch - 1, start_update, keep=point.path):
            logger.info(f'renamed {path} to {os.path.basename(path)}.stale: the run restarts before it')
    if point.epoch >= config.TRAIN.EPOCHS:
        logger.info(f'nothing to train: the checkpoint finished epoch {point.epoch - 1} of {config.TRAIN.EPOCHS}')
        return 0

    ddp_model = parallel.training_module(model, config, ctx)
    # the DDP-wrapped module is compiled (as PyTorch recommends): the DDP optimizer then
    # splits the graph at the all-reduce buckets, so communication overlaps backward
    compiled = loops.compile_model(ddp_model, config, logger, 'training forward'
                                    + (' (DDP-wrapped)' if ddp_model is not model else ''))
    run.eval_model = loops.compile_model(model, config, logger, 'validation forward')
    run.metrics = MetricsLog(config.OUTPUT, ctx.is_main)
    parts = loops.TrainParts(config, ddp_model, optimizer, run.scheduler, run.scaler,
                              loops.build_criterion(config, mixup_fn is not None), mixup_fn,
                              DevicePreprocessor(config, ctx.device, is_train=True), ctx.device, amp_dtype,
                              ctx.world_size, logger, run.metrics,
                              loops.NonFiniteGuard(ctx.device, config.TRAIN.MAX_CONSECUTIVE_SKIPS), run.ema,
                              compiled)
    dropped = run.metrics.drop_epochs_from(point.epoch)
    if dropped:
        logger.info(f'metrics.jsonl: removed {dropped} line(s) of epochs >= {point.epoch}, which this run repeats')
    if point.rng is not None:
        ckpt.restore_rng(point.rng)

    stop = StopRequest(ctx.control_group)
    stop.install()
    try:
        return _epochs(run, parts, loader_train, loader_val, prep_val, amp_dtype, point, stop)
    finally:
        stop.uninstall()
        run.metrics.close()


def _epochs(run: Run, parts, loader_train, loader_val, prep_val, amp_dtype, point: ResumePoint,
            stop: StopRequest) -> int:
    config, ctx, logger = run.config, run.ctx, run.logger
    logger.info(f'start training: epoch {point.epoch} (micro-batch {point.step}) to {config.TRAIN.EPOCHS - 1}, '
                f'{run.n_updates} updates per epoch')
    began = time.perf_counter()
    for epoch in range(point.epoch, config.TRAIN.EPOCHS):
        start = loops.EpochStart(point.step, point.loss_sum) if epoch == point.epoch else loops.EpochStart()
        loader_train.sampler.set_epoch(epoch, start=start.step * config.DATA.BATCH_SIZE)

        def on_update(steps_done: int, updates_done: int, loss_sum) -> bool:
            stopping = stop.agreed()
            due = config.SAVE_STEP_FREQ and updates_done % config.SAVE_STEP_FREQ == 0
            if stopping or (due and updates_done % run.n_updates):  # the epoch's own checkpoint follows
                _save_mid_epoch(run, epoch, steps_done, updates_done, loss_sum.item())  # noqa: B023 (called now)
            return stopping

        stats = loops.train_one_epoch(parts, loader_train, epoch, start, on_update)
        if stats['stop'] == 'signal':
            logger.info(f'stopped by {stop.signal_name} after update {stats["updates"]}; the checkpoint holds '
                        f'every finished update; exit code {EXIT_PREEMPTED} (resume by running the same command)')
            return EXIT_PREEMPTED
        if stats['stop'] == 'diverged':
            _save_mid_epoch(run, epoch, stats['steps_done'], stats['updates'], stats['loss_sum'])
            raise DivergedError(stats['message'])

        scorer = run.model if run.eval_model is None else run.eval_model
        val = loops.validate(config, scorer, loader_val, prep_val, ctx.device, amp_dtype, logger)
        improved = run.max_accuracy is None or val['acc1'] > run.max_accuracy
        run.max_accuracy = val['acc1'] if improved else run.max_accuracy
        logger.info(f'Accuracy of the network on the {val["n_images"]} test images: {val["acc1"]:.2f}%  '
                    f'Max accuracy: {run.max_accuracy:.2f}%')
        record = {'epoch': epoch, 'train_loss': stats['train_loss'], 'acc1': val['acc1'], 'acc5': val['acc5'],
                  'val_loss': val['val_loss'], 'lr': stats['lr'], 'img_per_s': stats['img_per_s'],
                  'max_acc1': run.max_accuracy, 'n_images': val['n_images'], 'updates': stats['updates'],
                  'train_time': stats['train_time']}
        if run.ema is not None:
            record.update(_validate_ema(run, loader_val, prep_val, amp_dtype))
        stopping = stop.agreed()  # a signal during validation: this epoch's checkpoint is the last
        save_epoch = epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1 or stopping
        _on_every_rank(ctx, lambda: _record_metrics(run, record))  # noqa: B023 (called now)
        if save_epoch or improved:
            _save_epoch(run, record, gather_objects({'rng': ckpt.capture_rng(), 'loss_sum': 0.0}),
                        save_epoch, improved)
        if stopping and epoch < config.TRAIN.EPOCHS - 1:
            logger.info(f'stopped by {stop.signal_name} after epoch {epoch}; exit code {EXIT_PREEMPTED}')
            return EXIT_PREEMPTED
    total = datetime.timedelta(seconds=int(time.perf_counter() - began))
    logger.info(f'Training time {total}; max accuracy {run.max_accuracy:.2f}%')
    return 0


def _build_ema(config, model: nn.Module, point: ResumePoint, logger) -> ModelEmaV3 | None:
    """TRAIN.EMA: a copy of the (loaded) weights, averaged after every update; a resumed run
    continues the checkpoint's average. The decay follows the global update count."""
    if not config.TRAIN.EMA.ENABLE:
        return None
    ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY, use_warmup=config.TRAIN.EMA.WARMUP)
    if point.ema is not None:
        ckpt.load_model_weights(ema.module, ckpt.model_state_dict(point.ema), f'{point.path} (model_ema)')
        logger.info(f'model EMA restored from {point.path}')
    else:
        start = f'the weights of {point.path}' if point.path else 'the initial weights'
        logger.info(f'model EMA (decay {config.TRAIN.EMA.DECAY}, warmup {config.TRAIN.EMA.WARMUP}) starts from {start}')
    return ema


def _validate_ema(run: Run, loader_val, prep_val, amp_dtype) -> dict:
    """Score the EMA weights like the model; the metrics line gets them beside the model's."""
    val = loops.validate(run.config, run.ema.module, loader_val, prep_val, run.ctx.device, amp_dtype, run.logger)
    if run.max_ema_accuracy is None or val['acc1'] > run.max_ema_accuracy:
        run.max_ema_accuracy = val['acc1']
    run.logger.info(f'Accuracy of the EMA model on the {val["n_images"]} test images: {val["acc1"]:.2f}%  '
                    f'Max EMA accuracy: {run.max_ema_accuracy:.2f}%')
    return {'ema_acc1': val['acc1'], 'ema_acc5': val['acc5'], 'ema_val_loss': val['val_loss'],
            'max_ema_acc1': run.max_ema_accuracy}


def _scale_learning_rates(config, ctx: DistContext, logger) -> None:
    s = scaled_learning_rates(config, ctx.world_size)
    logger.info(f'effective batch {s["effective_batch"]} = {config.DATA.BATCH_SIZE} per process x '
                f'{ctx.world_size} processes x {config.TRAIN.ACCUMULATION_STEPS} accumulation steps; '
                f'LR scaling {config.TRAIN.LR_SCALING} (x{s["factor"]:.4g}): BASE_LR {s["base_lr"]:.4g}, '
                f'WARMUP_LR {s["warmup_lr"]:.4g}, MIN_LR {s["min_lr"]:.4g}')
    config.defrost()
    config.TRAIN.BASE_LR, config.TRAIN.WARMUP_LR, config.TRAIN.MIN_LR = s['base_lr'], s['warmup_lr'], s['min_lr']
    config.freeze()


# --- resume -------------------------------------------------------------------------------

def _find_resume(config, logger) -> tuple[str | None, dict | None]:
    """--resume wins over auto-resume (and the log says so); else the newest readable
    checkpoint in the output folder when TRAIN.AUTO_RESUME is on. Returns the path and,
    when auto-resume already read it, its contents."""
    if config.MODEL.RESUME:
        if config.TRAIN.AUTO_RESUME:
            newest = ckpt.resume_candidates(config.OUTPUT)
            if newest and os.path.abspath(newest[0]) != os.path.abspath(config.MODEL.RESUME):
                logger.info(f'--resume {config.MODEL.RESUME} is used; auto-resume would have taken {newest[0]}')
        return config.MODEL.RESUME, None
    found = ckpt.newest_readable_checkpoint(config.OUTPUT, logger) if config.TRAIN.AUTO_RESUME else None
    if found:
        logger.info(f'auto-resume: newest checkpoint in the output folder is {found[0]}')
        return found
    return None, None


def _find_resume_on_main(config, ctx: DistContext, logger) -> tuple[str | None, dict | None]:
    """Rank 0 decides where to resume from; every rank gets the path (rank 0 also the
    contents it already read)."""
    path, state, refusal = None, None, None
    if ctx.is_main:
        path, state = _find_resume(config, logger)
        refusal = None if (path or config.TRAIN.AUTO_RESUME) else _other_run_in(config.OUTPUT)
    path, refusal = broadcast_object((path, refusal))
    if refusal:
        raise ConfigError(refusal)
    return path, state


def _other_run_in(folder: str) -> str | None:
    """Why a fresh start (auto-resume off) must not write into `folder`, if it holds a run."""
    found = ckpt.resume_candidates(folder)
    if not found:
        return None
    return (f"output folder '{folder}' already holds checkpoints of a run ({os.path.basename(found[0])}); "
            f"resume it (TRAIN.AUTO_RESUME True, or --resume), or start this one under another --tag or --output")


def _restore(run: Run, state: dict, path: str) -> ResumePoint:
    """Load a training checkpoint strictly and say where to continue."""
    ctx, logger = run.ctx, run.logger
    sharded = sharded_ckpt.SHARDED in state
    missing = [k for k in (() if sharded else ('model', 'optimizer')) + ('epoch',) if k not in state]
    if missing:
        raise ckpt.CheckpointError(f"'{path}' is not a training checkpoint (no {', '.join(missing)}); "
                                   f"to start from its weights use --pretrained")
    _load_training_state(run, state, path, sharded)
    if run.scaler is not None and state.get('scaler'):
        run.scaler.load_state_dict(state['scaler'])
    point = ResumePoint(int(state['epoch']) + 1, max_accuracy=state.get('max_accuracy'), path=path,
                        ema=state.get('model_ema'), max_ema_accuracy=state.get('max_ema_accuracy'))
    ranks = state.get('ranks') or []
    same_setup = len(ranks) == ctx.world_size and state.get('effective_batch') == run.effective_batch
    if state.get('epoch_step'):
        point.step = _continue_inside_epoch(run, state, same_setup)
        if same_setup:
            point.loss_sum = ranks[ctx.rank]['loss_sum']
    if same_setup:
        point.rng = ranks[ctx.rank]['rng']
    else:
        before = f"{len(ranks)} process(es), effective batch {state.get('effective_batch')}"
        logger.info(f'the setup changed ({before} -> {ctx.world_size} process(es), effective batch '
                    f'{run.effective_batch}): LRs scaled for the new batch, the schedule continues at the same '
                    f'point in images seen, each rank keeps its SEED + rank seeding')
    logger.info(f'resumed from {path}: continuing at epoch {point.epoch}'
                + (f', micro-batch {point.step}' if point.step else ''))
    return point


def _continue_inside_epoch(run: Run, state: dict, same_setup: bool) -> int:
    """Micro-batches of the interrupted epoch to skip: the same count on the same setup,
    else the same share of the epoch's images rounded down to a whole update."""
    done = int(state['epoch_step'])
    if same_setup:
        return done
    images = done // int(state.get('accumulation_steps', 1)) * state['effective_batch']
    return min(images // run.effective_batch, run.n_updates) * run.config.TRAIN.ACCUMULATION_STEPS


def _load_training_state(run: Run, state: dict, path: str, sharded: bool) -> None:
    """Weights and optimizer state, from a file or a sharded folder, into this run's model
    (full or sharded) and optimizer (plain or ZeRO); the hyperparameters (betas, weight
    decay, momentum...) stay the config's."""
    optimizer = run.optimizer
    current = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
    if sharded:
        if parallel.is_zero(optimizer):
            raise ckpt.CheckpointError(f"'{path}' is a sharded (fsdp) checkpoint; resume it with TRAIN.PARALLEL "
                                       f"fsdp or ddp, not zero")
        sharded_ckpt.load_training_state(path, run.model, optimizer)
    else:
        saved = state['optimizer']
        if [set(g) - {'params'} for g in saved.get('param_groups', [])] != [set(g) for g in current]:
            raise ckpt.CheckpointError(f"the optimizer state in '{path}' is from another optimizer or parameter "
                                       f"grouping than TRAIN.OPTIMIZER / TRAIN.LAYER_DECAY now give")
        if run.sharded:
            sharded_ckpt.load_full_training_state(path, run.model, optimizer,
                                                        ckpt.model_state_dict(state), saved)
        else:
            ckpt.load_model_weights(run.model, ckpt.model_state_dict(state), path)
            try:
                optimizer.load_state_dict(saved)
            except (ValueError, KeyError) as e:
                raise ckpt.CheckpointError(f"the optimizer state in '{path}' does not fit this model "
                                           f"({str(e).splitlines()[0]})") from None
    for group, settings in zip(optimizer.param_groups, current):
        group.update(settings)


# --- saving ---------------------------------------------------------------------------------

def _on_every_rank(ctx: DistContext, rank0_work) -> None:
    """Run rank 0's writes and raise their one-line error on every rank, so no rank carries
    on into a collective that rank 0 will never join."""
    message = None
    if ctx.is_main:
        try:
            rank0_work()
        except USER_ERRORS as e:
            message = str(e)
    message = broadcast_object(message)
    if message is not None:
        raise ckpt.OutputError(message)


def _state(run: Run, finished_epoch: int, updates: int, ranks: list, epoch_step: int = 0) -> dict:
    """What a checkpoint holds. Rank 0 only (ZeRO's optimizer state is gathered there);
    for a sharded checkpoint only the part besides the model and optimizer tensors."""
    config = run.config
    state = {'lr_scheduler': run.scheduler.state_dict(),
             'scaler': run.scaler.state_dict() if run.scaler else None,
             'epoch': finished_epoch, 'max_accuracy': run.max_accuracy, 'config': config.dump(),
             'step': updates, 'world_size': run.ctx.world_size, 'effective_batch': run.effective_batch,
             'accumulation_steps': config.TRAIN.ACCUMULATION_STEPS, 'ranks': ranks}
    if not run.sharded:
        state.update({'model': run.model.state_dict(), 'optimizer': run.optimizer.state_dict()})
    if epoch_step:
        state['epoch_step'] = epoch_step
    if run.ema is not None:
        state['model_ema'] = run.ema.module.state_dict()
        state['max_ema_accuracy'] = run.max_ema_accuracy
    return state


def _write(run: Run, path: str, build_state) -> None:
    """Every rank: write the checkpoint `build_state()` describes to `path`: one file from
    rank 0, or with FSDP a folder each rank writes its shards into."""
    if run.sharded:
        meta = build_state() if run.ctx.is_main else None
        sharded_ckpt.save(path, run.model, run.optimizer, meta, run.ctx)
        return
    parallel.gather_optimizer_state(run.optimizer)
    _on_every_rank(run.ctx, lambda: ckpt.atomic_save(build_state(), path))


def _save_mid_epoch(run: Run, epoch: int, steps_done: int, updates: int, loss_sum: float) -> None:
    """Every rank: a checkpoint inside `epoch` after `steps_done` micro-batches."""
    ranks = gather_objects({'rng': ckpt.capture_rng(), 'loss_sum': loss_sum})
    path = os.path.join(run.config.OUTPUT, ckpt.step_checkpoint_name(updates, run.sharded))
    _write(run, path, lambda: _state(run, epoch - 1, updates, ranks, epoch_step=steps_done))

    def settle() -> None:
        ckpt.mark_latest(run.config.OUTPUT, path)
        ckpt.prune_step_checkpoints(run.config.OUTPUT, keep_from=updates)
        run.logger.info(f'saved {path} (epoch {epoch}, micro-batch {steps_done})')
    _on_every_rank(run.ctx, settle)


def _record_metrics(run: Run, record: dict) -> None:
    """Rank 0: the epoch's metrics line and scalars."""
    run.metrics.append(record)
    run.metrics.scalars(record['epoch'], {f'epoch/{k}': record[k] for k in
                                          ('train_loss', 'acc1', 'acc5', 'val_loss', 'img_per_s', 'lr')})
    run.metrics.flush()


def _save_epoch(run: Run, record: dict, ranks: list, save_epoch: bool, improved: bool) -> None:
    """Every rank: the epoch checkpoint (every SAVE_FREQ epochs, the last, or when stopping)
    and the best one when validation improved, all atomic."""
    config, logger = run.config, run.logger
    epoch = record['epoch']
    best = os.path.join(config.OUTPUT, ckpt.best_name(run.sharded))
    build = lambda: _state(run, epoch, record['updates'], ranks)  # noqa: E731
    if not save_epoch:
        _write(run, best, build)
        _on_every_rank(run.ctx, lambda: ckpt.remove_other_best(config.OUTPUT, run.sharded))
        logger.info(f'saved {best} (top-1 {run.max_accuracy:.2f}%)')
        return
    path = os.path.join(config.OUTPUT, ckpt.epoch_checkpoint_name(epoch, run.sharded))
    _write(run, path, build)

    def settle() -> None:
        ckpt.mark_latest(config.OUTPUT, path)
        ckpt.prune_step_checkpoints(config.OUTPUT, keep_from=record['updates'] + 1)
        logger.info(f'saved {path}')
        if improved:
            ckpt.atomic_link(path, best)
            ckpt.remove_other_best(config.OUTPUT, run.sharded)
            logger.info(f'saved {best} (top-1 {run.max_accuracy:.2f}%)')
        for old in ckpt.prune_checkpoints(config.OUTPUT, config.SAVE_KEEP_LAST, epoch):
            logger.info(f'removed {old} (SAVE_KEEP_LAST {config.SAVE_KEEP_LAST})')
    _on_every_rank(run.ctx, settle)

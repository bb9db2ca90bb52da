"""One run from a validated config: process group, output folder, data, model, then the
requested mode (training epochs with checkpoints, --eval, or --throughput).

User mistakes found here (data, checkpoints, output folder) raise one-line errors that
`run` turns into exit code 2; under torchrun the launcher then stops the other ranks.
"""
from __future__ import annotations

import datetime
import os
import platform
import random
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torchvision
import timm

import checkpoint as ckpt
import engine
from config import ConfigError, set_key
from data import DataError, DevicePreprocessor, build_loader
from distributed import (DistContext, barrier, broadcast_object, gather_objects, init_distributed, shutdown,
                         wrap_ddp)
from logger import create_logger
from lr_scheduler import build_scheduler, scaled_learning_rates
from metrics_log import MetricsLog
from models import build_model
from optimizer import build_optimizer, describe_param_groups

USER_ERRORS = (ConfigError, DataError, ckpt.CheckpointError, ckpt.OutputError)


def run(config) -> int:
    """Run `config` in this process; returns the exit code (0, or 2 after a user mistake)."""
    try:
        ctx = init_distributed()
        code = _run(config, ctx)
    except USER_ERRORS as e:
        rank = int(os.environ.get('RANK', 0))
        where = f' (rank {rank})' if int(os.environ.get('WORLD_SIZE', 1)) > 1 else ''
        print(f'error{where}: {e}', file=sys.stderr)
        # no orderly shutdown: peers may sit in a collective that would never finish (the
        # launcher stops them once this process exits)
        return 2
    shutdown()
    return code


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_output_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f'.write-test-{os.getpid()}')
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"output folder '{folder}' is not writable ({e.strerror}); "
                          f"choose another with --output") from None


def _prepare_builtin_data(config, ctx: DistContext, logger) -> None:
    """DATA.PREPARE: write the built-in dataset once per node before anyone reads it (every
    rank takes the barrier: whether to wait must not depend on what a rank sees on disk)."""
    if not config.DATA.PREPARE:
        return
    if ctx.local_rank == 0 and not os.path.exists(config.DATA.DATA_PATH):
        from data.prepare import prepare_dataset
        try:
            prepare_dataset(config.DATA.PREPARE, config.DATA.DATA_PATH, logger)
        except OSError as e:
            raise DataError(f"cannot write the {config.DATA.PREPARE} dataset to '{config.DATA.DATA_PATH}' "
                            f"({e.strerror or e}); pass --data-path to a writable folder") from None
    barrier()


def _write_config(config) -> None:
    path = os.path.join(config.OUTPUT, 'config.yaml')
    ckpt.atomic_write_text(config.dump(), path)


def _log_environment(config, ctx: DistContext, logger, amp_note: str) -> None:
    device = ctx.device
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'
    logger.info(f'python {platform.python_version()}, torch {torch.__version__}, torchvision '
                f'{torchvision.__version__}, timm {timm.__version__}'
                + (f', CUDA {torch.version.cuda}' if device.type == 'cuda' else ''))
    logger.info(f'world size {ctx.world_size}, rank {ctx.rank}, device {device} ({name}), '
                f'{torch.get_num_threads()} CPU threads, precision: {amp_note}')


def _set_keys(config, values: dict) -> None:
    config.defrost()
    for key, value in values.items():
        set_key(config, key, value)
    config.freeze()


def _run(config, ctx: DistContext) -> int:
    seed_everything(config.SEED + ctx.rank)
    _check_output_writable(config.OUTPUT)
    logger = create_logger(config.OUTPUT, ctx.rank, config.MODEL.NAME)
    if ctx.is_main:
        for name in ckpt.remove_stale_temporaries(config.OUTPUT):
            logger.info(f'removed {name}, a temporary file left by a process killed while writing')
    amp_dtype, amp_note = engine.resolve_amp_dtype(config, ctx.device)
    _log_environment(config, ctx, logger, amp_note)

    if config.THROUGHPUT_MODE:
        model = _build_model(config, ctx, logger)
        if ctx.is_main:
            _write_config(config)
        engine.throughput(model, config, ctx.device, amp_dtype, logger)
        return 0

    _prepare_builtin_data(config, ctx, logger)
    _, dataset_val, loader_train, loader_val, mixup_fn = build_loader(config, ctx.rank, ctx.world_size, logger)
    if ctx.is_main:  # after the data set MODEL.NUM_CLASSES; LRs as given (before batch scaling)
        _write_config(config)
        logger.info(f'config written to {os.path.join(config.OUTPUT, "config.yaml")}')
    model = _build_model(config, ctx, logger)
    prep_val = DevicePreprocessor(config, ctx.device, is_train=False)

    if config.EVAL_MODE:
        return _evaluate_only(config, ctx, model, loader_val, prep_val, amp_dtype, logger)
    return _train(config, ctx, model, loader_train, loader_val, mixup_fn, prep_val, amp_dtype, logger)


def _build_model(config, ctx: DistContext, logger) -> nn.Module:
    model = build_model(config).to(ctx.device)
    n_params = sum(p.numel() for p in model.parameters())
    flops = f', {model.flops() / 1e9:.2f} GFLOPs' if hasattr(model, 'flops') else ''
    logger.info(f'model {config.MODEL.NAME}: {n_params / 1e6:.2f}M parameters{flops} at '
                f'{config.DATA.IMG_SIZE}px, {config.MODEL.NUM_CLASSES} classes')
    return model


def _evaluate_only(config, ctx: DistContext, model, loader_val, prep_val, amp_dtype, logger) -> int:
    """--eval: score the weights of --resume (or --pretrained) on the validation split."""
    path = config.MODEL.RESUME or config.MODEL.PRETRAINED
    checkpoint = ckpt.read_checkpoint(path)
    ckpt.load_model_weights(model, ckpt.model_state_dict(checkpoint), path)
    logger.info(f'evaluating weights from {path}')
    result = engine.validate(config, model, loader_val, prep_val, ctx.device, amp_dtype, logger)
    logger.info(f'Accuracy of the network on the {result["n_images"]} test images: '
                f'top-1 {result["acc1"]:.2f}%  top-5 {result["acc5"]:.2f}%')
    metrics = MetricsLog(config.OUTPUT, ctx.is_main, tensorboard=False)
    epoch = checkpoint.get('epoch')
    metrics.append({'mode': 'eval', 'epoch': epoch if isinstance(epoch, int) else None,
                    'checkpoint': os.path.abspath(path), 'acc1': result['acc1'], 'acc5': result['acc5'],
                    'val_loss': result['val_loss'], 'n_images': result['n_images'], 'train_loss': None,
                    'lr': None, 'img_per_s': result['n_images'] / max(result['val_time'], 1e-9)})
    return 0


def _scale_learning_rates(config, ctx: DistContext, logger) -> None:
    s = scaled_learning_rates(config, ctx.world_size)
    logger.info(f'effective batch {s["effective_batch"]} = {config.DATA.BATCH_SIZE} per process x '
                f'{ctx.world_size} processes x {config.TRAIN.ACCUMULATION_STEPS} accumulation steps; '
                f'LR scaling {config.TRAIN.LR_SCALING} (x{s["factor"]:.4g}): BASE_LR {s["base_lr"]:.4g}, '
                f'WARMUP_LR {s["warmup_lr"]:.4g}, MIN_LR {s["min_lr"]:.4g}')
    _set_keys(config, {'TRAIN.BASE_LR': s['base_lr'], 'TRAIN.WARMUP_LR': s['warmup_lr'],
                       'TRAIN.MIN_LR': s['min_lr']})


def _find_resume(config, logger) -> tuple[Optional[str], Optional[dict]]:
    """--resume wins over auto-resume (and the log says so); else the newest readable
    checkpoint in the output folder when TRAIN.AUTO_RESUME is on. Returns the path and,
    when auto-resume already read it, its contents."""
    if config.MODEL.RESUME:
        if config.TRAIN.AUTO_RESUME:
            newest = ckpt.epoch_checkpoints(config.OUTPUT)
            if newest and os.path.abspath(newest[-1][1]) != os.path.abspath(config.MODEL.RESUME):
                logger.info(f'--resume {config.MODEL.RESUME} is used; auto-resume would have taken {newest[-1][1]}')
        return config.MODEL.RESUME, None
    found = ckpt.newest_readable_checkpoint(config.OUTPUT, logger) if config.TRAIN.AUTO_RESUME else None
    if found:
        logger.info(f'auto-resume: newest checkpoint in the output folder is {found[0]}')
        return found
    return None, None


def _train(config, ctx: DistContext, model, loader_train, loader_val, mixup_fn, prep_val, amp_dtype, logger) -> int:
    accum = config.TRAIN.ACCUMULATION_STEPS
    n_updates = engine.updates_per_epoch(len(loader_train), accum)
    if n_updates == 0:
        raise ConfigError(f'TRAIN.ACCUMULATION_STEPS {accum} is more than the {len(loader_train)} batches '
                          f'of an epoch; lower it or the batch size')
    if len(loader_train) % accum:
        logger.info(f'{len(loader_train) % accum} trailing batches per epoch are skipped: {len(loader_train)} '
                    f'batches do not divide into updates of {accum}')
    _scale_learning_rates(config, ctx, logger)

    optimizer = build_optimizer(config, model)
    for line in describe_param_groups(optimizer):
        logger.info(f'param group: {line}')
    scheduler = build_scheduler(config, optimizer, n_updates)
    scaler = engine.make_scaler(amp_dtype, ctx.device)
    start_epoch, max_accuracy, rng = config.TRAIN.START_EPOCH, None, None

    resume_path, state = _find_resume(config, logger) if ctx.is_main else (None, None)
    resume_path = broadcast_object(resume_path)
    if resume_path:
        if config.MODEL.PRETRAINED:
            logger.info(f'--pretrained {config.MODEL.PRETRAINED} is not used: the run resumes from {resume_path}')
        state = state if state is not None else ckpt.read_checkpoint(resume_path)
        start_epoch, max_accuracy, rng = _restore(state, resume_path, config, ctx, model, optimizer,
                                                  scaler, n_updates, logger)
        del state
    elif config.MODEL.PRETRAINED:
        ckpt.load_model_weights(model, ckpt.model_state_dict(ckpt.read_checkpoint(config.MODEL.PRETRAINED)),
                                config.MODEL.PRETRAINED)
        logger.info(f'started from the weights of {config.MODEL.PRETRAINED}')
    scheduler.step_update(start_epoch * n_updates)
    if ctx.is_main:  # epoch checkpoints after the start belong to a timeline this run abandons
        for path in ckpt.set_aside_later_checkpoints(config.OUTPUT, start_epoch - 1):
            logger.info(f'renamed {path} to {os.path.basename(path)}.stale: the run restarts before it')

    model_without_ddp = model
    if ctx.distributed:
        model = wrap_ddp(model, ctx.device)
    if start_epoch >= config.TRAIN.EPOCHS:
        logger.info(f'nothing to train: the checkpoint finished epoch {start_epoch - 1} of {config.TRAIN.EPOCHS}')
        return 0
    metrics = MetricsLog(config.OUTPUT, ctx.is_main)
    parts = engine.TrainParts(config, model, optimizer, scheduler, scaler,
                              engine.build_criterion(config, mixup_fn is not None), mixup_fn,
                              DevicePreprocessor(config, ctx.device, is_train=True), ctx.device, amp_dtype,
                              ctx.world_size, logger, metrics)
    dropped = metrics.drop_epochs_from(start_epoch)
    if dropped:
        logger.info(f'metrics.jsonl: removed {dropped} line(s) of epochs >= {start_epoch}, which this run repeats')
    if rng is not None:
        ckpt.restore_rng(rng)

    logger.info(f'start training: epochs {start_epoch}..{config.TRAIN.EPOCHS - 1}, {n_updates} updates per epoch')
    start = time.perf_counter()
    for epoch in range(start_epoch, config.TRAIN.EPOCHS):
        loader_train.sampler.set_epoch(epoch)
        stats = engine.train_one_epoch(parts, loader_train, epoch)
        val = engine.validate(config, model_without_ddp, loader_val, prep_val, ctx.device, amp_dtype, logger)
        improved = max_accuracy is None or val['acc1'] > max_accuracy
        max_accuracy = val['acc1'] if improved else max_accuracy
        logger.info(f'Accuracy of the network on the {val["n_images"]} test images: {val["acc1"]:.2f}%  '
                    f'Max accuracy: {max_accuracy:.2f}%')
        record = {'epoch': epoch, 'train_loss': stats['train_loss'], 'acc1': val['acc1'], 'acc5': val['acc5'],
                  'val_loss': val['val_loss'], 'lr': stats['lr'], 'img_per_s': stats['img_per_s'],
                  'max_acc1': max_accuracy, 'n_images': val['n_images'], 'updates': stats['updates'],
                  'train_time': stats['train_time']}
        save_epoch = epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1
        rng = gather_objects(ckpt.capture_rng()) if (save_epoch or improved) else None
        _on_every_rank(ctx, lambda: _record_epoch(config, ctx, record, metrics, model_without_ddp, optimizer,
                                                  scheduler, scaler, rng, save_epoch, improved, logger))
    metrics.close()
    total = datetime.timedelta(seconds=int(time.perf_counter() - start))
    logger.info(f'Training time {total}; max accuracy {max_accuracy:.2f}%')
    return 0



def _restore(state: dict, path: str, config, ctx: DistContext, model, optimizer, scaler, n_updates: int, logger):
    """Load a training checkpoint strictly; returns (start epoch, max accuracy, this rank's
    RNG state or None)."""
    missing = [k for k in ('model', 'optimizer', 'epoch') if k not in state]
    if missing:
        raise ckpt.CheckpointError(f"'{path}' is not a training checkpoint (no {', '.join(missing)}); "
                                   f"to start from its weights use --pretrained")
    ckpt.load_model_weights(model, ckpt.model_state_dict(state), path)
    _load_optimizer_state(optimizer, state['optimizer'], path)
    if scaler is not None and state.get('scaler'):
        scaler.load_state_dict(state['scaler'])
    start_epoch = int(state['epoch']) + 1
    saved_updates = (state.get('lr_scheduler') or {}).get('num_updates')
    if saved_updates is not None and saved_updates != start_epoch * n_updates:
        logger.info(f'LR schedule position recomputed for this setup: update {start_epoch * n_updates} '
                    f'(the checkpoint counted {saved_updates})')
    effective = config.DATA.BATCH_SIZE * ctx.world_size * config.TRAIN.ACCUMULATION_STEPS
    before = state.get('effective_batch')
    if before is not None and before != effective:
        logger.info(f'the effective batch changed from {before} to {effective}: the LRs are scaled for the '
                    f'new batch and the schedule continues at epoch {start_epoch} ({n_updates} updates per epoch)')
    rngs = state.get('rng') or []
    rng = rngs[ctx.rank] if len(rngs) == ctx.world_size else None
    if rng is None:
        logger.info(f'random states of {len(rngs)} process(es) in the checkpoint, {ctx.world_size} now: '
                    f'each rank keeps its SEED + rank seeding')
    logger.info(f'resumed from {path}: epoch {state["epoch"]} done, continuing at epoch {start_epoch}')
    return start_epoch, state.get('max_accuracy'), rng


def _load_optimizer_state(optimizer, saved: dict, path: str) -> None:
    """Restore the moments and step counts; the hyperparameters (betas, weight decay,
    momentum...) stay the config's. Another optimizer type is refused in one line."""
    current = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
    saved_keys = [set(g) - {'params'} for g in saved.get('param_groups', [])]
    if saved_keys != [set(g) for g in current]:
        raise ckpt.CheckpointError(f"the optimizer state in '{path}' is from another optimizer or parameter "
                                   f"grouping than TRAIN.OPTIMIZER / TRAIN.LAYER_DECAY now give")
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError) as e:
        raise ckpt.CheckpointError(f"the optimizer state in '{path}' does not fit this model "
                                   f"({str(e).splitlines()[0]})") from None
    for group, settings in zip(optimizer.param_groups, current):
        group.update(settings)


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


def _record_epoch(config, ctx: DistContext, record: dict, metrics: MetricsLog, model, optimizer, scheduler,
                  scaler, rng: Optional[list], save_epoch: bool, improved: bool, logger) -> None:
    """Rank 0: the metrics line and scalars, the epoch checkpoint (every SAVE_FREQ epochs and
    the last) and best.pth when validation improved, all written atomically."""
    metrics.append(record)
    metrics.scalars(record['epoch'], {f'epoch/{k}': record[k] for k in
                                      ('train_loss', 'acc1', 'acc5', 'val_loss', 'img_per_s', 'lr')})
    metrics.flush()
    if not (save_epoch or improved):
        return
    epoch, max_accuracy = record['epoch'], record['max_acc1']
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
             'lr_scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict() if scaler else None,
             'epoch': epoch, 'max_accuracy': max_accuracy, 'config': config.dump(), 'step': record['updates'],
             'optimizer_name': config.TRAIN.OPTIMIZER.NAME, 'world_size': ctx.world_size,
             'effective_batch': config.DATA.BATCH_SIZE * ctx.world_size * config.TRAIN.ACCUMULATION_STEPS,
             'rng': rng}
    best = os.path.join(config.OUTPUT, ckpt.BEST_FILE)
    if save_epoch:
        path = os.path.join(config.OUTPUT, ckpt.epoch_checkpoint_name(epoch))
        ckpt.atomic_save(state, path)
        logger.info(f'saved {path}')
        if improved:
            ckpt.atomic_link(path, best)
        for old in ckpt.prune_checkpoints(config.OUTPUT, config.SAVE_KEEP_LAST, epoch):
            logger.info(f'removed {old} (SAVE_KEEP_LAST {config.SAVE_KEEP_LAST})')
    elif improved:
        ckpt.atomic_save(state, best)
    if improved:
        logger.info(f'saved {best} (top-1 {max_accuracy:.2f}%)')

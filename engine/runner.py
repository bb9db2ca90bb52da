"""One run from a validated config: process group, output folder, data, model, then the
requested mode (training epochs with checkpoints, --eval, or --throughput).

User mistakes found here (data, checkpoints, output folder) raise one-line errors that
`run` turns into exit code 2; under torchrun the launcher then stops the other ranks.
"""
from __future__ import annotations

import fcntl
import os
import platform

import timm
import torch
import torch.nn as nn
import torchvision

from checkpoints.checkpointer import Checkpointer
from checkpoints.folder import remove_stale_temporaries
from checkpoints.reading import load_pretrained, read_checkpoint
from data import DevicePreprocessor, build_datasets, build_loaders, data_num_classes
from distributed.parallel import check_supported
from distributed.process_group import DistContext, barrier, init_distributed, shutdown
from logger import create_logger
from lr_scheduler import scaled_learning_rates
from models import build_model
from utils import (
    EXIT_DIVERGED,
    EXIT_USER_ERROR,
    USER_ERRORS,
    ConfigError,
    DataError,
    DivergedError,
    atomic_write_text,
    report_error,
    seed_everything,
)

from .amp import resolve_amp_dtype, set_fp32_matmul_math
from .evaluation import evaluate
from .loops import compile_model, throughput
from .trainer import Trainer


def run(config) -> int:
    """Run `config` in this process; returns the exit code (0, or 2 after a user mistake)."""
    lock = None
    try:
        check_supported(config)
        sharding = config.TRAIN.PARALLEL == 'fsdp' and not (config.EVAL_MODE or config.THROUGHPUT_MODE)
        ctx = init_distributed(group_of_one=sharding, cpu_collectives=sharding and config.TRAIN.FSDP.CPU_OFFLOAD)
        _check_output_writable(config.OUTPUT)
        lock = _claim_output(config.OUTPUT) if ctx.is_main else None
        code = _run(config, ctx)
    except (USER_ERRORS + (DivergedError,)) as e:
        report_error(str(e))
        # no orderly shutdown: peers may sit in a collective that would never finish (the
        # launcher stops them once this process exits)
        return EXIT_DIVERGED if isinstance(e, DivergedError) else EXIT_USER_ERROR
    finally:
        if lock is not None:
            lock.close()  # releases the flock
    shutdown()
    return code


def _claim_output(folder: str):
    """Hold an exclusive lock on the output folder for the whole run, so a second run
    started into it by mistake stops at once instead of mixing files (the lock dies with
    the process, so a restarted run gets it)."""
    handle = open(os.path.join(folder, '.lock'), 'a+')
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or 'unknown'
        handle.close()
        raise ConfigError(f"another run (pid {owner}) is using the output folder '{folder}'; wait for it, "
                          f"or give this one another --tag or --output") from None
    handle.truncate(0)
    handle.write(f'{os.getpid()}\n')
    handle.flush()
    return handle


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


def _log_environment(ctx: DistContext, logger, amp_note: str) -> None:
    device = ctx.device
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'
    logger.info(f'python {platform.python_version()}, torch {torch.__version__}, torchvision '
                f'{torchvision.__version__}, timm {timm.__version__}'
                + (f', CUDA {torch.version.cuda}' if device.type == 'cuda' else ''))
    logger.info(f'world size {ctx.world_size}, rank {ctx.rank}, device {device} ({name}), '
                f'{torch.get_num_threads()} CPU threads, precision: {amp_note}')


def settle_config(config, world_size: int, num_classes: int, logger):
    """The run's config, complete before anything uses it: MODEL.NUM_CLASSES from the data
    and, for training, the learning rates scaled for the effective batch (TRAIN.LR_SCALING,
    the official rule by default), as the official code settles them. A new frozen config:
    config.yaml and every checkpoint's `config` hold exactly these values."""
    settled = config.clone()
    settled.defrost()
    if num_classes != config.MODEL.NUM_CLASSES:
        logger.info(f'MODEL.NUM_CLASSES set to {num_classes} from the data (the config said '
                    f'{config.MODEL.NUM_CLASSES})')
    settled.MODEL.NUM_CLASSES = num_classes
    if not (config.EVAL_MODE or config.THROUGHPUT_MODE):
        s = scaled_learning_rates(config, world_size)
        logger.info(f'effective batch {s["effective_batch"]} = {config.DATA.BATCH_SIZE} per process x '
                    f'{world_size} processes x {config.TRAIN.ACCUMULATION_STEPS} accumulation steps; LR scaling '
                    f'{config.TRAIN.LR_SCALING} (x{s["factor"]:.4g}): BASE_LR {config.TRAIN.BASE_LR:.4g} -> '
                    f'{s["base_lr"]:.4g}, WARMUP_LR {config.TRAIN.WARMUP_LR:.4g} -> {s["warmup_lr"]:.4g}, '
                    f'MIN_LR {config.TRAIN.MIN_LR:.4g} -> {s["min_lr"]:.4g}')
        settled.TRAIN.BASE_LR, settled.TRAIN.WARMUP_LR, settled.TRAIN.MIN_LR = s['base_lr'], s['warmup_lr'], s['min_lr']
    settled.freeze()
    return settled


def _write_config(config, ctx: DistContext, logger) -> None:
    if ctx.is_main:
        path = os.path.join(config.OUTPUT, 'config.yaml')
        atomic_write_text(config.dump(), path)
        logger.info(f'config written to {path}')


def _run(config, ctx: DistContext) -> int:
    seed_everything(config.SEED + ctx.rank)
    logger = create_logger(config.OUTPUT, ctx.rank, config.MODEL.NAME)
    if ctx.is_main:
        for name in remove_stale_temporaries(config.OUTPUT):
            logger.info(f'removed {name}, a temporary file left by a process killed while writing')
    amp_dtype, amp_note = resolve_amp_dtype(config, ctx.device)
    tf32_note = set_fp32_matmul_math(config, ctx.device)
    _log_environment(ctx, logger, amp_note + (f'; {tf32_note}' if tf32_note else ''))
    if config.THROUGHPUT_MODE:
        _write_config(config, ctx, logger)
        model = compile_model(_build_model(config, ctx, logger), config, logger, 'inference forward')
        throughput(model, config, ctx.device, amp_dtype, logger)
        return 0

    _prepare_builtin_data(config, ctx, logger)
    dataset_train, dataset_val = build_datasets(config, ctx.rank, ctx.world_size, logger)
    config = settle_config(config, ctx.world_size, data_num_classes(config, dataset_train, dataset_val), logger)
    _write_config(config, ctx, logger)
    loader_train, loader_val, mixup_fn = build_loaders(config, dataset_train, dataset_val, ctx.rank, ctx.world_size)
    model = _build_model(config, ctx, logger)
    if config.EVAL_MODE:
        prep_val = DevicePreprocessor(config, ctx.device, is_train=False)
        return evaluate(config, ctx, model, loader_val, prep_val, amp_dtype, logger)
    return _train(config, ctx, model, loader_train, loader_val, mixup_fn, amp_dtype, logger)


def _build_model(config, ctx: DistContext, logger) -> nn.Module:
    """The classifier, or for SimMIM pre-training (not --throughput) the SimMIM model."""
    pretraining = config.MODEL.SIMMIM.PRETRAIN and not config.THROUGHPUT_MODE
    model = build_model(config, is_pretrain=pretraining).to(ctx.device)
    n_params = sum(p.numel() for p in model.parameters())
    flops = f', {model.flops() / 1e9:.2f} GFLOPs' if hasattr(model, 'flops') else ''
    task = (f'SimMIM pre-training (mask {config.DATA.MASK_PATCH_SIZE}px squares, ratio {config.DATA.MASK_RATIO})'
            if pretraining else f'{config.MODEL.NUM_CLASSES} classes')
    logger.info(f'model {config.MODEL.NAME}: {n_params / 1e6:.2f}M parameters{flops} at '
                f'{config.DATA.IMG_SIZE}px, {task}')
    return model


def _train(config, ctx: DistContext, model: nn.Module, loader_train, loader_val, mixup_fn, amp_dtype, logger) -> int:
    """Resume (the checkpoint's weights) or start from --pretrained (into the full model,
    before any sharding), then fit."""
    checkpointer = Checkpointer(config.OUTPUT, ctx, logger)
    path, state = checkpointer.find_resume(config)
    if path and config.MODEL.PRETRAINED:
        logger.info(f'--pretrained {config.MODEL.PRETRAINED} is not used: the run resumes from {path}')
    elif config.MODEL.PRETRAINED:
        load_pretrained(model, config.MODEL.PRETRAINED, logger, config.MODEL.PRETRAINED_CLASS_MAP)
    with Trainer(config, ctx, model, loader_train, loader_val, mixup_fn, amp_dtype, logger, checkpointer) as trainer:
        if path:
            trainer.load_state_dict(state if state is not None else read_checkpoint(path), path)
        return trainer.fit()

"""One run from a validated config: process group, output folder, data, model, then the
requested mode (training epochs with checkpoints, --eval, or --throughput).

User mistakes found here (data, checkpoints, output folder) raise one-line errors that
`run` turns into exit code 2; under torchrun the launcher then stops the other ranks.
"""
from __future__ import annotations

import copy
import fcntl
import os
import platform

import timm
import torch
import torch.nn as nn
import torchvision

from checkpoints import files as ckpt
from data import DevicePreprocessor, build_loader
from distributed.parallel import check_supported
from distributed.process_group import DistContext, barrier, init_distributed, shutdown
from engine import loops
from engine.metrics_log import MetricsLog
from engine.trainer import train
from logger import create_logger
from models import build_model
from models.adapt import fit_weights
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


def _write_config(config) -> None:
    path = os.path.join(config.OUTPUT, 'config.yaml')
    atomic_write_text(config.dump(), path)


def _log_environment(config, ctx: DistContext, logger, amp_note: str) -> None:
    device = ctx.device
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'
    logger.info(f'python {platform.python_version()}, torch {torch.__version__}, torchvision '
                f'{torchvision.__version__}, timm {timm.__version__}'
                + (f', CUDA {torch.version.cuda}' if device.type == 'cuda' else ''))
    logger.info(f'world size {ctx.world_size}, rank {ctx.rank}, device {device} ({name}), '
                f'{torch.get_num_threads()} CPU threads, precision: {amp_note}')


def _run(config, ctx: DistContext) -> int:
    seed_everything(config.SEED + ctx.rank)
    logger = create_logger(config.OUTPUT, ctx.rank, config.MODEL.NAME)
    if ctx.is_main:
        for name in ckpt.remove_stale_temporaries(config.OUTPUT):
            logger.info(f'removed {name}, a temporary file left by a process killed while writing')
    amp_dtype, amp_note = loops.resolve_amp_dtype(config, ctx.device)
    _log_environment(config, ctx, logger, amp_note)

    if config.THROUGHPUT_MODE:
        model = _build_model(config, ctx, logger)
        if ctx.is_main:
            _write_config(config)
        compiled = loops.compile_model(model, config, logger, 'inference forward')
        loops.throughput(model if compiled is None else compiled, config, ctx.device, amp_dtype, logger)
        return 0

    _prepare_builtin_data(config, ctx, logger)
    _, _, loader_train, loader_val, mixup_fn = build_loader(config, ctx.rank, ctx.world_size, logger)
    if ctx.is_main:  # after the data set MODEL.NUM_CLASSES; LRs as given (before batch scaling)
        _write_config(config)
        logger.info(f'config written to {os.path.join(config.OUTPUT, "config.yaml")}')
    model = _build_model(config, ctx, logger)
    prep_val = DevicePreprocessor(config, ctx.device, is_train=False)

    if config.EVAL_MODE:
        return _evaluate_only(config, ctx, model, loader_val, prep_val, amp_dtype, logger)
    return train(config, ctx, model, loader_train, loader_val, mixup_fn, prep_val, amp_dtype, logger)


def _build_model(config, ctx: DistContext, logger) -> nn.Module:
    model = build_model(config).to(ctx.device)
    n_params = sum(p.numel() for p in model.parameters())
    flops = f', {model.flops() / 1e9:.2f} GFLOPs' if hasattr(model, 'flops') else ''
    logger.info(f'model {config.MODEL.NAME}: {n_params / 1e6:.2f}M parameters{flops} at '
                f'{config.DATA.IMG_SIZE}px, {config.MODEL.NUM_CLASSES} classes')
    return model


def _evaluate_only(config, ctx: DistContext, model, loader_val, prep_val, amp_dtype, logger) -> int:
    """--eval: score the weights of --resume (strictly) or --pretrained (adapted as for
    fine-tuning, but never with an untrained head) on the validation split; the EMA weights
    too when the checkpoint holds them."""
    path = config.MODEL.RESUME or config.MODEL.PRETRAINED
    checkpoint = ckpt.read_checkpoint(path)

    def load(target: nn.Module, entry: dict, source: str) -> None:
        state = ckpt.model_state_dict(entry)
        if config.MODEL.RESUME:
            ckpt.load_model_weights(target, state, source)
        else:
            fit_weights(target, state, source, logger, config.MODEL.PRETRAINED_CLASS_MAP, allow_head_reinit=False)

    load(model, checkpoint, path)
    scored = [('model', model)]
    if isinstance(checkpoint.get('model_ema'), dict):
        ema = copy.deepcopy(model)
        load(ema, checkpoint['model_ema'], f'{path} (model_ema)')
        scored.append(('EMA model', ema))
    epoch = checkpoint.get('epoch')
    line = {'mode': 'eval', 'epoch': epoch if isinstance(epoch, int) else None, 'checkpoint': os.path.abspath(path),
            'train_loss': None, 'lr': None}
    for name, weights in scored:
        logger.info(f'evaluating the {name} weights of {path}')
        compiled = loops.compile_model(weights, config, logger, f'{name} forward')
        scorer = weights if compiled is None else compiled
        result = loops.validate(config, scorer, loader_val, prep_val, ctx.device, amp_dtype, logger)
        logger.info(f'Accuracy of the {name} on the {result["n_images"]} test images: '
                    f'top-1 {result["acc1"]:.2f}%  top-5 {result["acc5"]:.2f}%')
        prefix = '' if name == 'model' else 'ema_'
        line.update({f'{prefix}acc1': result['acc1'], f'{prefix}acc5': result['acc5'],
                     f'{prefix}val_loss': result['val_loss']})
        if name == 'model':
            line.update({'n_images': result['n_images'],
                         'img_per_s': result['n_images'] / max(result['val_time'], 1e-9)})
    MetricsLog(config.OUTPUT, ctx.is_main, tensorboard=False).append(line)
    return 0

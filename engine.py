"""Run-time pieces shared by the modes of main.py: device choice, autocast, and the
throughput measurement (training and validation loops join them later)."""
from __future__ import annotations

import contextlib
import os
import time

import torch


def select_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
    return torch.device('cpu')


def autocast_context(config, device: torch.device):
    """Autocast in the configured dtype, or nothing when AMP is off."""
    if not config.AMP_ENABLE:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.AMP_DTYPE == 'bf16' else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def write_config(config, output_dir: str) -> None:
    """Save the merged config as YAML (atomically: a crash never leaves half a file)."""
    path = os.path.join(output_dir, 'config.yaml')
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(config.dump())
    os.replace(tmp, path)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a timer measures it (a no-op on the CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@torch.inference_mode()
def throughput(model: torch.nn.Module, config, device: torch.device, logger) -> float:
    """Inference images/s on a synthetic batch of the configured size (official procedure:
    warm up, then time repeated forwards; fewer repetitions on CPU)."""
    model.eval()
    batch = config.DATA.BATCH_SIZE
    size = config.DATA.IMG_SIZE
    images = torch.randn(batch, config.MODEL.SWIN.IN_CHANS, size, size, device=device)
    warmup, timed = (50, 30) if device.type == 'cuda' else (2, 5)
    with autocast_context(config, device):
        for _ in range(warmup):
            model(images)
        synchronize(device)
        logger.info(f'throughput averaged over {timed} batches')
        tic = time.perf_counter()
        for _ in range(timed):
            model(images)
        synchronize(device)
    rate = timed * batch / (time.perf_counter() - tic)
    precision = config.AMP_DTYPE if config.AMP_ENABLE else 'fp32'
    logger.info(f'batch_size {batch} throughput {rate:.1f} images/s ({device.type}, {precision}, synthetic input)')
    return rate

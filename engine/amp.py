"""Precision of a run: the autocast dtype AMP_ENABLE / AMP_DTYPE ask for on this device, the
autocast context, and the gradient scaler fp16 needs."""
from __future__ import annotations

import contextlib

import torch


def resolve_amp_dtype(config, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype (None: fp32) and a note for the log. bf16 falls back to fp16 on
    GPUs without bf16 support."""
    if not config.AMP_ENABLE:
        return None, 'fp32 (AMP off)'
    if config.AMP_DTYPE == 'fp16':
        return torch.float16, 'fp16 autocast with a gradient scaler'
    if device.type == 'cuda' and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16, 'fp16 autocast with a gradient scaler (this GPU has no bf16)'
    return torch.bfloat16, 'bf16 autocast (no loss scaling)'


def set_fp32_matmul_math(config, device: torch.device) -> str | None:
    """On CUDA, TF32 tensor cores for fp32 matmuls and convolutions when config.TF32 (else
    full fp32); a note for the log. Nothing to set on the CPU."""
    if device.type != 'cuda':
        return None
    torch.set_float32_matmul_precision('high' if config.TF32 else 'highest')
    torch.backends.cudnn.allow_tf32 = bool(config.TF32)
    return 'fp32 matmuls and convolutions in TF32 (TF32 True)' if config.TF32 else 'fp32 math in full fp32 (TF32 False)'


def autocast_context(amp_dtype: torch.dtype | None, device: torch.device):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def make_scaler(amp_dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler only for fp16: bf16 has fp32's exponent range and needs none."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

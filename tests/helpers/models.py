"""Model helpers of the tests: comparing paths, weights a trained model could have."""
from __future__ import annotations

import torch

from models.swin_transformer import WindowAttentionBase


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    """The SDPA path (True) or the plain reference path (False) in every V1 or V2 attention."""
    for m in model.modules():
        if isinstance(m, WindowAttentionBase):
            m.fused = fused


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights a trained model could have: the post-norms start at zero (each block the
    identity), which would hide any error in attention, so they and the biases, logit scales
    (some above the clamp) and bias MLPs get random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('logit_scale'):
                p.copy_(torch.rand(p.shape, generator=gen) * 5.5)  # up to 5.5 > log(100): clamped
            elif 'norm' in name and name.endswith('weight'):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif 'cpb_mlp' in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith(('bias', 'q_bias', 'v_bias')):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model

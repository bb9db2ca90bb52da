"""Fine-tuning from a SimMIM pre-training checkpoint, as the official SimMIM fine-tuning reads it.

A SimMIM file holds `encoder.*` (the backbone, with a mask token) and `decoder.*`. The encoder
is kept without its prefix; the decoder and the mask token are dropped (and logged). Relative
position bias tables of another window are resampled the official SimMIM way: the file's
offsets are spread over a geometric progression that reaches the new window's extent, and a
bicubic interpolating spline is evaluated at the new integer offsets (BEiT's rule; the
classification fine-tuning resizes bicubically on a uniform grid instead, models/adapt.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.interpolate import RectBivariateSpline

PREFIX = 'encoder.'
_DROPPED = ('mask_token',)  # encoder entries the classifier has no place for


def is_simmim_layout(state: dict) -> bool:
    """The official test: any key naming the encoder."""
    return any(PREFIX in key for key in state)


def from_simmim(state: dict) -> tuple[dict, list[str]]:
    """The encoder's weights under the classifier's names, and the keys dropped (decoder,
    mask token). Early SwinV2 SimMIM files call the bias MLP `rpe_mlp` (now `cpb_mlp`)."""
    encoder, dropped = {}, []
    for key, value in state.items():
        if not key.startswith(PREFIX):
            dropped.append(key)
            continue
        name = key[len(PREFIX):].replace('rpe_mlp', 'cpb_mlp')
        if name in _DROPPED:
            dropped.append(key)
        else:
            encoder[name] = value
    return encoder, dropped


def _progression_ratio(old_side: int, new_side: int) -> float:
    """q with 1 + q + ... + q^(old/2 - 1) reaching new/2 (bisection, as the official code)."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (old_side // 2)) / (1.0 - q) > new_side // 2:
            right = q
        else:
            left = q
    return q


def _source_offsets(old_side: int, q: float) -> list[float]:
    steps, position = [], 1.0
    for i in range(old_side // 2):
        steps.append(position)
        position += q ** (i + 1)
    return [-s for s in reversed(steps)] + [0.0] + steps


def geometric_resize_bias_table(table: torch.Tensor, new_side: int) -> torch.Tensor:
    """A (old_side^2, heads) relative position bias table resampled to (new_side^2, heads)."""
    old_side = math.isqrt(table.shape[0])
    offsets = np.asarray(_source_offsets(old_side, _progression_ratio(old_side, new_side)))
    half = new_side // 2.0
    targets = np.arange(-half, half + 0.1, 1.0)
    heads = []
    for h in range(table.shape[1]):
        grid = table[:, h].reshape(old_side, old_side).float().numpy()
        spline = RectBivariateSpline(offsets, offsets, grid, kx=3, ky=3, s=0)
        heads.append(torch.from_numpy(spline(targets, targets)).float().reshape(-1, 1))
    return torch.cat(heads, dim=1).to(table.dtype)

"""The building blocks of the Swin models: the MLP, window attention through SDPA, token
permutation and drop path.

Each computes the plain function. On the CPU in eager mode the MLP and window attention run
the kernels of `cpu_kernels` instead (same results, fewer allocations, and a mask gradient
that SDPA's CPU kernels cannot give). Token permutation and drop path are single passes on
every device.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_kernels
from .attention_layout import merge_heads, split_heads


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout, with the official parameter names."""

    def __init__(self, in_features: int, hidden_features: int | None = None,
                 out_features: int | None = None, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)
        self._exact_gelu = isinstance(self.act, nn.GELU) and self.act.approximate == 'none'
        self.spares = cpu_kernels.SpareBuffers(capacity=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.applies_to(x) and self._exact_gelu and (self.drop.p == 0 or not self.training):
            return cpu_kernels.gelu_mlp(x, self.fc1, self.fc2, self.spares)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class _TokenPermutation(torch.autograd.Function):
    """Reorder the tokens of every sample by a permutation; the gradient is reordered by
    its inverse. `index_select`'s own backward scatters into a zero-filled tensor; for a
    permutation a second gather is exact and does one pass instead of two."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse, index)
        return _gather_tokens(x, index)

    @staticmethod
    def backward(ctx, grad):
        inverse, index = ctx.saved_tensors
        return _TokenPermutation.apply(grad, inverse, index), None, None


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # A gather along dim 0 of (B*T, C) rows runs about 4x faster on the CPU than
    # index_select along dim 1 of (B, T, C), so the batch offset goes into the index.
    B, T, C = x.shape
    rows = (torch.arange(B, device=x.device) * T).unsqueeze(1) + index
    return x.reshape(B * T, C).index_select(0, rows.view(-1)).view(B, T, C)


def permute_tokens(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[:, index] for x of shape (B, T, C) and a permutation `index` whose inverse is `inverse`."""
    return _TokenPermutation.apply(x, index, inverse)


def add_drop_path(x: torch.Tensor, branch: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """x + DropPath(branch) (stochastic depth, kept samples scaled by 1/keep) in one op."""
    if drop_prob == 0. or not training:
        return x + branch
    keep = 1. - drop_prob
    scale = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep).div_(keep)
    return torch.addcmul(x, branch, scale)


def window_attention(qkv: torch.Tensor, attn_mask: torch.Tensor, num_heads: int, num_windows: int,
                     scale: float, dropout_p: float = 0.,
                     spares: cpu_kernels.SpareBuffers | None = None) -> torch.Tensor:
    """softmax(QK^T * scale + attn_mask) V for every window, by SDPA (its memory-efficient
    kernel on CUDA differentiates the mask itself).

    qkv: (B*nW, N, 3C) from the qkv projection; attn_mask: (1, nW*heads, N, N), the bias
    and shift mask joined, windows major. Returns (B*nW, N, C) with the heads merged.
    `spares`: the calling layer's buffers for the CPU kernel.
    """
    if dropout_p == 0. and cpu_kernels.applies_to(qkv):
        return cpu_kernels.window_attention(qkv, attn_mask, num_heads, num_windows, scale, spares)
    q, k, v = split_heads(qkv, num_heads, num_windows).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype), dropout_p=dropout_p, scale=scale)
    return merge_heads(out, num_windows)

"""The head layout of window attention, shared by its SDPA path (`layers.window_attention`)
and its CPU kernels (`cpu_kernels`): windows folded into the head dimension, so a
(1, nW*heads, N, N) mask broadcasts over the batch instead of being copied per image."""
from __future__ import annotations

import torch


def split_heads(qkv: torch.Tensor, num_heads: int, num_windows: int) -> torch.Tensor:
    """(B*nW, N, 3C) -> (3, B, nW*heads, N, d); a view where the layout allows (one window)."""
    BW, N, C3 = qkv.shape
    d = C3 // (3 * num_heads)
    t = qkv.view(BW // num_windows, num_windows, N, 3, num_heads, d).permute(3, 0, 1, 4, 2, 5)
    return t.reshape(3, BW // num_windows, num_windows * num_heads, N, d)


def merge_heads(out: torch.Tensor, num_windows: int) -> torch.Tensor:
    """(B, nW*heads, N, d) -> (B*nW, N, heads*d)."""
    B, G, N, d = out.shape
    nh = G // num_windows
    return out.view(B, num_windows, nh, N, d).transpose(2, 3).reshape(B * num_windows, N, nh * d)

"""Swin-MLP (the MLP variant of the official Swin repository): Swin V1 with window attention
replaced by a spatial MLP, one learned token-mixing matrix per head over each (shifted) window.

The official constructor arguments, state_dict keys and shapes, function and FLOP count. The
stages, patch embedding, patch merging, freezing and the model's forward come from
`swin_transformer` (V1), as Swin V2 reuses them. What differs from the official code, none of
it changing the function at the official input size:
- the shifted windows pad the map with zeros (window - shift on the top and left, shift on the
  bottom and right) instead of rolling it, as the official Swin-MLP does, so no mask is needed;
- inputs of any size run: a map that is not whole windows is zero-padded at the bottom and right
  (after the norm, as V1's blocks do) and cropped back; a map no larger than the window gets one
  window and no shift;
- drop path is one fused op (`layers.add_drop_path`) instead of a DropPath module (no weights).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from . import swin_transformer as v1
from .layers import Mlp, add_drop_path


class SwinMLPBlock(nn.Module):
    """Spatial MLP over (shifted) windows and a channel MLP, each with pre-norm and a residual.

    The spatial MLP is a grouped 1x1 `Conv1d` over the window's tokens, one group per head, as
    officially (the `spatial_mlp` weight is (heads * N, N, 1) for N tokens a window): measured on
    the CPU it runs forward and backward faster than the same product as a batched matmul.
    """

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4., drop: float = 0., drop_path: float = 0.,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be a multiple of num_heads {num_heads} (channels per head)')
        window_size, shift_size = v1.fit_window(input_resolution, window_size, shift_size)
        self.window_size = window_size
        self.shift_size = shift_size

        tokens = num_heads * window_size ** 2
        self.norm1 = norm_layer(dim)
        self.spatial_mlp = nn.Conv1d(tokens, tokens, kernel_size=1, groups=num_heads)
        self.drop_path_prob = drop_path
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def window_padding(self, H: int, W: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) zeros that make an H x W map whole windows. With a shift s
        the windows start s tokens later than unshifted ones: window - s zeros before the map,
        s after it (the official rule), plus whatever rounds a size up to whole windows."""
        ws = self.window_size
        shift = self.shift_size if min(H, W) > ws else 0  # one window: nothing to shift
        before = ws - shift if shift else 0
        return before, shift + (-H % ws), before, shift + (-W % ws)

    def mix_windows(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """The spatial MLP over (shifted) windows of a (B, H*W, C) map, returned as (B, H*W, C)."""
        B, L, C = x.shape
        ws, heads = self.window_size, self.num_heads
        top, bottom, left, right = self.window_padding(H, W)
        x = x.view(B, H, W, C)
        if top or bottom or left or right:
            x = F.pad(x, (0, 0, left, right, top, bottom))
        Hp, Wp = H + top + bottom, W + left + right
        # (B * windows, heads * N, C / heads): the layout the grouped convolution mixes per head
        windows = v1.window_partition(x, ws).view(-1, ws * ws, heads, C // heads).transpose(1, 2)
        mixed = self.spatial_mlp(windows.reshape(-1, heads * ws * ws, C // heads))
        mixed = mixed.view(-1, heads, ws * ws, C // heads).transpose(1, 2).reshape(-1, ws, ws, C)
        x = v1.window_reverse(mixed, ws, Hp, Wp)
        if Hp != H or Wp != W:
            x = x[:, top:top + H, left:left + W]
        return x.reshape(B, L, C)

    def forward(self, x: torch.Tensor, H: int | None = None, W: int | None = None) -> torch.Tensor:
        """x: (B, H*W, C) -> (B, H*W, C). H, W default to the construction resolution."""
        if H is None or W is None:
            H, W = self.input_resolution
        x = add_drop_path(x, self.mix_windows(self.norm1(x), H, W), self.drop_path_prob, self.training)
        return add_drop_path(x, self.mlp(self.norm2(x)), self.drop_path_prob, self.training)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, '
                f'window_size={self.window_size}, shift_size={self.shift_size}, mlp_ratio={self.mlp_ratio}')

    def flops(self) -> float:
        """Multiply-adds at the construction resolution, counted as the official code does
        (a shifted block counts one more row and column of windows, as a float)."""
        H, W = self.input_resolution
        ws = self.window_size
        num_windows = (H / ws + 1) * (W / ws + 1) if self.shift_size else H * W / ws / ws
        return (2 * self.dim * H * W + num_windows * self.dim * ws ** 4
                + 2 * H * W * self.dim * self.dim * self.mlp_ratio)


def _mlp_block(qkv_bias: bool = True, qk_scale: float | None = None, attn_drop: float = 0.,
               **kwargs) -> SwinMLPBlock:
    """`v1.BasicLayer` hands every block the attention's arguments; a spatial MLP has none."""
    return SwinMLPBlock(**kwargs)


class SwinMLP(v1.SwinTransformer):
    """Swin-MLP with the official constructor arguments and state_dict keys.

    Everything but the blocks is V1's: any input size, stage outputs, freezing, FSDP units,
    gradient checkpointing, the parameter names layer decay reads, the FLOP count's frame.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: list[int] = (2, 2, 6, 2), num_heads: list[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4., drop_rate: float = 0., drop_path_rate: float = 0.1,
                 norm_layer: type[nn.Module] = nn.LayerNorm, ape: bool = False, patch_norm: bool = True,
                 use_checkpoint: bool = False, **kwargs):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
                         mlp_ratio=mlp_ratio, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                         norm_layer=norm_layer, ape=ape, patch_norm=patch_norm, use_checkpoint=use_checkpoint,
                         **kwargs)

    def make_stage(self, index: int, **kwargs) -> nn.Module:
        return v1.BasicLayer(block_layer=_mlp_block, **kwargs)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # The official init also covers the spatial MLP (Conv1d), not the patch projection (Conv2d).
        if isinstance(m, nn.Linear | nn.Conv1d):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

"""Swin Transformer V2 (Liu et al., CVPR 2022) with the official parameter names and shapes.

What V2 changes in V1 (`swin_transformer.py`, whose windows, padding, shift masks, patch
embedding, stages and model this module reuses by subclassing):
- scaled cosine attention: cos(q, k) times a learned per-head logit scale, clamped at
  log(1 / 0.01) before exponentiation;
- a continuous relative position bias, 16 * sigmoid(MLP(log-spaced offsets)), from a
  2-layer MLP (`cpb_mlp`) instead of a table, so a model fine-tuned at another window
  size keeps the MLP and only rebuilds its coordinate tables;
- residual post-normalization, x + DropPath(norm(f(x))), with the norms starting at zero;
- patch merging that projects first and normalizes the 2C result;
- q and v biases (`q_bias`, `v_bias`), no k bias.

The fused path normalizes q and k (in fp32 arithmetic, so half precision neither divides
0 by an eps that underflowed nor overflows the factor), folds the logit scale into q, and
runs one window attention call per block (`layers.window_attention`: SDPA, or the CPU
kernels of `cpu_kernels`) with scale 1 and one additive mask: the bias joined with the shift
mask, as V1 does.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple

from . import swin_transformer as v1
from .layers import add_drop_path, window_attention

# The official clamp of the learned logit scale: at most 100 before the softmax.
LOGIT_SCALE_MAX = math.log(1. / 0.01)
# F.normalize's eps, as the official cosine attention uses it.
NORM_EPS = 1e-12


def log_spaced_coords(window_size: tuple[int, int], pretrained_window_size: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """(1, 2Wh-1, 2Ww-1, 2) relative offsets, scaled to [-8, 8] by the pretrained window size
    when given (else by the window size) and mapped to sign(x) * log2(|x| + 1) / log2(8).

    A window of 1 has only the offset 0: the divisor is kept at least 1 (the official code
    would divide 0 by 0 there).
    """
    wh, ww = window_size
    grid = torch.stack(torch.meshgrid(torch.arange(-(wh - 1), wh, dtype=torch.float32),
                                      torch.arange(-(ww - 1), ww, dtype=torch.float32), indexing='ij'))
    table = grid.permute(1, 2, 0).unsqueeze(0).contiguous()
    norm = pretrained_window_size if pretrained_window_size[0] > 0 else window_size
    table[..., 0] /= max(norm[0] - 1, 1)
    table[..., 1] /= max(norm[1] - 1, 1)
    table *= 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def scaled_unit(t: torch.Tensor, scale: torch.Tensor | None = None, keep: torch.Tensor | None = None
                ) -> torch.Tensor:
    """t / max(|t|, eps) along the last dimension (F.normalize), times `scale` if given;
    where `keep` (broadcast like `scale`) is 1, t itself instead (scale 0 there).

    The norm and the factor are computed in at least fp32: in fp16 F.normalize's eps rounds
    to 0, and an all-zero key (a padded token has no k bias) would give 0 / 0. The factor is
    capped at the dtype's largest value, so a tiny non-zero vector stays finite too.
    """
    compute = torch.promote_types(t.dtype, torch.float32)
    norm = torch.linalg.vector_norm(t, dim=-1, keepdim=True, dtype=compute)
    factor = norm.clamp_min(NORM_EPS).reciprocal()
    if scale is not None:
        factor = factor * scale if keep is None else torch.addcmul(keep, factor, scale)
    if factor.dtype != t.dtype:
        factor = factor.clamp_max(torch.finfo(t.dtype).max).to(t.dtype)
    return t * factor


class WindowAttention(v1.WindowAttentionBase):
    """Scaled cosine attention inside windows with a continuous relative position bias.

    `fused = True`: normalized q (with the logit scale folded in) and k through
    `layers.window_attention` with scale 1 and the joined bias + shift mask; the bias MLP
    runs once per forward in training (a few thousand rows), and in CPU inference only when
    its weights change (`joined_mask`). `fused = False` is the official formula, for reference.
    """

    derived_buffers = ('relative_position_index', 'relative_coords_table')

    def __init__(self, dim: int, window_size: tuple[int, int], num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., pretrained_window_size: tuple[int, int] = (0, 0)):
        super().__init__(dim, window_size, num_heads)
        self.pretrained_window_size = tuple(pretrained_window_size)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        # continuous relative position bias: offsets -> 512 -> heads (official layout and names)
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        # Persistent as in the official model (its files carry it); derived from the window
        # sizes, so the model keeps its own whatever a file holds.
        self.register_buffer('relative_coords_table', log_spaced_coords(window_size, self.pretrained_window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, window_size={self.window_size}, '
                f'pretrained_window_size={self.pretrained_window_size}, num_heads={self.num_heads}')

    def bias_sources(self) -> tuple[torch.Tensor, ...]:
        return (self.cpb_mlp[0].weight, self.cpb_mlp[0].bias, self.cpb_mlp[2].weight, self.relative_coords_table,
                self.relative_position_index)

    def bias_table(self) -> torch.Tensor:
        """((2Wh-1)(2Ww-1), heads): 16 * sigmoid(MLP(offset)) for every offset, in the
        weights' dtype. Computed outside autocast in at least fp32 (a few thousand rows):
        the bias reaches 16, where bf16 steps by 1/16, so only the attention kernel's input
        dtype rounds it. That holds when the weights arrive in bf16 too (FSDP's mixed
        precision gathers them so, while the coordinate table, a buffer, stays fp32)."""
        weight_dtype = self.cpb_mlp[0].weight.dtype
        dtype = torch.promote_types(weight_dtype, torch.float32)
        weights = {name: p.to(dtype) for name, p in self.cpb_mlp.named_parameters()}
        with torch.autocast(self.relative_coords_table.device.type, enabled=False):
            table = torch.func.functional_call(self.cpb_mlp, weights, (self.relative_coords_table.to(dtype),))
        # elementwise: the same before or after the gather
        return (16 * torch.sigmoid(table.view(-1, self.num_heads))).to(weight_dtype)

    def relative_position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        bias = self.bias_table()[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def logit_scale_value(self) -> torch.Tensor:
        """(heads, 1, 1) multiplier of the cosine similarities, at most 100."""
        return torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()

    def qkv_projection(self, x: torch.Tensor) -> torch.Tensor:
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        return F.linear(x, self.qkv.weight, bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (num_windows * B, N, C); mask: (num_windows, N, N) additive, or None."""
        if not self.fused:
            return self._forward_plain(x, mask)
        BW, N, C = x.shape
        qkv = self.qkv_projection(x).view(BW, N, 3, self.num_heads, C // self.num_heads)
        # One factor per (token, q/k/v, head): logit scale / |q|, 1 / |k|, and 1 for v. One
        # multiply over all of qkv, rather than slices whose backward fills zeros of its size.
        logit_scale = self.logit_scale_value().view(1, -1, 1)
        ones, zeros = torch.ones_like(logit_scale), torch.zeros_like(logit_scale)
        scale, keep = torch.cat((logit_scale, ones, zeros)), torch.cat((zeros, zeros, ones))
        qkv = scaled_unit(qkv, scale, keep).view(BW, N, 3 * C)
        nw = 1 if mask is None else mask.shape[0]
        out = window_attention(qkv, self.joined_mask(mask), self.num_heads, nw, 1.0,
                               self.attn_drop.p if self.training else 0., self.spares)
        return self.proj_drop(self.proj(out))

    def _forward_plain(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B_, N, C = x.shape
        qkv = self.qkv_projection(x).view(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        cosine = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        return self.plain_output(cosine * self.logit_scale_value(), v, mask)


class SwinTransformerBlock(v1.SwinTransformerBlock):
    """V1's block (windows, padding, shift masks, the one-window rule for small maps) with
    V2 attention and residual post-normalization: x + DropPath(norm(f(x)))."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4., qkv_bias: bool = True, drop: float = 0.,
                 attn_drop: float = 0., drop_path: float = 0., act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = nn.LayerNorm, pretrained_window_size: int = 0):
        pretrained = to_2tuple(pretrained_window_size)

        def attn_layer(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop):
            return WindowAttention(dim, window_size, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                   proj_drop=proj_drop, pretrained_window_size=pretrained)

        super().__init__(dim, input_resolution, num_heads, window_size=window_size, shift_size=shift_size,
                         mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop,
                         drop_path=drop_path, act_layer=act_layer, norm_layer=norm_layer, attn_layer=attn_layer)

    def forward(self, x: torch.Tensor, H: int | None = None, W: int | None = None) -> torch.Tensor:
        """x: (B, H*W, C) -> (B, H*W, C). H, W default to the construction resolution."""
        if H is None or W is None:
            H, W = self.input_resolution
        x = add_drop_path(x, self.norm1(self.attend_windows(x, H, W)), self.drop_path_prob, self.training)
        return add_drop_path(x, self.norm2(self.mlp(x)), self.drop_path_prob, self.training)


class PatchMerging(v1.PatchMerging):
    """Concatenate each 2x2 neighbourhood (4C), project to 2C, then normalize (over 2C)."""

    def __init__(self, input_resolution: tuple[int, int], dim: int, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__(input_resolution, dim, norm_layer)
        self.norm = norm_layer(2 * dim)  # V2 normalizes the projected 2C channels

    def forward(self, x: torch.Tensor, H: int | None = None,
                W: int | None = None) -> tuple[torch.Tensor, int, int]:
        if H is None or W is None:
            H, W = self.input_resolution
        x, H, W = self.merge(x, H, W)
        return self.norm(self.reduction(x)), H, W

    def flops(self) -> int:
        H, W = self.input_resolution
        return (H // 2) * (W // 2) * 4 * self.dim * 2 * self.dim + H * W * self.dim // 2


class BasicLayer(v1.BasicLayer):
    """One V2 stage; `pretrained_window_size` normalizes its blocks' bias coordinates."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int,
                 window_size: int, mlp_ratio: float = 4., qkv_bias: bool = True, drop: float = 0.,
                 attn_drop: float = 0., drop_path: float | list[float] = 0.,
                 norm_layer: type[nn.Module] = nn.LayerNorm, downsample: type[nn.Module] | None = None,
                 use_checkpoint: bool = False, pretrained_window_size: int = 0):
        def block_layer(qk_scale=None, **kwargs):  # V2 has no qk_scale
            return SwinTransformerBlock(pretrained_window_size=pretrained_window_size, **kwargs)

        super().__init__(dim, input_resolution, depth, num_heads, window_size, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop, drop_path=drop_path,
                         norm_layer=norm_layer, downsample=downsample, use_checkpoint=use_checkpoint,
                         block_layer=block_layer)
        self.pretrained_window_size = pretrained_window_size

    def _init_respostnorm(self) -> None:
        """Post-norms start at zero (official): each block begins as the identity."""
        for blk in self.blocks:
            for norm in (blk.norm1, blk.norm2):
                nn.init.constant_(norm.bias, 0)
                nn.init.constant_(norm.weight, 0)


class SwinTransformerV2(v1.SwinTransformer):
    """Swin Transformer V2 with the official constructor arguments and state_dict keys.

    `pretrained_window_sizes` (one per stage, 0 = none) are the window sizes the weights
    were pretrained with: the bias MLP then sees offsets on the scale it was trained on.
    Everything else (any input size, stage outputs, freezing, FLOP count) is V1's.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: list[int] = (2, 2, 6, 2), num_heads: list[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4., qkv_bias: bool = True, drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0.1, norm_layer: type[nn.Module] = nn.LayerNorm,
                 ape: bool = False, patch_norm: bool = True, use_checkpoint: bool = False,
                 pretrained_window_sizes: list[int] = (0, 0, 0, 0), **kwargs):
        if len(pretrained_window_sizes) < len(depths):  # longer is fine, as officially (the default has 4)
            raise ValueError(f'pretrained_window_sizes {list(pretrained_window_sizes)} needs one entry per stage '
                             f'({len(depths)})')
        # Read by `make_stage` while V1's __init__ builds the stages (a plain attribute may be
        # set before nn.Module's own __init__).
        self.pretrained_window_sizes = [int(w) for w in pretrained_window_sizes[:len(depths)]]
        kwargs.pop('qk_scale', None)  # not a V2 argument; the official model ignores it too
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
                         mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate,
                         attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, norm_layer=norm_layer,
                         ape=ape, patch_norm=patch_norm, use_checkpoint=use_checkpoint, **kwargs)
        for layer in self.layers:
            layer._init_respostnorm()

    def make_stage(self, index: int, **kwargs) -> nn.Module:
        kwargs.pop('qk_scale', None)
        if kwargs['downsample'] is not None:
            kwargs['downsample'] = PatchMerging
        return BasicLayer(pretrained_window_size=self.pretrained_window_sizes[index], **kwargs)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {'cpb_mlp', 'logit_scale', 'relative_position_bias_table'}

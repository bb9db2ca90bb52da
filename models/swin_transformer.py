"""Swin Transformer V1 (Liu et al., ICCV 2021) with the official parameter names and shapes.

Differences from the official classification code, none of which change the function:
- window attention runs through `scaled_dot_product_attention` (see `layers.window_attention`),
  with the relative position bias and the shifted-window mask joined into one additive
  mask (once per block forward; in CPU inference reused while the bias weights keep their
  values); the shift mask and the window token order are built once per (padded) input
  resolution and device, then reused;
- on the CPU in eager mode, window attention and the MLP run the kernels of `cpu_kernels`
  (a learnable-mask attention backward, gradients written into saved activations, buffers
  reused from one training step to the next);
- the shift masks and relative position indices (and V2's coordinate tables) are derived
  buffers: a loaded file never overrides them (`DerivedBuffers`; their names in `weights`);
- the cyclic shift and the window partition are one token gather (and their inverses
  another) instead of a roll and a permuted copy each;
- inputs of any size run: feature maps are padded to whole windows per stage, as the
  official detection/segmentation backbone does;
- `forward_features(x, return_stages=True)` returns the four stage maps for use as a
  backbone; `fsdp_units()` names the modules FSDP shards one by one (the blocks).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple, trunc_normal_
from torch.utils.checkpoint import checkpoint

from . import cpu_kernels
from .freezing import FreezableStages
from .layers import Mlp, add_drop_path, permute_tokens, window_attention

# Value the official code adds to logits of token pairs that belong to different
# regions of a shifted window; kept (rather than -inf) so outputs match bit for bit.
MASK_VALUE = -100.0


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * num_windows, window_size, window_size, C), windows row-major."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B * num_windows, ws, ws, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def relative_position_index(window_size: tuple[int, int]) -> torch.Tensor:
    """(N, N) index into the (2Wh-1)(2Ww-1) bias table for every pair of tokens in a window."""
    wh, ww = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing='ij')).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # N, N, 2
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def shifted_window_mask(H: int, W: int, window_size: int, shift_size: int,
                        device: torch.device | None = None) -> torch.Tensor:
    """(num_windows, N, N) additive mask: 0 within a region, MASK_VALUE across regions.

    After the cyclic shift, a window on the bottom/right border holds tokens from up to
    four image regions that were not neighbours; they must not attend to each other.
    """
    region = torch.zeros(1, H, W, 1, device=device)
    bounds = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for hs in bounds:
        for ws in bounds:
            region[:, hs, ws, :] = label
            label += 1
    region = window_partition(region, window_size).view(-1, window_size * window_size)
    differs = region.unsqueeze(1) != region.unsqueeze(2)
    return torch.zeros(differs.shape, device=device).masked_fill_(differs, MASK_VALUE)


def fit_window(input_resolution: tuple[int, int], window_size: int, shift_size: int) -> tuple[int, int]:
    """(window, shift) of a block: a map no larger than the window is one window of the map's
    size, unshifted (the official rule; it sets the shapes of per-window weights)."""
    if min(input_resolution) <= window_size:
        shift_size, window_size = 0, min(input_resolution)
    if not 0 <= shift_size < window_size:
        raise ValueError(f'shift_size {shift_size} must be in [0, window_size={window_size})')
    return window_size, shift_size


class DerivedBuffers:
    """Mixin (before nn.Module) for a module whose `derived_buffers` are computed from its
    configuration: a load keeps the module's own, whatever the file holds for them (another
    window or resolution, or nothing: a buffer the module does not have is dropped)."""

    derived_buffers: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self.derived_buffers:
            own = getattr(self, name)
            if own is None:
                state_dict.pop(prefix + name, None)
            else:
                state_dict[prefix + name] = own
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and values (torch.equal alone promotes dtypes)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


class WindowAttentionBase(DerivedBuffers, nn.Module):
    """What the V1 and V2 window attentions share: the token-pair index into the offset
    table, the join of position bias and shift mask, the derived buffers a loaded file never
    overrides, and the official FLOP count.

    A subclass defines `relative_position_bias()` and `bias_sources()`, every tensor the bias
    is computed from.
    """

    fused: bool = True
    derived_buffers: tuple[str, ...] = ('relative_position_index',)

    def __init__(self, dim: int, window_size: tuple[int, int], num_heads: int):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        # Persistent, as in the official model, so state_dict keys match its checkpoints.
        self.register_buffer('relative_position_index', relative_position_index(window_size))
        self.spares = cpu_kernels.SpareBuffers(capacity=6)
        self._joined: tuple | None = None  # (copies of the bias sources, shift mask, joined mask)

    def bias_sources(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def relative_position_bias(self) -> torch.Tensor:
        """(num_heads, N, N) additive bias of every token pair in a window."""
        raise NotImplementedError

    def joined_mask(self, mask: torch.Tensor | None) -> torch.Tensor:
        """(1, num_windows * heads, N, N): the bias B plus the shift mask M of every window.

        Computed once per block forward, except in CPU inference: there the last result is
        reused while the shift mask is the same tensor and the bias sources hold the same
        values. Values are compared, since fused optimizers change weights without bumping
        their version counters; off the CPU a comparison would wait for the device.
        """
        sources = self.bias_sources()
        reusable = (not torch.compiler.is_compiling() and not torch.is_grad_enabled()
                    and sources[0].device.type == 'cpu')
        if reusable and self._joined is not None:
            saved, saved_mask, joined = self._joined
            if saved_mask is mask and all(_same(a, b) for a, b in zip(saved, sources, strict=True)):
                return joined
        joined = self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            joined = (joined + mask.unsqueeze(1)).reshape(1, mask.shape[0] * self.num_heads, *mask.shape[1:])
        if reusable:
            self._joined = (tuple(t.clone() for t in sources), mask, joined)
        return joined

    def plain_output(self, logits: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The reference path after the q-k logits (B*nW, heads, N, N): add the bias and the
        shift mask, softmax, attention dropout, the values, the output projection."""
        B_, heads, N, _ = logits.shape
        attn = logits + self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(B_ // nw, nw, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, heads, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(out))

    def flops(self, N: int) -> int:
        """Multiply-adds of one window of N tokens, counted as the official code does."""
        hd = self.dim // self.num_heads
        return N * self.dim * 3 * self.dim + 2 * self.num_heads * N * N * hd + N * self.dim * self.dim


class WindowAttention(WindowAttentionBase):
    """Multi-head self-attention inside windows with a learned relative position bias.

    `fused = True` computes softmax(QK^T * scale + B + M) V for all windows and heads in
    one attention call (`layers.window_attention`: SDPA, with faster CPU kernels where
    measured); `fused = False` is the plain reference path of the official code.
    """

    def __init__(self, dim: int, window_size: tuple[int, int], num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__(dim, window_size, num_heads)
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def bias_sources(self) -> tuple[torch.Tensor, ...]:
        return self.relative_position_bias_table, self.relative_position_index

    def relative_position_bias(self) -> torch.Tensor:
        """(num_heads, N, N) bias gathered from the table."""
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (num_windows * B, N, C); mask: (num_windows, N, N) additive, or None."""
        if not self.fused:
            return self._forward_plain(x, mask)
        nw = 1 if mask is None else mask.shape[0]
        out = window_attention(self.qkv(x), self.joined_mask(mask), self.num_heads, nw, self.scale,
                               self.attn_drop.p if self.training else 0., self.spares)
        return self.proj_drop(self.proj(out))

    def _forward_plain(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B_, N, C = x.shape
        q, k, v = self.qkv(x).view(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.plain_output((q * self.scale) @ k.transpose(-2, -1), v, mask)


class SwinTransformerBlock(DerivedBuffers, nn.Module):
    """(Shifted-)window attention and an MLP, each with pre-norm and a residual.

    `fused_window_process` is accepted for the official signature; the fused path here
    needs no switch. `attn_layer` builds the attention (Swin V2 passes its own) from
    (dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop).
    """

    # The shift mask follows from resolution and shift: files made at another resolution, or
    # without the buffer, still load.
    derived_buffers = ('attn_mask',)

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: float | None = None, drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0., act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = nn.LayerNorm, fused_window_process: bool = False,
                 attn_layer: Callable[..., nn.Module] = WindowAttention):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        window_size, shift_size = fit_window(input_resolution, window_size, shift_size)
        self.window_size = window_size
        self.shift_size = shift_size

        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, to_2tuple(window_size), num_heads, qkv_bias=qkv_bias,
                               qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path_prob = drop_path
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

        self._mask_size = tuple(-(-s // window_size) * window_size for s in input_resolution)
        mask = shifted_window_mask(*self._mask_size, window_size, shift_size) if shift_size else None
        # Persistent like the official `attn_mask`, so official checkpoints load strictly.
        self.register_buffer('attn_mask', mask)
        self._layouts: dict[tuple, tuple] = {}

    def _apply(self, fn, *args, **kwargs):
        self._layouts.clear()  # .to()/.half() replace the mask buffer: rebuild the cache
        return super()._apply(fn, *args, **kwargs)

    def window_layout(self, Hp: int, Wp: int, shift: int, device: torch.device):
        """(index, inverse, mask) for a padded Hp x Wp map, built once per size and device.

        `index[k]` is the raster position of the k-th token in (cyclically shifted) window
        order, so one gather does the shift and the window partition together; `inverse`
        undoes both. Both are None when the order is already raster order (no shift and
        windows as wide as the map). `mask` is the shift mask, or None without a shift.
        Tensors made under inference_mode cannot be saved for backward, so layouts made
        there are kept apart from those that training uses. Under torch.compile nothing is
        cached (the layout is traced into the graph; reading the inference mode would break it).
        """
        compiling = torch.compiler.is_compiling()
        key = None if compiling else (Hp, Wp, shift, device, torch.is_inference_mode_enabled())
        layout = None if compiling else self._layouts.get(key)
        if layout is None:
            ws = self.window_size
            index = inverse = mask = None
            if shift or Wp != ws:
                grid = torch.arange(Hp * Wp, device=device).view(1, Hp, Wp, 1)
                if shift:
                    grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
                index = window_partition(grid, ws).reshape(-1)
                inverse = torch.empty_like(index)
                inverse[index] = torch.arange(index.numel(), device=device)
            if shift:
                own = self.attn_mask
                reuse = own is not None and (Hp, Wp) == self._mask_size and own.device == device
                mask = own if reuse else shifted_window_mask(Hp, Wp, ws, shift, device)
            layout = (index, inverse, mask)
            if key is not None:
                self._layouts[key] = layout
        return layout

    def attend_windows(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """(Shifted-)window attention over a (B, H*W, C) map, returned as (B, H*W, C).

        A map that is not whole windows is zero-padded at the bottom and right (after the
        norm in V1, as the official backbone does) and cropped back afterwards.
        """
        B, L, C = x.shape
        ws = self.window_size
        pad_b, pad_r = -H % ws, -W % ws
        if pad_b or pad_r:
            x = F.pad(x.view(B, H, W, C), (0, 0, 0, pad_r, 0, pad_b)).view(B, -1, C)
        Hp, Wp = H + pad_b, W + pad_r
        # A map no larger than the window at this size gets one window and no shift.
        shift = self.shift_size if min(H, W) > ws else 0
        index, inverse, mask = self.window_layout(Hp, Wp, shift, x.device)
        windows = x if index is None else permute_tokens(x, index, inverse)
        windows = self.attn(windows.reshape(-1, ws * ws, C), mask).view(B, Hp * Wp, C)
        y = windows if index is None else permute_tokens(windows, inverse, index)
        if pad_b or pad_r:
            y = y.view(B, Hp, Wp, C)[:, :H, :W].reshape(B, L, C)
        return y

    def forward(self, x: torch.Tensor, H: int | None = None, W: int | None = None) -> torch.Tensor:
        """x: (B, H*W, C) -> (B, H*W, C). H, W default to the construction resolution."""
        if H is None or W is None:
            H, W = self.input_resolution
        x = add_drop_path(x, self.attend_windows(self.norm1(x), H, W), self.drop_path_prob, self.training)
        return add_drop_path(x, self.mlp_branch(self.norm2(x)), self.drop_path_prob, self.training)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual's MLP branch (Swin-MoE's blocks route it through experts)."""
        return self.mlp(x)

    def flops(self) -> float:
        H, W = self.input_resolution
        num_windows = H * W / self.window_size / self.window_size
        return (2 * self.dim * H * W + num_windows * self.attn.flops(self.window_size * self.window_size)
                + 2 * H * W * self.dim * self.dim * self.mlp_ratio)


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (4C), normalize, project to 2C."""

    def __init__(self, input_resolution: tuple[int, int], dim: int, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.input_resolution = input_resolution
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: torch.Tensor, H: int | None = None,
                W: int | None = None) -> tuple[torch.Tensor, int, int]:
        """(B, H*W, C) -> ((B, ceil(H/2)*ceil(W/2), 2C), H', W'); odd sizes are zero-padded."""
        if H is None or W is None:
            H, W = self.input_resolution
        x, H, W = self.merge(x, H, W)
        return self.reduction(self.norm(x)), H, W

    @staticmethod
    def merge(x: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, int, int]:
        """(B, H*W, C) -> ((B, ceil(H/2)*ceil(W/2), 4C), H', W'): each 2x2 neighbourhood's
        channels side by side, odd sizes zero-padded."""
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # Official channel order: (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1).
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, -1, 4 * C)
        return x, H // 2, W // 2

    def flops(self) -> int:
        H, W = self.input_resolution
        return H * W * self.dim + (H // 2) * (W // 2) * 4 * self.dim * 2 * self.dim


class BasicLayer(nn.Module):
    """One stage: `depth` blocks alternating plain and shifted windows, then downsampling.
    `block_layer` builds each block from the keyword arguments of `SwinTransformerBlock`."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int,
                 window_size: int, mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: float | None = None, drop: float = 0., attn_drop: float = 0.,
                 drop_path: float | list[float] = 0., norm_layer: type[nn.Module] = nn.LayerNorm,
                 downsample: type[nn.Module] | None = None, use_checkpoint: bool = False,
                 fused_window_process: bool = False, block_layer: Callable[..., nn.Module] = SwinTransformerBlock):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            block_layer(
                dim=dim, input_resolution=input_resolution, num_heads=num_heads, window_size=window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                qk_scale=qk_scale, drop=drop, attn_drop=attn_drop,
                drop_path=drop_path[i] if isinstance(drop_path, list) else drop_path, norm_layer=norm_layer)
            for i in range(depth)])
        self.downsample = downsample(input_resolution, dim=dim, norm_layer=norm_layer) if downsample else None

    def forward(self, x: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Returns (stage output before downsampling, next stage input, its H, its W)."""
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(blk, x, H, W, use_reentrant=False)
            else:
                x = blk(x, H, W)
        if self.downsample is None:
            return x, x, H, W
        down, H2, W2 = self.downsample(x, H, W)
        return x, down, H2, W2

    def flops(self) -> float:
        total = sum(blk.flops() for blk in self.blocks)
        return total + (self.downsample.flops() if self.downsample is not None else 0)


class PatchEmbed(nn.Module):
    """Image to patch tokens by a strided convolution; sizes not divisible by the patch are padded."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 4,
                 in_chans: int = 3, embed_dim: int = 96, norm_layer: type[nn.Module] | None = None):
        super().__init__()
        img_size, patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.patches_resolution = [img_size[0] // patch_size[0], img_size[1] // patch_size[1]]
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(B, C, H, W) -> ((B, Ho*Wo, D), Ho, Wo)."""
        ph, pw = self.patch_size
        pad_b, pad_r = -x.shape[2] % ph, -x.shape[3] % pw
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        x = self.proj(x)
        Ho, Wo = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return x, Ho, Wo

    def flops(self) -> int:
        Ho, Wo = self.patches_resolution
        flops = Ho * Wo * self.embed_dim * self.in_chans * (self.patch_size[0] * self.patch_size[1])
        return flops + (Ho * Wo * self.embed_dim if self.norm is not None else 0)


class SwinTransformer(FreezableStages, nn.Module):
    """Swin Transformer V1 with the official constructor arguments and state_dict keys."""

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: list[int] = (2, 2, 6, 2), num_heads: list[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: float | None = None, drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1, norm_layer: type[nn.Module] = nn.LayerNorm, ape: bool = False,
                 patch_norm: bool = True, use_checkpoint: bool = False, fused_window_process: bool = False,
                 **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.mlp_ratio = mlp_ratio

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, norm_layer=norm_layer if patch_norm else None)
        self.patches_resolution = self.patch_embed.patches_resolution
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        # stochastic depth rate grows linearly over all blocks
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device='cpu')]
        self.layers = nn.ModuleList()
        res = self.patches_resolution
        for i in range(self.num_layers):
            self.layers.append(self.make_stage(
                i, dim=int(embed_dim * 2 ** i),
                input_resolution=(res[0] // 2 ** i, res[1] // 2 ** i),
                depth=depths[i], num_heads=num_heads[i], window_size=window_size, mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_layer=norm_layer,
                downsample=PatchMerging if i < self.num_layers - 1 else None,
                use_checkpoint=use_checkpoint))
        self.norm = norm_layer(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    def make_stage(self, index: int, **kwargs) -> nn.Module:
        """Stage `index` from `BasicLayer`'s keyword arguments (Swin V2 builds its own)."""
        return BasicLayer(**kwargs)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {'absolute_pos_embed'}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {'relative_position_bias_table'}

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP shards as units of their own, gathered one at a time: every block.
        The root unit takes the rest (patch embedding, patch merging, final norm, head)."""
        return [blk for layer in self.layers for blk in layer.blocks]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.use_checkpoint = enable

    def _position_embedding(self, H: int, W: int) -> torch.Tensor:
        pos = self.absolute_pos_embed
        ph, pw = self.patches_resolution
        if (H, W) == (ph, pw):
            return pos
        # another input size: resize the learned grid, as the official backbone does
        grid = pos.view(1, ph, pw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(H, W), mode='bicubic', align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int]:
        """Patch tokens (B, H*W, C) with the position embedding and dropout, and the patch grid
        H, W. With `mask` (B, H, W) of 0/1 (SimMIM encoders, which own a `mask_token`), the
        tokens of the patches marked 1 are replaced by the mask token before anything else."""
        x, H, W = self.patch_embed(x)
        if mask is not None:
            weight = mask.flatten(1).unsqueeze(-1).type_as(x)
            x = x * (1. - weight) + self.mask_token.type_as(x) * weight
        if self.ape:
            x = x + self._position_embedding(H, W)
        return self.pos_drop(x), H, W

    def forward_features(self, x: torch.Tensor, return_stages: bool = False):
        """Pooled, normalized features (B, num_features); or, with `return_stages`,
        the list of each stage's output before downsampling as (B, C_i, H_i, W_i)."""
        x, H, W = self.embed(x)
        stages = []
        for layer in self.layers:
            stage_out, x, H2, W2 = layer(x, H, W)
            if return_stages:
                stages.append(stage_out.transpose(1, 2).reshape(x.shape[0], -1, H, W))
            H, W = H2, W2
        if return_stages:
            return stages
        x = self.norm(x)
        return torch.flatten(self.avgpool(x.transpose(1, 2)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def flops(self) -> float:
        """Multiply-adds at the construction size, as the official `flops()` counts them."""
        total = self.patch_embed.flops() + sum(layer.flops() for layer in self.layers)
        total += self.num_features * self.patches_resolution[0] * self.patches_resolution[1] // (2 ** self.num_layers)
        return total + self.num_features * self.num_classes

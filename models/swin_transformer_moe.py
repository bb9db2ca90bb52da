"""Swin-MoE (the official Swin repository's mixture-of-experts model): Swin V1 blocks whose
attention takes V2's continuous position bias (an MLP over log-spaced offsets, without V2's
16 * sigmoid and without cosine attention), and whose MLP, in the blocks `moe_blocks` names,
is a mixture of experts (`moe_layer.MoELayer`, Tutel's semantics and parameter names).

The official constructor arguments and state_dict keys (`...mlp._moe_layer.gates.0.wg.weight`,
`...mlp._moe_layer.experts.batched_fc1_w`, ...); `forward` returns (logits, weighted l_aux) as
officially. Stages, patch embedding and merging, padding to any input size and freezing are
V1's (`swin_transformer`), as Swin-MLP reuses them.

Expert parallelism: with a process group of several ranks each rank holds `num_local_experts`
experts (of num_local_experts * world_size) and tokens travel by all-to-all; everything else is
data parallel. A negative `num_local_experts` -n shares one expert over n ranks (world_size / n
experts; each rank holds a 1/n slice of its expert's hidden layer, see `moe_layer.FusedExperts`).
Expert parameters (shards included) carry `skip_allreduce = True` and their names are listed
in `_ddp_params_and_buffers_to_ignore` (which DDP reads), so DDP neither broadcasts nor
averages them; a checkpoint of the experts is per rank.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from . import swin_transformer as v1
from .layers import Mlp
from .moe_layer import SKIP_ALLREDUCE, LocalDispatch, MoELayer, default_dispatch
from .swin_transformer_v2 import log_spaced_coords


class WindowAttention(v1.WindowAttentionBase):
    """V1's scaled dot-product window attention with a bias from `cpb_mlp` (2 -> 512 -> heads)
    over the log-spaced offsets, as the official Swin-MoE computes it."""

    derived_buffers = ('relative_position_index', 'relative_coords_table')

    def __init__(self, dim: int, window_size: tuple[int, int], num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0., proj_drop: float = 0.,
                 pretrained_window_size: tuple[int, int] = (0, 0)):
        super().__init__(dim, window_size, num_heads)
        self.pretrained_window_size = tuple(pretrained_window_size)
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        self.register_buffer('relative_coords_table', log_spaced_coords(window_size, self.pretrained_window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def bias_sources(self) -> tuple[torch.Tensor, ...]:
        return (self.cpb_mlp[0].weight, self.cpb_mlp[0].bias, self.cpb_mlp[2].weight, self.relative_coords_table,
                self.relative_position_index)

    def relative_position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        return table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    # the same attention as V1 once the bias is known
    forward = v1.WindowAttention.forward
    _forward_plain = v1.WindowAttention._forward_plain


class DenseMlp(Mlp):
    """The dense MLP, optionally without the fc2 bias (`mlp_fc2_bias`); the fused CPU kernel
    needs that bias, so without it the plain path runs."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0., fc2_bias: bool = True):
        super().__init__(in_features, hidden_features, drop=drop)
        if not fc2_bias:
            self.fc2 = nn.Linear(hidden_features, in_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc2.bias is None:
            return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
        return super().forward(x)


class MoEMlp(nn.Module):
    """The official wrapper's name (`mlp._moe_layer`); forward returns (y, l_aux)."""

    def __init__(self, in_features: int, hidden_features: int, num_local_experts: int, top_value: int,
                 capacity_factor: float = 1.25, cosine_router: bool = False, normalize_gate: bool = False,
                 use_bpr: bool = True, is_gshard_loss: bool = True, gate_noise: float = 1.0,
                 cosine_router_dim: int = 256, cosine_router_init_t: float = 0.5, moe_drop: float = 0.,
                 init_std: float = 0.02, mlp_fc2_bias: bool = True, dispatch: LocalDispatch | None = None):
        super().__init__()
        self.in_features = in_features
        self.hidden_features = hidden_features
        self._moe_layer = MoELayer(
            in_features, hidden_features, num_local_experts, top_value, capacity_factor, cosine_router,
            cosine_router_dim, cosine_router_init_t, gate_noise, normalize_gate, use_bpr, is_gshard_loss,
            moe_drop, mlp_fc2_bias, init_std, dispatch)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._moe_layer(x)

    def _init_weights(self) -> None:
        self._moe_layer.experts.reset_parameters()


class SwinTransformerBlock(v1.SwinTransformerBlock):
    """V1's block with the continuous-bias attention and a dense or mixture-of-experts MLP.

    A MoE block keeps its last auxiliary loss in `l_aux`: V1's stages pass one tensor between
    blocks, and the model collects the losses after its forward (under gradient checkpointing
    too, as the recomputation reproduces the same routing: the RNG state is restored)."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int = 7,
                 mlp_ratio: float = 4., drop: float = 0., pretrained_window_size: int = 0,
                 moe: dict | None = None, mlp_fc2_bias: bool = True, **kwargs):
        pws = (pretrained_window_size, pretrained_window_size)

        def attn_layer(*args, **kw):
            return WindowAttention(*args, pretrained_window_size=pws, **kw)

        super().__init__(dim, input_resolution, num_heads, window_size=window_size, mlp_ratio=mlp_ratio,
                         drop=drop, attn_layer=attn_layer, **kwargs)
        self.is_moe = moe is not None
        hidden = int(dim * mlp_ratio)
        if self.is_moe:
            self.capacity_factor = moe['capacity_factor']
            self.top_value = moe['top_value']
            self.mlp = MoEMlp(dim, hidden, mlp_fc2_bias=mlp_fc2_bias, **moe)
        else:
            self.mlp = DenseMlp(dim, hidden, drop=drop, fc2_bias=mlp_fc2_bias)
        self.l_aux: torch.Tensor | None = None

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_moe:
            return self.mlp(x)
        y, self.l_aux = self.mlp(x)
        return y

    def flops(self) -> float:
        """As officially: a MoE MLP counts capacity_factor * top_value dense MLPs."""
        total = super().flops()
        if self.is_moe:
            H, W = self.input_resolution
            total += 2 * H * W * self.dim * self.dim * self.mlp_ratio * (self.capacity_factor * self.top_value - 1)
        return total


class SwinTransformerMoE(v1.SwinTransformer):
    """Swin-MoE with the official constructor arguments and state_dict keys.

    forward(x) -> (logits, aux_loss_weight * sum of the MoE blocks' auxiliary losses); the
    training loop adds the second to the classification loss. `dispatch` (not an official
    argument) places the experts: by default all-to-all over the world when a process group of
    several ranks is up, else all experts in this process (`moe_layer.LocalDispatch`).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: list[int] = (2, 2, 6, 2), num_heads: list[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: float | None = None, drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1, norm_layer: type[nn.Module] = nn.LayerNorm, ape: bool = False,
                 patch_norm: bool = True, mlp_fc2_bias: bool = True, init_std: float = 0.02,
                 use_checkpoint: bool = False, pretrained_window_sizes: list[int] = (0, 0, 0, 0),
                 moe_blocks: list[list[int]] = ([-1], [-1], [-1], [-1]), num_local_experts: int = 1,
                 top_value: int = 1, capacity_factor: float = 1.25, cosine_router: bool = False,
                 normalize_gate: bool = False, use_bpr: bool = True, is_gshard_loss: bool = True,
                 gate_noise: float = 1.0, cosine_router_dim: int = 256, cosine_router_init_t: float = 0.5,
                 moe_drop: float = 0., aux_loss_weight: float = 0.01, dispatch: LocalDispatch | None = None,
                 **kwargs):
        for name, per_stage in (('moe_blocks', moe_blocks), ('pretrained_window_sizes', pretrained_window_sizes)):
            if len(per_stage) < len(depths):
                raise ValueError(f'{name} {list(per_stage)} needs one entry per stage ({len(depths)})')
        # Read by `make_stage` and `_init_weights` while V1's __init__ builds the model (plain
        # attributes may be set before nn.Module's own __init__).
        self.init_std = init_std
        self.mlp_fc2_bias = mlp_fc2_bias
        self.moe_blocks = [list(b) for b in moe_blocks[:len(depths)]]
        self.pretrained_window_sizes = [int(w) for w in pretrained_window_sizes[:len(depths)]]
        self.dispatch = dispatch if dispatch is not None else default_dispatch()
        self.moe_options = dict(
            num_local_experts=num_local_experts, top_value=top_value, capacity_factor=capacity_factor,
            cosine_router=cosine_router, normalize_gate=normalize_gate, use_bpr=use_bpr,
            is_gshard_loss=is_gshard_loss, gate_noise=gate_noise, cosine_router_dim=cosine_router_dim,
            cosine_router_init_t=cosine_router_init_t, moe_drop=moe_drop, init_std=init_std,
            dispatch=self.dispatch)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
                         mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop_rate=drop_rate,
                         attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, norm_layer=norm_layer,
                         ape=ape, patch_norm=patch_norm, use_checkpoint=use_checkpoint, **kwargs)
        self.aux_loss_weight = aux_loss_weight
        self.num_local_experts = num_local_experts
        if ape:
            trunc_normal_(self.absolute_pos_embed, std=init_std)
        # DDP leaves these alone (it reads this attribute): with experts spread over the ranks,
        # each rank's experts are its own. Replicated experts (one process) are averaged as usual.
        self._ddp_params_and_buffers_to_ignore = [
            name for name, p in self.named_parameters() if getattr(p, SKIP_ALLREDUCE, False)
        ] if self.dispatch.world_size > 1 else []

    def make_stage(self, index: int, **kwargs) -> nn.Module:
        moe_block = self.moe_blocks[index]
        position = itertools.count()  # BasicLayer builds its blocks in order 0, 1, ...

        def block_layer(**kw):
            return SwinTransformerBlock(
                pretrained_window_size=self.pretrained_window_sizes[index], mlp_fc2_bias=self.mlp_fc2_bias,
                moe=self.moe_options if next(position) in moe_block else None, **kw)

        return v1.BasicLayer(block_layer=block_layer, **kwargs)

    def _init_weights(self, m: nn.Module) -> None:
        # The official init with `init_std`; it covers the gates' and cpb_mlp's Linear layers too.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=self.init_std)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)
        elif isinstance(m, MoEMlp):
            m._init_weights()

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {'cpb_mlp', 'relative_position_bias_table', 'fc1_bias', 'fc2_bias', 'temperature',
                'cosine_projector', 'sim_matrix'}

    def moe_blocks_iter(self):
        return (blk for layer in self.layers for blk in layer.blocks if blk.is_moe)

    def add_param_to_skip_allreduce(self, param_name: str) -> None:
        self._ddp_params_and_buffers_to_ignore.append(param_name)

    def forward_features(self, x: torch.Tensor, return_stages: bool = False):
        """Pooled features and the summed auxiliary loss (unweighted), as the official returns;
        with `return_stages`, V1's list of stage maps."""
        for blk in self.moe_blocks_iter():
            blk.l_aux = None
        out = super().forward_features(x, return_stages)
        if return_stages:
            return out
        l_aux = out.new_zeros(())
        for blk in self.moe_blocks_iter():
            l_aux = l_aux + blk.l_aux
            blk.l_aux = None  # no graph kept alive between steps
        return out, l_aux

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, l_aux = self.forward_features(x)
        return self.head(x), l_aux * self.aux_loss_weight

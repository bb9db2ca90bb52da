"""SimMIM: masked image modeling with a Swin (V1 or V2) encoder, as the official pre-training.

A random set of 32 px squares (DATA.MASK_PATCH_SIZE, ratio DATA.MASK_RATIO) is given to the
model as a (B, H/4, W/4) 0/1 mask over its patches; the encoder replaces the masked patches'
tokens by a learned mask token, a one-layer decoder (1x1 convolution + pixel shuffle back to
the input resolution) predicts the pixels, and the loss is the L1 error on the masked pixels
only, optionally against locally normalized targets (MODEL.SIMMIM.NORM_TARGET). The state_dict
keys are the official ones: `encoder.*` (the backbone, no head) and `decoder.0.*`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .swin_transformer import SwinTransformer
from .swin_transformer_v2 import SwinTransformerV2


class _MaskedEncoder:
    """What turns a Swin classifier class into a SimMIM encoder: a mask token and a forward
    that returns the last stage's normalized feature map (B, C, H/32, W/32)."""

    def _add_mask_token(self) -> None:
        if self.num_classes != 0:
            raise ValueError(f'a SimMIM encoder has no head (num_classes 0), not {self.num_classes}')
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, mean=0., std=.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x, H, W = self.embed(x, mask)
        for layer in self.layers:
            _, x, H, W = layer(x, H, W)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, H, W)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {'mask_token'}


class SwinTransformerForSimMIM(_MaskedEncoder, SwinTransformer):
    """Swin V1 encoder for SimMIM (the official constructor arguments, num_classes=0)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._add_mask_token()


class SwinTransformerV2ForSimMIM(_MaskedEncoder, SwinTransformerV2):
    """Swin V2 encoder for SimMIM (the official constructor arguments, num_classes=0)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._add_mask_token()


def local_statistics(images: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel, the mean and the standard deviation (unbiased variance + 1e-6) of the
    `patch_size` x `patch_size` window around it (odd size; only pixels inside the image count)."""
    if patch_size % 2 != 1:
        raise ValueError(f'MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE must be odd, not {patch_size}')
    pool = dict(kernel_size=patch_size, stride=1, padding=patch_size // 2)
    mean = F.avg_pool2d(images, count_include_pad=False, **pool)
    mean_of_squares = F.avg_pool2d(images ** 2, count_include_pad=False, **pool)
    count = F.avg_pool2d(torch.ones_like(images), count_include_pad=True, **pool) * patch_size ** 2
    variance = ((mean_of_squares - mean ** 2) * (count / (count - 1))).clamp(min=0.)
    return mean, (variance + 1e-6) ** 0.5


def normalized_targets(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Each pixel standardized by its window's statistics, the official NORM_TARGET option."""
    mean, std = local_statistics(images, patch_size)
    return (images - mean) / std


class SimMIM(nn.Module):
    """Encoder + one-layer decoder; `forward(images, mask)` returns the scalar loss."""

    def __init__(self, encoder: nn.Module, encoder_stride: int, in_chans: int, patch_size: int,
                 norm_target: bool = False, norm_target_patch_size: int = 47):
        super().__init__()
        self.encoder = encoder
        self.encoder_stride = encoder_stride
        # the official decoder predicts 3 channels whatever in_chans is
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, encoder_stride ** 2 * 3, kernel_size=1),
            nn.PixelShuffle(encoder_stride))
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.norm_target = norm_target
        self.norm_target_patch_size = norm_target_patch_size

    def pixel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The (B, H/p, W/p) patch mask as a (B, 1, H, W) pixel mask."""
        p = self.patch_size
        return mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).contiguous()

    def forward(self, images: torch.Tensor, mask: torch.Tensor, reconstruct: bool = False) -> torch.Tensor:
        """The loss; with `reconstruct`, the predicted pixels (B, 3, H, W) at every position
        instead (asked through forward, so FSDP's hooks gather the weights for it too)."""
        predicted = self.decoder(self.encoder(images, mask))
        if reconstruct:
            return predicted
        pixel_mask = self.pixel_mask(mask)
        target = normalized_targets(images, self.norm_target_patch_size) if self.norm_target else images
        error = F.l1_loss(target, predicted, reduction='none')
        return (error * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / self.in_chans

    # The official pre-training puts "encoder." in front of the encoder's no-decay names and
    # keywords; a prefixed keyword no longer matches a nested name, so relative position bias
    # tables (and V2's cpb_mlp / logit_scale) are decayed in official SimMIM pre-training.
    # Kept as it is: the official grouping is the default.
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {'encoder.' + name for name in self.encoder.no_weight_decay()}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {'encoder.' + name for name in self.encoder.no_weight_decay_keywords()}

    def fsdp_units(self) -> list[nn.Module]:
        return self.encoder.fsdp_units()

    def freeze(self, stages: int, linear_probe: bool = False) -> list[str]:
        """TRAIN.FREEZE_STAGES on the encoder (the names it reports carry `encoder.`)."""
        return [f'encoder.{name}' for name in self.encoder.freeze(stages, linear_probe)]

    def flops(self) -> float:
        """The encoder's multiply-adds (without its absent head) and the decoder's 1x1 convolution."""
        grid = self.encoder.patches_resolution
        cells = grid[0] * grid[1] // (self.encoder_stride // self.patch_size) ** 2
        return self.encoder.flops() + cells * self.encoder.num_features * self.decoder[0].out_channels

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)


ENCODERS = {'swin': SwinTransformerForSimMIM, 'swinv2': SwinTransformerV2ForSimMIM}

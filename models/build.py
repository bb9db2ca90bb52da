"""Build the model named by MODEL.TYPE from a validated config."""
from __future__ import annotations

import torch.nn as nn
from yacs.config import CfgNode

from .swin_transformer import SwinTransformer
from .swin_transformer_v2 import SwinTransformerV2


def build_model(config: CfgNode, is_pretrain: bool = False) -> nn.Module:
    """`is_pretrain` is accepted for signature compatibility with the official code."""
    model_type = config.MODEL.TYPE.lower()
    if model_type not in ('swin', 'swinv2'):
        raise ValueError(f"unknown model type '{model_type}'")  # validate_config rejects it first
    s = config.MODEL.SWIN if model_type == 'swin' else config.MODEL.SWINV2
    common = dict(img_size=config.DATA.IMG_SIZE, patch_size=s.PATCH_SIZE, in_chans=s.IN_CHANS,
                  num_classes=config.MODEL.NUM_CLASSES, embed_dim=s.EMBED_DIM, depths=list(s.DEPTHS),
                  num_heads=list(s.NUM_HEADS), window_size=s.WINDOW_SIZE, mlp_ratio=s.MLP_RATIO,
                  qkv_bias=s.QKV_BIAS, drop_rate=config.MODEL.DROP_RATE,
                  drop_path_rate=config.MODEL.DROP_PATH_RATE, ape=s.APE, patch_norm=s.PATCH_NORM,
                  use_checkpoint=config.TRAIN.USE_CHECKPOINT)
    if model_type == 'swin':
        return SwinTransformer(qk_scale=s.QK_SCALE, **common)
    return SwinTransformerV2(pretrained_window_sizes=list(s.PRETRAINED_WINDOW_SIZES), **common)

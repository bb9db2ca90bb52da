"""Build the model named by MODEL.TYPE from a validated config."""
from __future__ import annotations

import torch.nn as nn
from yacs.config import CfgNode

from .simmim import ENCODERS, SimMIM
from .swin_mlp import SwinMLP
from .swin_transformer import SwinTransformer
from .swin_transformer_moe import SwinTransformerMoE
from .swin_transformer_v2 import SwinTransformerV2

CLASSIFIERS = {'swin': SwinTransformer, 'swinv2': SwinTransformerV2}


def _swin_kwargs(config: CfgNode, model_type: str) -> dict:
    """The official constructor arguments of a Swin V1 / V2 model from its config section."""
    s = config.MODEL.SWIN if model_type == 'swin' else config.MODEL.SWINV2
    kwargs = dict(img_size=config.DATA.IMG_SIZE, patch_size=s.PATCH_SIZE, in_chans=s.IN_CHANS,
                  num_classes=config.MODEL.NUM_CLASSES, embed_dim=s.EMBED_DIM, depths=list(s.DEPTHS),
                  num_heads=list(s.NUM_HEADS), window_size=s.WINDOW_SIZE, mlp_ratio=s.MLP_RATIO,
                  qkv_bias=s.QKV_BIAS, drop_rate=config.MODEL.DROP_RATE,
                  drop_path_rate=config.MODEL.DROP_PATH_RATE, ape=s.APE, patch_norm=s.PATCH_NORM,
                  use_checkpoint=config.TRAIN.USE_CHECKPOINT)
    if model_type == 'swin':
        kwargs['qk_scale'] = s.QK_SCALE
    else:
        kwargs['pretrained_window_sizes'] = list(s.PRETRAINED_WINDOW_SIZES)
    return kwargs


def _simmim(config: CfgNode, model_type: str) -> SimMIM:
    """The official SimMIM model: a head-less encoder with a mask token, the 1x1 decoder."""
    kwargs = dict(_swin_kwargs(config, model_type), num_classes=0)
    target = config.MODEL.SIMMIM.NORM_TARGET
    # the official code fixes 32, the stride of its 4-stage models; fewer stages downsample less
    stride = kwargs['patch_size'] * 2 ** (len(kwargs['depths']) - 1)
    return SimMIM(ENCODERS[model_type](**kwargs), encoder_stride=stride, in_chans=kwargs['in_chans'],
                  patch_size=kwargs['patch_size'], norm_target=target.ENABLE, norm_target_patch_size=target.PATCH_SIZE)


def _swin_mlp(config: CfgNode) -> SwinMLP:
    s = config.MODEL.SWIN_MLP
    return SwinMLP(img_size=config.DATA.IMG_SIZE, patch_size=s.PATCH_SIZE, in_chans=s.IN_CHANS,
                   num_classes=config.MODEL.NUM_CLASSES, embed_dim=s.EMBED_DIM, depths=list(s.DEPTHS),
                   num_heads=list(s.NUM_HEADS), window_size=s.WINDOW_SIZE, mlp_ratio=s.MLP_RATIO,
                   drop_rate=config.MODEL.DROP_RATE, drop_path_rate=config.MODEL.DROP_PATH_RATE, ape=s.APE,
                   patch_norm=s.PATCH_NORM, use_checkpoint=config.TRAIN.USE_CHECKPOINT)


def _swin_moe(config: CfgNode) -> SwinTransformerMoE:
    """The official constructor arguments from MODEL.SWIN_MOE (their names lower-cased)."""
    s = config.MODEL.SWIN_MOE
    options = {key.lower(): s[key] for key in (
        'PATCH_SIZE', 'IN_CHANS', 'EMBED_DIM', 'WINDOW_SIZE', 'MLP_RATIO', 'QKV_BIAS', 'QK_SCALE', 'APE',
        'PATCH_NORM', 'MLP_FC2_BIAS', 'INIT_STD', 'NUM_LOCAL_EXPERTS', 'TOP_VALUE', 'CAPACITY_FACTOR',
        'COSINE_ROUTER', 'NORMALIZE_GATE', 'USE_BPR', 'IS_GSHARD_LOSS', 'GATE_NOISE', 'COSINE_ROUTER_DIM',
        'COSINE_ROUTER_INIT_T', 'MOE_DROP', 'AUX_LOSS_WEIGHT')}
    return SwinTransformerMoE(img_size=config.DATA.IMG_SIZE, num_classes=config.MODEL.NUM_CLASSES,
                              depths=list(s.DEPTHS), num_heads=list(s.NUM_HEADS),
                              pretrained_window_sizes=list(s.PRETRAINED_WINDOW_SIZES),
                              moe_blocks=[list(b) for b in s.MOE_BLOCKS], drop_rate=config.MODEL.DROP_RATE,
                              drop_path_rate=config.MODEL.DROP_PATH_RATE,
                              use_checkpoint=config.TRAIN.USE_CHECKPOINT, **options)


def build_model(config: CfgNode, is_pretrain: bool = False) -> nn.Module:
    """The classifier MODEL.TYPE names; with `is_pretrain`, the SimMIM model of that Swin
    backbone (official keys `encoder.*`, `decoder.*`; forward(images, mask) -> loss).
    validate_config rejects the combinations raised on here first."""
    model_type = config.MODEL.TYPE.lower()
    if model_type == 'swin_mlp' and not is_pretrain:
        return _swin_mlp(config)
    if model_type == 'swin_moe' and not is_pretrain:
        return _swin_moe(config)  # forward returns (logits, weighted auxiliary loss)
    if model_type not in CLASSIFIERS:
        raise ValueError(f"no {'SimMIM ' if is_pretrain else ''}model for MODEL.TYPE '{model_type}'")
    if is_pretrain:
        return _simmim(config, model_type)
    return CLASSIFIERS[model_type](**_swin_kwargs(config, model_type))

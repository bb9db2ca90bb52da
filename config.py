"""Run configuration: yacs defaults under the official Swin key names, YAML files with
`BASE:` inheritance, `--opts KEY VALUE` overrides, command-line flags, and validation.

Every user mistake found here raises `ConfigError` with one line that names the key,
the value and the fix; `main.py` prints it and exits with code 2.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
from collections.abc import Iterable
from typing import Any

import yaml
from yacs.config import CfgNode as CN

from utils import ConfigError

_C = CN()

# Base config files, resolved relative to the YAML file that names them
_C.BASE = ['']

# -----------------------------------------------------------------------------
# Data settings
# -----------------------------------------------------------------------------
_C.DATA = CN()
# Batch size for a single GPU (per process)
_C.DATA.BATCH_SIZE = 128
# Path to dataset
_C.DATA.DATA_PATH = ''
# Dataset name: imagenet (class folders, or ZIP_MODE), imagenet22k (the official list layout),
# synthetic, wds (WebDataset shards train-*.tar / val-*.tar), hf (a Hugging Face DatasetDict
# saved with save_to_disk, or imagenet-1k parquet files)
_C.DATA.DATASET = 'imagenet'
# Input image size
_C.DATA.IMG_SIZE = 224
# Interpolation to resize image (random, bilinear, bicubic)
_C.DATA.INTERPOLATION = 'bicubic'
# Use zipped dataset instead of folder dataset
_C.DATA.ZIP_MODE = False
# Cache data in memory: no | part | full
_C.DATA.CACHE_MODE = 'part'
# Pin CPU memory in DataLoader for faster copies to the GPU
_C.DATA.PIN_MEMORY = True
# Number of data loading worker processes
_C.DATA.NUM_WORKERS = 8
# [SimMIM] Pre-training masks the image in squares of this many pixels (a multiple of the
# model's patch size that divides DATA.IMG_SIZE) ...
_C.DATA.MASK_PATCH_SIZE = 32
# [SimMIM] ... and masks this fraction of the squares
_C.DATA.MASK_RATIO = 0.6
# [New] Batches each worker prepares ahead of use
_C.DATA.PREFETCH_FACTOR = 2
# [New] Decode JPEGs at 1/2, 1/4 or 1/8 scale (DCT scaling) when the crop would still be at
# least the output size there, so it is resized down anyway; faster, slightly different pixels
_C.DATA.REDUCED_DECODE = False
# [New] Unreadable images are logged, replaced and counted; the run stops once they exceed
# this fraction of the split
_C.DATA.MAX_CORRUPT_FRACTION = 0.001
# [New] Images in the train and val splits of DATA.DATASET 'synthetic'
_C.DATA.SYNTHETIC_LENGTH = [12800, 2560]
# [New] DATA.DATASET wds: the training / validation shards as a brace pattern of local paths
# or of URLs WebDataset's gopen opens (pipe:, http(s)://, ...); empty: DATA_PATH/train-*.tar
# and DATA_PATH/val-*.tar
_C.DATA.WDS_TRAIN = ''
_C.DATA.WDS_VAL = ''
# [New] The local folder that shards given as URLs are copied into once; empty:
# ~/.cache/swin-shards
_C.DATA.WDS_CACHE = ''
# [New] A built-in dataset written to DATA.DATA_PATH as an image folder when that path does
# not exist yet: '' (none) or 'digits' (scikit-learn's handwritten digits, for the demo)
_C.DATA.PREPARE = ''
# [New] Who decodes and augments: 'torch' (DataLoader workers, timm's transforms) or 'dali'
# (NVIDIA DALI, on the GPU where there is one; docs/data.md, "GPU decoding with DALI")
_C.DATA.LOADER = 'torch'

# -----------------------------------------------------------------------------
# Model settings
# -----------------------------------------------------------------------------
_C.MODEL = CN()
# Model type, read from its section: swin (V1, MODEL.SWIN), swinv2 (V2, MODEL.SWINV2) or
# swin_mlp (Swin-MLP, MODEL.SWIN_MLP); swin_moe (MODEL.SWIN_MOE) is accepted in YAML files but
# stops validation: Swin-MoE is not implemented yet. SimMIM pre-training uses swin or swinv2.
_C.MODEL.TYPE = 'swin'
# Model name (names the output folder)
_C.MODEL.NAME = 'swin_tiny_patch4_window7_224'
# Pretrained weights to start from
_C.MODEL.PRETRAINED = ''
# Checkpoint to resume from
_C.MODEL.RESUME = ''
# [New] With --pretrained: a text file with one class index of the pretrained classifier per
# line (line i = the model's class i), e.g. the official map22kto1k.txt, so a 22k head keeps
# its rows for 1k classes; '' re-initializes a head whose class count differs
_C.MODEL.PRETRAINED_CLASS_MAP = ''
# Number of classes
_C.MODEL.NUM_CLASSES = 1000
# Dropout rate
_C.MODEL.DROP_RATE = 0.0
# Stochastic depth rate (linearly increasing over blocks)
_C.MODEL.DROP_PATH_RATE = 0.1
# Label smoothing
_C.MODEL.LABEL_SMOOTHING = 0.1

# Swin Transformer parameters
_C.MODEL.SWIN = CN()
_C.MODEL.SWIN.PATCH_SIZE = 4
_C.MODEL.SWIN.IN_CHANS = 3
_C.MODEL.SWIN.EMBED_DIM = 96
_C.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWIN.WINDOW_SIZE = 7
_C.MODEL.SWIN.MLP_RATIO = 4.
_C.MODEL.SWIN.QKV_BIAS = True
_C.MODEL.SWIN.QK_SCALE = None
_C.MODEL.SWIN.APE = False
_C.MODEL.SWIN.PATCH_NORM = True

# Swin Transformer V2 parameters
_C.MODEL.SWINV2 = CN()
_C.MODEL.SWINV2.PATCH_SIZE = 4
_C.MODEL.SWINV2.IN_CHANS = 3
_C.MODEL.SWINV2.EMBED_DIM = 96
_C.MODEL.SWINV2.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWINV2.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWINV2.WINDOW_SIZE = 7
_C.MODEL.SWINV2.MLP_RATIO = 4.
_C.MODEL.SWINV2.QKV_BIAS = True
_C.MODEL.SWINV2.APE = False
_C.MODEL.SWINV2.PATCH_NORM = True
_C.MODEL.SWINV2.PRETRAINED_WINDOW_SIZES = [0, 0, 0, 0]

# Swin-MoE parameters: accepted for official YAML compatibility; Swin-MoE is not implemented
# yet, so MODEL.TYPE swin_moe stops at validation and none of these keys has an effect here
_C.MODEL.SWIN_MOE = CN()
_C.MODEL.SWIN_MOE.PATCH_SIZE = 4
_C.MODEL.SWIN_MOE.IN_CHANS = 3
_C.MODEL.SWIN_MOE.EMBED_DIM = 96
_C.MODEL.SWIN_MOE.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN_MOE.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWIN_MOE.WINDOW_SIZE = 7
_C.MODEL.SWIN_MOE.MLP_RATIO = 4.
_C.MODEL.SWIN_MOE.QKV_BIAS = True
_C.MODEL.SWIN_MOE.QK_SCALE = None
_C.MODEL.SWIN_MOE.APE = False
_C.MODEL.SWIN_MOE.PATCH_NORM = True
# Bias in the second layer of the dense and expert MLPs
_C.MODEL.SWIN_MOE.MLP_FC2_BIAS = True
# Std of the truncated-normal weight initialization
_C.MODEL.SWIN_MOE.INIT_STD = 0.02
_C.MODEL.SWIN_MOE.PRETRAINED_WINDOW_SIZES = [0, 0, 0, 0]
# Per stage, the indices of the blocks whose MLP is a mixture of experts ([-1]: none)
_C.MODEL.SWIN_MOE.MOE_BLOCKS = [[-1], [-1], [-1], [-1]]
# Experts per GPU; a negative -n shares one expert among n GPUs
_C.MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS = 1
# Experts each token is routed to (top-k)
_C.MODEL.SWIN_MOE.TOP_VALUE = 1
# Tokens an expert takes, as a multiple of an even share
_C.MODEL.SWIN_MOE.CAPACITY_FACTOR = 1.25
# Cosine router (with its projection size and initial temperature below) instead of a linear one
_C.MODEL.SWIN_MOE.COSINE_ROUTER = False
# Normalize the top-k gate values to sum to 1
_C.MODEL.SWIN_MOE.NORMALIZE_GATE = False
# Batch prioritized routing: tokens with the highest gate values claim capacity first
_C.MODEL.SWIN_MOE.USE_BPR = True
# GShard's load-balancing loss instead of the Switch Transformer's
_C.MODEL.SWIN_MOE.IS_GSHARD_LOSS = False
# Scale of the noise added to the router's logits in training
_C.MODEL.SWIN_MOE.GATE_NOISE = 1.0
_C.MODEL.SWIN_MOE.COSINE_ROUTER_DIM = 256
_C.MODEL.SWIN_MOE.COSINE_ROUTER_INIT_T = 0.5
# Dropout inside the experts
_C.MODEL.SWIN_MOE.MOE_DROP = 0.0
# Weight of the load-balancing loss added to the classification loss
_C.MODEL.SWIN_MOE.AUX_LOSS_WEIGHT = 0.01

# Swin-MLP parameters (MODEL.TYPE swin_mlp): window attention is replaced by a grouped spatial
# MLP over each window, NUM_HEADS groups per stage (the channels of a group: the "C" of
# swin_mlp_tiny_c24)
_C.MODEL.SWIN_MLP = CN()
_C.MODEL.SWIN_MLP.PATCH_SIZE = 4
_C.MODEL.SWIN_MLP.IN_CHANS = 3
_C.MODEL.SWIN_MLP.EMBED_DIM = 96
_C.MODEL.SWIN_MLP.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN_MLP.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWIN_MLP.WINDOW_SIZE = 7
_C.MODEL.SWIN_MLP.MLP_RATIO = 4.
_C.MODEL.SWIN_MLP.APE = False
_C.MODEL.SWIN_MLP.PATCH_NORM = True

# [SimMIM] Pre-training's pixel targets: each pixel normalized by the mean and variance of the
# PATCH_SIZE x PATCH_SIZE window around it (odd size) when ENABLE, else the raw pixels
_C.MODEL.SIMMIM = CN()
# [New] Run SimMIM pre-training: the SimMIM model of the swin / swinv2 backbone
# (build_model(config, is_pretrain=True)) on masked images, no labels. The official code has a
# separate script for it (main_simmim_pt.py) instead of a key
_C.MODEL.SIMMIM.PRETRAIN = False
_C.MODEL.SIMMIM.NORM_TARGET = CN()
_C.MODEL.SIMMIM.NORM_TARGET.ENABLE = False
_C.MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE = 47

# -----------------------------------------------------------------------------
# Training settings
# -----------------------------------------------------------------------------
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
# Clip gradient norm; 0 or null disables clipping
_C.TRAIN.CLIP_GRAD = 5.0
# Auto resume from latest checkpoint
_C.TRAIN.AUTO_RESUME = True
# Gradient accumulation steps
_C.TRAIN.ACCUMULATION_STEPS = 1
# Activation checkpointing to save memory
_C.TRAIN.USE_CHECKPOINT = False
# [New] torch.compile the model for training (the DDP-wrapped module), validation, --eval and
# --throughput; checkpoints keep the plain module's keys
_C.TRAIN.COMPILE = False
# [New] Updates with a non-finite loss or gradient norm are skipped and counted; after this
# many in a row the run saves a checkpoint and stops (exit code 3)
_C.TRAIN.MAX_CONSECUTIVE_SKIPS = 25
# [New] How BASE_LR, WARMUP_LR and MIN_LR follow the effective batch (batch x world size x
# accumulation): 'linear' multiplies them by batch / 512 (the official rule), 'sqrt' by
# sqrt(batch / 512), 'none' uses them as written
_C.TRAIN.LR_SCALING = 'linear'
# [New] How the model is spread over processes: 'ddp' (a full replica per process),
# 'zero' (DDP with the optimizer state sharded: ZeroRedundancyOptimizer) or 'fsdp'
# (FSDP2 fully_shard per Swin block: parameters, gradients and optimizer state sharded;
# checkpoints are torch.distributed.checkpoint folders)
_C.TRAIN.PARALLEL = 'ddp'
_C.TRAIN.FSDP = CN()
# Gradients are reduced in this dtype: 'amp' (AMP_DTYPE when AMP is on, i.e. bf16, else
# fp32), 'fp32' or 'bf16' (half the traffic of fp32). Parameters are gathered in AMP_DTYPE
# when AMP is on; the optimizer always updates fp32 master weights.
_C.TRAIN.FSDP.REDUCE_DTYPE = 'amp'
# Keep the sharded parameters, gradients and optimizer state in CPU memory
_C.TRAIN.FSDP.CPU_OFFLOAD = False
# Free each block's gathered parameters after its forward (less memory, one more gather in backward)
_C.TRAIN.FSDP.RESHARD_AFTER_FORWARD = True

# LR scheduler
_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'
# Epoch interval to decay LR (step scheduler)
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
# LR decay rate (step scheduler)
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1
# Warmup is a prefix of the schedule rather than overlapping its start
_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = True
# Gamma and milestones (multistep scheduler)
_C.TRAIN.LR_SCHEDULER.GAMMA = 0.1
_C.TRAIN.LR_SCHEDULER.MULTISTEPS = []

# Optimizer
_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = 'adamw'
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
# SGD momentum
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9
# [New] SGD with Nesterov momentum (the official code always uses it)
_C.TRAIN.OPTIMIZER.NESTEROV = True
# [New] LARS trust coefficient: before momentum, a weight tensor's g + WEIGHT_DECAY x w
# is scaled by TRUST_COEFF x ||w|| / (||g|| + WEIGHT_DECAY x ||w||) (You et al. 2017; timm's default)
_C.TRAIN.OPTIMIZER.TRUST_COEFF = 0.001
# [New] Clip the layer-wise trust ratio: LARC for LARS (local LR at most the global LR),
# LAMBC for LAMB (ratio at most 1). LAMB and LARS share EPS, BETAS (LAMB), MOMENTUM and NESTEROV (LARS)
_C.TRAIN.OPTIMIZER.TRUST_CLIP = False

# Layer-wise LR decay for fine-tuning
_C.TRAIN.LAYER_DECAY = 1.0

# Swin-MoE training: accepted for official YAML compatibility; Swin-MoE is not implemented yet
_C.TRAIN.MOE = CN()
# Save the checkpoint from rank 0 only (the dense baselines) rather than every rank's experts
_C.TRAIN.MOE.SAVE_MASTER = False

# [New] Model EMA: an exponential moving average of the weights, updated after every
# optimizer update, validated each epoch beside the model and saved in checkpoints
_C.TRAIN.EMA = CN()
_C.TRAIN.EMA.ENABLE = False
_C.TRAIN.EMA.DECAY = 0.9998
# Ramp the decay up as 1 - (1 + update)^(-2/3), capped at DECAY (timm's EMA warmup), so
# early weights are not averaged in for long
_C.TRAIN.EMA.WARMUP = False

# [New] Freezing for fine-tuning: the patch embedding and the first FREEZE_STAGES stages
# are not trained (0: none); LINEAR_PROBE trains the classifier only
_C.TRAIN.FREEZE_STAGES = 0
_C.TRAIN.LINEAR_PROBE = False

# -----------------------------------------------------------------------------
# Augmentation settings
# -----------------------------------------------------------------------------
_C.AUG = CN()
# [New] Horizontal and vertical flip probabilities of the training crop
_C.AUG.HFLIP = 0.5
_C.AUG.VFLIP = 0.0
# Color jitter factor (used when AUTO_AUGMENT is off)
_C.AUG.COLOR_JITTER = 0.4
# AutoAugment / RandAugment policy string
_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'
# Random erase probability, mode and count
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = 'pixel'
_C.AUG.RECOUNT = 1
# Mixup alpha, mixup enabled if > 0
_C.AUG.MIXUP = 0.8
# Cutmix alpha, cutmix enabled if > 0
_C.AUG.CUTMIX = 1.0
# Cutmix min/max ratio, overrides alpha and enables cutmix if set
_C.AUG.CUTMIX_MINMAX = None
# Probability of performing mixup or cutmix when either/both is enabled
_C.AUG.MIXUP_PROB = 1.0
# Probability of switching to cutmix when both mixup and cutmix enabled
_C.AUG.MIXUP_SWITCH_PROB = 0.5
# How to apply mixup/cutmix params: batch, pair or elem
_C.AUG.MIXUP_MODE = 'batch'

# -----------------------------------------------------------------------------
# Testing settings
# -----------------------------------------------------------------------------
_C.TEST = CN()
# Resize to 256/224 of the size then center-crop (True) or resize straight to the size
_C.TEST.CROP = True
# Use a sequential sampler for validation
_C.TEST.SEQUENTIAL = False
_C.TEST.SHUFFLE = False

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
# [SimMIM] The official SimMIM scripts' AMP switch (flag --enable-amp; off by default there).
# Accepted for compatibility: this framework's runs, SimMIM included, use AMP_ENABLE
_C.ENABLE_AMP = False
# Enable torch automatic mixed precision
_C.AMP_ENABLE = True
# [New] AMP compute dtype: bf16 (no loss scaling needed) or fp16 (with a gradient scaler)
_C.AMP_DTYPE = 'bf16'
# [New] fp32 math on CUDA (AMP off, and what autocast leaves in fp32) uses TF32 tensor cores
# for matmuls and convolutions, as torch did by default when the official code was written
# (torch < 1.12); False keeps full fp32 matmuls (torch's default since 1.12)
_C.TF32 = True
# [Deprecated] apex opt level; 'O0' disables AMP
_C.AMP_OPT_LEVEL = ''
# Output root; the run writes to OUTPUT/MODEL.NAME/TAG.
# (The official default is '' with a flag default of 'output'; the effect is the same.)
_C.OUTPUT = 'output'
# Tag of experiment
_C.TAG = 'default'
# Frequency (epochs) to save checkpoints
_C.SAVE_FREQ = 1
# [New] Also checkpoint every this many optimizer updates, in the middle of epochs, so a
# killed or preempted run loses at most that much work (0: epoch checkpoints only)
_C.SAVE_STEP_FREQ = 500
# [New] Epoch checkpoints kept in the output folder (the oldest are deleted); 0 keeps all.
# best.pth and the last epoch's checkpoint are always kept
_C.SAVE_KEEP_LAST = 3
# Frequency (steps) to log
_C.PRINT_FREQ = 10
# Random seed (each rank adds its rank)
_C.SEED = 0
# Evaluation only
_C.EVAL_MODE = False
# Throughput test only
_C.THROUGHPUT_MODE = False
# Local rank, taken from the launcher's environment
_C.LOCAL_RANK = 0
# Official acceleration switches, accepted for compatibility: this project's window
# attention is always the fused path and LayerNorm is torch's fused kernel.
_C.FUSED_WINDOW_PROCESS = False
_C.FUSED_LAYERNORM = False

MODEL_TYPES = ('swin', 'swinv2', 'swin_mlp', 'swin_moe')
# the config section holding each model type's architecture
ARCH_SECTIONS = {'swin': 'SWIN', 'swinv2': 'SWINV2', 'swin_mlp': 'SWIN_MLP', 'swin_moe': 'SWIN_MOE'}
# types whose keys load (so the official YAML files do) but whose model this framework lacks
# the backbones SimMIM pre-training wraps (build_model(config, is_pretrain=True))
PRETRAIN_TYPES = ('swin', 'swinv2')
# the official names fused_adam / fused_lamb (apex's FusedAdam / FusedLAMB there): torch's
# fused AdamW, and LAMB with FusedLAMB's own gradient-norm clip at 1.0
OPTIMIZERS = ('adamw', 'sgd', 'lamb', 'lars', 'fused_adam', 'fused_lamb')
LR_SCHEDULERS = ('cosine', 'linear', 'step', 'multistep')
CACHE_MODES = ('no', 'part', 'full')
AMP_DTYPES = ('bf16', 'fp16')
LR_SCALINGS = ('linear', 'sqrt', 'none')
PARALLELS = ('ddp', 'zero', 'fsdp')
REDUCE_DTYPES = ('amp', 'fp32', 'bf16')
PREPARED_DATASETS = ('', 'digits')
DATASETS = ('imagenet', 'imagenet22k', 'synthetic', 'wds', 'hf')
LOADERS = ('torch', 'dali')
INTERPOLATIONS = ('bicubic', 'bilinear', 'random', 'nearest', 'lanczos', 'hamming', 'box')
MIXUP_MODES = ('batch', 'pair', 'elem')
ERASE_MODES = ('const', 'rand', 'pixel')


def default_config() -> CN:
    """A fresh, mutable copy of the defaults."""
    return _C.clone()


def _all_keys(node: CN, prefix: str = '') -> list[str]:
    keys = []
    for k, v in node.items():
        keys.append(prefix + k)
        if isinstance(v, CN):
            keys.extend(_all_keys(v, prefix + k + '.'))
    return keys


def _unknown_key(full_key: str, source: str) -> ConfigError:
    valid = _all_keys(_C)
    close = difflib.get_close_matches(full_key.upper(), valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else '; see config.py for the valid keys'
    return ConfigError(f"unknown config key '{full_key}' in {source}{hint}")


# keys whose non-null default may be set to null to switch the feature off
_NULLABLE = {'TRAIN.CLIP_GRAD'}


def _type_name(value: Any) -> str:
    return type(value).__name__


def _coerce(value: Any, default: Any, full_key: str, source: str) -> Any:
    """Return `value` converted to the type of `default`, or raise ConfigError.

    Stricter than a cast (no str -> int, no int -> bool) but friendlier than yacs:
    an int is accepted where a float is expected, a number where a string is, and a
    list where a tuple is. null is accepted where the default is null or the key is
    one that null switches off.
    """
    if default is None or (value is None and full_key in _NULLABLE):
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, (int, float)):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(default, float):
                return float(value)
            if isinstance(value, int) or float(value).is_integer():
                return int(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            sample = [d for d in default if d is not None]
            if sample:
                value = [_coerce(v, sample[0], full_key, source) for v in value]
            return type(default)(value)
    raise ConfigError(
        f"config key '{full_key}' expects {_type_name(default)} (like {default!r}), "
        f"got {value!r} ({_type_name(value)}) in {source}")


def _decode(value: Any, default: Any) -> Any:
    """Strings from the command line or YAML that spell a Python literal become that literal,
    except for keys that hold text (a TAG of '1e-3' stays '1e-3')."""
    if isinstance(default, str):
        return value
    if isinstance(value, str):
        return CN._decode_cfg_value(value)
    if isinstance(value, list):
        return [_decode(v, None) for v in value]
    return value


def _merge_mapping(node: CN, data: dict, source: str, prefix: str = '') -> None:
    for key, value in data.items():
        full_key = prefix + str(key)
        if key not in node:
            raise _unknown_key(full_key, source)
        current = node[key]
        if isinstance(current, CN):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full_key}' is a section and needs a mapping, "
                                  f"got {value!r} in {source}")
            _merge_mapping(current, value, source, full_key + '.')
        else:
            if isinstance(value, dict):
                raise ConfigError(f"config key '{full_key}' is a value, not a section, in {source}")
            node[key] = _coerce(_decode(value, current), current, full_key, source)


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}' if mark is not None else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise ConfigError(f"cannot parse YAML file '{path}'{where}: {problem}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {_type_name(data)}")
    return data


def merge_config_file(config: CN, cfg_file: str, _chain: tuple[str, ...] = ()) -> None:
    """Merge a YAML file into `config`, its `BASE:` files first (relative to the file)."""
    path = os.path.abspath(cfg_file)
    if path in _chain:
        raise ConfigError(f"config file '{cfg_file}' includes itself through BASE")
    if not os.path.isfile(path):
        if _chain:
            raise ConfigError(f"BASE file '{cfg_file}' named in '{_chain[-1]}' does not exist")
        raise ConfigError(f"config file '{cfg_file}' does not exist (check --cfg)")
    data = _read_yaml(path)
    bases = data.pop('BASE', [''])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list):
        raise ConfigError(f"BASE in '{cfg_file}' must be a list of file names")
    for base in bases:
        if base:
            merge_config_file(config, os.path.join(os.path.dirname(path), base), _chain + (path,))
    _merge_mapping(config, data, f"'{cfg_file}'")


def merge_opts(config: CN, opts: list[str]) -> None:
    """Merge `--opts KEY VALUE [KEY VALUE ...]`."""
    if len(opts) % 2:
        raise ConfigError(f"--opts needs KEY VALUE pairs; '{opts[-1]}' has no value")
    for full_key, value in zip(opts[0::2], opts[1::2]):
        *path, last = full_key.split('.')
        node = config
        for part in path:
            if part not in node or not isinstance(node[part], CN):
                raise _unknown_key(full_key, '--opts')
            node = node[part]
        if last not in node:
            raise _unknown_key(full_key, '--opts')
        if isinstance(node[last], CN):
            raise ConfigError(f"--opts key '{full_key}' is a section; name one of its keys")
        node[last] = _coerce(_decode(value, node[last]), node[last], full_key, '--opts')


# flag attribute -> config key, for flags whose value is copied when given
_VALUE_FLAGS = {
    'batch_size': 'DATA.BATCH_SIZE',
    'data_path': 'DATA.DATA_PATH',
    'cache_mode': 'DATA.CACHE_MODE',
    'pretrained': 'MODEL.PRETRAINED',
    'resume': 'MODEL.RESUME',
    'accumulation_steps': 'TRAIN.ACCUMULATION_STEPS',
    'output': 'OUTPUT',
    'tag': 'TAG',
    'optim': 'TRAIN.OPTIMIZER.NAME',
}
# store_true flag attribute -> (config key, value it sets)
_SWITCH_FLAGS = {
    'zip': ('DATA.ZIP_MODE', True),
    'use_checkpoint': ('TRAIN.USE_CHECKPOINT', True),
    'compile': ('TRAIN.COMPILE', True),
    'disable_amp': ('AMP_ENABLE', False),
    'eval': ('EVAL_MODE', True),
    'throughput': ('THROUGHPUT_MODE', True),
    'fused_window_process': ('FUSED_WINDOW_PROCESS', True),
    'fused_layernorm': ('FUSED_LAYERNORM', True),
    'enable_amp': ('ENABLE_AMP', True),
    'simmim_pretrain': ('MODEL.SIMMIM.PRETRAIN', True),
}


def set_key(config: CN, full_key: str, value: Any) -> None:
    """Set a dotted key (for example TRAIN.BASE_LR) of an unfrozen config."""
    *path, last = full_key.split('.')
    node = config
    for part in path:
        node = node[part]
    node[last] = value


def _get(config: CN, full_key: str) -> Any:
    node = config
    for part in full_key.split('.'):
        node = node[part]
    return node


def merge_flags(config: CN, args: argparse.Namespace) -> None:
    """Copy the official convenience flags into `config`; a flag not given changes nothing."""
    for attr, key in _VALUE_FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None:
            set_key(config, key, _coerce(value, _get(config, key), key, f'--{attr.replace("_", "-")}'))
    for attr, (key, value) in _SWITCH_FLAGS.items():
        if getattr(args, attr, False):
            set_key(config, key, value)
    if getattr(args, 'amp_opt_level', None) == 'O0':
        config.AMP_ENABLE = False


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_choice(value: str, choices: Iterable[str], key: str) -> None:
    choices = tuple(choices)
    if str(value).lower() not in choices:
        close = difflib.get_close_matches(str(value).lower(), choices, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ''
        raise ConfigError(f"{key} '{value}' is not one of {', '.join(choices)}{hint}")


def _check_positive(value: Any, key: str) -> None:
    _check(isinstance(value, (int, float)) and value > 0, f"{key} must be positive, got {value!r}")


def _check_rate(value: Any, key: str) -> None:
    _check(0.0 <= value < 1.0, f"{key} must be in [0, 1), got {value!r}")


def _check_non_negative(value: Any, key: str) -> None:
    _check(math.isfinite(value) and value >= 0, f"{key} must be a finite number >= 0, got {value!r}")


def validate_config(config: CN) -> None:
    """Reject values that would fail later, deep inside model or data code."""
    _check_choice(config.MODEL.TYPE, MODEL_TYPES, 'MODEL.TYPE')
    model_type = str(config.MODEL.TYPE).lower()
    if model_type == 'swin_moe':
        _validate_moe(config)
    _check(bool(config.MODEL.NAME.strip()), 'MODEL.NAME must not be empty: it names the output folder')
    _check(bool(config.TAG.strip()), 'TAG must not be empty: it names the output folder')
    _check_positive(config.DATA.IMG_SIZE, 'DATA.IMG_SIZE')
    _check_positive(config.DATA.BATCH_SIZE, 'DATA.BATCH_SIZE')
    _check(config.DATA.NUM_WORKERS >= 0, f"DATA.NUM_WORKERS must be >= 0, got {config.DATA.NUM_WORKERS}")
    _check_choice(config.DATA.CACHE_MODE, CACHE_MODES, 'DATA.CACHE_MODE')
    _validate_data(config)
    _check_positive(config.TRAIN.EPOCHS, 'TRAIN.EPOCHS')
    _check(config.TRAIN.START_EPOCH >= 0, f"TRAIN.START_EPOCH must be >= 0, got {config.TRAIN.START_EPOCH}")
    _check(config.TRAIN.WARMUP_EPOCHS >= 0,
           f"TRAIN.WARMUP_EPOCHS must be >= 0, got {config.TRAIN.WARMUP_EPOCHS}")
    _check(config.TRAIN.ACCUMULATION_STEPS >= 1,
           f"TRAIN.ACCUMULATION_STEPS must be >= 1, got {config.TRAIN.ACCUMULATION_STEPS}")
    _check(config.MODEL.NUM_CLASSES >= 0, f"MODEL.NUM_CLASSES must be >= 0, got {config.MODEL.NUM_CLASSES}")
    _check_rate(config.MODEL.DROP_RATE, 'MODEL.DROP_RATE')
    _check_rate(config.MODEL.DROP_PATH_RATE, 'MODEL.DROP_PATH_RATE')
    _check_rate(config.MODEL.LABEL_SMOOTHING, 'MODEL.LABEL_SMOOTHING')
    for key in ('BASE_LR', 'WARMUP_LR', 'MIN_LR', 'WEIGHT_DECAY'):
        _check_non_negative(config.TRAIN[key], f'TRAIN.{key}')
    if config.TRAIN.CLIP_GRAD is not None:  # 0 or null: no clipping
        _check_non_negative(config.TRAIN.CLIP_GRAD, 'TRAIN.CLIP_GRAD')
    _check_choice(config.TRAIN.OPTIMIZER.NAME, OPTIMIZERS, 'TRAIN.OPTIMIZER.NAME')
    _check_positive(config.TRAIN.OPTIMIZER.TRUST_COEFF, 'TRAIN.OPTIMIZER.TRUST_COEFF')
    _check_choice(config.TRAIN.LR_SCHEDULER.NAME, LR_SCHEDULERS, 'TRAIN.LR_SCHEDULER.NAME')
    _check_choice(config.TRAIN.LR_SCALING, LR_SCALINGS, 'TRAIN.LR_SCALING')
    _check_choice(config.TRAIN.PARALLEL, PARALLELS, 'TRAIN.PARALLEL')
    _check_choice(config.TRAIN.FSDP.REDUCE_DTYPE, REDUCE_DTYPES, 'TRAIN.FSDP.REDUCE_DTYPE')
    _check(config.SAVE_FREQ >= 1, f"SAVE_FREQ must be >= 1 (epochs), got {config.SAVE_FREQ}")
    _check(config.SAVE_STEP_FREQ >= 0, f"SAVE_STEP_FREQ must be >= 0 (0: off), got {config.SAVE_STEP_FREQ}")
    _check(config.TRAIN.MAX_CONSECUTIVE_SKIPS >= 1,
           f"TRAIN.MAX_CONSECUTIVE_SKIPS must be >= 1, got {config.TRAIN.MAX_CONSECUTIVE_SKIPS}")
    _check(config.SAVE_KEEP_LAST >= 0, f"SAVE_KEEP_LAST must be >= 0 (0 keeps all), got {config.SAVE_KEEP_LAST}")
    _check(config.PRINT_FREQ >= 1, f"PRINT_FREQ must be >= 1 (steps), got {config.PRINT_FREQ}")
    _check_choice(config.AMP_DTYPE, AMP_DTYPES, 'AMP_DTYPE')
    _check(0.0 <= config.TRAIN.EMA.DECAY < 1.0, f"TRAIN.EMA.DECAY must be in [0, 1), got {config.TRAIN.EMA.DECAY}")
    _validate_simmim(config)
    arch, section = model_arch(config)
    stages = len(arch.DEPTHS)
    _check(0 <= config.TRAIN.FREEZE_STAGES <= stages,
           f"TRAIN.FREEZE_STAGES must be in [0, {stages}] (the model's stages), got {config.TRAIN.FREEZE_STAGES}")
    _check(not (config.TRAIN.LINEAR_PROBE and config.MODEL.NUM_CLASSES == 0),
           "TRAIN.LINEAR_PROBE trains the classifier only, but MODEL.NUM_CLASSES is 0 (no classifier)")
    _validate_architecture(arch, section)
    _check(config.DATA.IMG_SIZE >= arch.PATCH_SIZE,
           f"DATA.IMG_SIZE {config.DATA.IMG_SIZE} is smaller than one patch ({section}.PATCH_SIZE "
           f"{arch.PATCH_SIZE}); nothing would be left to attend to")
    if config.MODEL.SIMMIM.PRETRAIN:  # after the architecture checks: PATCH_SIZE is positive here
        validate_pretrain_config(config)


def _validate_simmim(config: CN) -> None:
    """SimMIM keys that are wrong whatever the run (the pre-training-only checks are in
    validate_pretrain_config)."""
    _check_positive(config.DATA.MASK_PATCH_SIZE, 'DATA.MASK_PATCH_SIZE')
    _check(0.0 <= config.DATA.MASK_RATIO < 1.0, f"DATA.MASK_RATIO must be in [0, 1), got {config.DATA.MASK_RATIO}")
    target = config.MODEL.SIMMIM.NORM_TARGET
    _check(not target.ENABLE or (target.PATCH_SIZE > 0 and target.PATCH_SIZE % 2 == 1),
           f"MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE must be a positive odd size (the window centred on each "
           f"pixel), got {target.PATCH_SIZE}")


def validate_pretrain_config(config: CN) -> None:
    """What SimMIM pre-training needs beyond validate_config: a swin / swinv2 backbone and a mask
    grid that tiles the image and is made of whole model patches (as the official mask generator
    asserts)."""
    _check(str(config.MODEL.TYPE).lower() in PRETRAIN_TYPES,
           f"SimMIM pre-training needs MODEL.TYPE {' or '.join(PRETRAIN_TYPES)}, got '{config.MODEL.TYPE}'")
    _check(not config.EVAL_MODE, '--eval scores a classifier; SimMIM pre-training reports its reconstruction '
           'loss on the validation images every epoch (drop --simmim-pretrain to evaluate a fine-tuned model)')
    _check(config.DATA.LOADER.lower() == 'torch', 'SimMIM pre-training draws its masks in the torch loader: '
           'set DATA.LOADER torch')
    _check(config.DATA.DATASET.lower() != 'synthetic', 'SimMIM pre-training needs images (DATA.DATASET synthetic '
           'has no masks)')
    arch, section = model_arch(config)
    img, mask = config.DATA.IMG_SIZE, config.DATA.MASK_PATCH_SIZE
    _check(img % mask == 0, f"DATA.IMG_SIZE {img} must be a multiple of DATA.MASK_PATCH_SIZE {mask} for SimMIM")
    _check(mask % arch.PATCH_SIZE == 0, f"DATA.MASK_PATCH_SIZE {mask} must be a multiple of {section}.PATCH_SIZE "
           f"{arch.PATCH_SIZE} for SimMIM (the mask covers whole patches)")


def _validate_moe(config: CN) -> None:
    """What Swin-MoE runs support: experts placed over the ranks and data parallelism
    for the rest (DDP), in eager mode."""
    moe = config.MODEL.SWIN_MOE
    _check(config.TRAIN.PARALLEL == 'ddp', f"Swin-MoE trains with TRAIN.PARALLEL ddp (experts are split over the "
           f"ranks, the rest replicated), not '{config.TRAIN.PARALLEL}'")
    _check(not config.TRAIN.COMPILE, 'Swin-MoE runs eagerly: turn TRAIN.COMPILE (--compile) off')
    # n >= 1 experts per rank, or -n: one expert sharded over n ranks (the world size, unknown
    # here, must be a multiple of n: the model checks it).
    _check(moe.NUM_LOCAL_EXPERTS != 0, 'MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS must be n >= 1 (experts per rank) or -n '
           '(one expert shared by n ranks), not 0')
    _check(moe.TOP_VALUE in (1, 2), f'MODEL.SWIN_MOE.TOP_VALUE must be 1 or 2, not {moe.TOP_VALUE}')
    _check(len(moe.MOE_BLOCKS) >= len(moe.DEPTHS), f'MODEL.SWIN_MOE.MOE_BLOCKS needs one list per stage '
           f'({len(moe.DEPTHS)}), got {len(moe.MOE_BLOCKS)}')


def model_arch(config: CN) -> tuple[CN, str]:
    """The architecture section MODEL.TYPE reads (MODEL.SWIN, MODEL.SWINV2, MODEL.SWIN_MLP or
    MODEL.SWIN_MOE) and its name."""
    name = ARCH_SECTIONS[str(config.MODEL.TYPE).lower()]
    return config.MODEL[name], f'MODEL.{name}'


def mixup_active(config: CN) -> bool:
    """Whether mixup or cutmix is on (either alpha > 0, or a cutmix min/max ratio); never in
    SimMIM pre-training, which has no labels to mix (the official SimMIM transform has none)."""
    aug = config.AUG
    if config.MODEL.SIMMIM.PRETRAIN:
        return False
    return aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None


def _validate_data(config: CN) -> None:
    data, aug = config.DATA, config.AUG
    _check_choice(data.DATASET, DATASETS, 'DATA.DATASET')
    _check_choice(data.INTERPOLATION, INTERPOLATIONS, 'DATA.INTERPOLATION')
    _check_choice(data.PREPARE, PREPARED_DATASETS, 'DATA.PREPARE')
    _check_choice(data.LOADER, LOADERS, 'DATA.LOADER')
    if str(data.LOADER).lower() == 'dali':  # what the DALI pipeline (data/dali_loader.py) cannot do
        _check(data.DATASET.lower() != 'synthetic', "DATA.LOADER dali decodes encoded images; "
               "DATA.DATASET synthetic has none (use DATA.LOADER torch)")
        _check(data.IMG_SIZE > 32, f"DATA.LOADER dali does not do the padded crop of DATA.IMG_SIZE <= 32 "
               f"(got {data.IMG_SIZE}); use DATA.LOADER torch")
        _check(data.INTERPOLATION.lower() not in ('hamming', 'box'), f"DATA.LOADER dali has no "
               f"'{data.INTERPOLATION}' interpolation; use bicubic, bilinear, nearest, lanczos or random")
        _check(aug.AUTO_AUGMENT == 'none' or aug.AUTO_AUGMENT.startswith('rand'),
               f"DATA.LOADER dali supports RandAugment ('rand-m9-mstd0.5-inc1') or 'none' as "
               f"AUG.AUTO_AUGMENT, got '{aug.AUTO_AUGMENT}'")
    _check(data.PREFETCH_FACTOR >= 1, f"DATA.PREFETCH_FACTOR must be >= 1, got {data.PREFETCH_FACTOR}")
    _check(0.0 <= data.MAX_CORRUPT_FRACTION <= 1.0,
           f"DATA.MAX_CORRUPT_FRACTION must be in [0, 1], got {data.MAX_CORRUPT_FRACTION}")
    lengths = list(data.SYNTHETIC_LENGTH)
    _check(len(lengths) == 2 and all(n > 0 for n in lengths),
           f"DATA.SYNTHETIC_LENGTH must be two positive image counts [train, val], got {lengths}")
    for key in ('HFLIP', 'VFLIP', 'REPROB', 'MIXUP_PROB', 'MIXUP_SWITCH_PROB'):
        _check(0.0 <= aug[key] <= 1.0, f"AUG.{key} is a probability in [0, 1], got {aug[key]}")
    _check(aug.RECOUNT >= 1, f"AUG.RECOUNT must be >= 1, got {aug.RECOUNT}")
    _check_choice(aug.REMODE, ERASE_MODES, 'AUG.REMODE')
    _check_choice(aug.MIXUP_MODE, MIXUP_MODES, 'AUG.MIXUP_MODE')
    _check(aug.MIXUP >= 0 and aug.CUTMIX >= 0, f"AUG.MIXUP and AUG.CUTMIX must be >= 0, got {aug.MIXUP}, {aug.CUTMIX}")
    if aug.CUTMIX_MINMAX is not None:
        lo_hi = list(aug.CUTMIX_MINMAX)
        _check(len(lo_hi) == 2 and 0.0 < lo_hi[0] < lo_hi[1] <= 1.0,
               f"AUG.CUTMIX_MINMAX must be [min, max] with 0 < min < max <= 1, got {lo_hi}")
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    _check(not (training and mixup_active(config) and data.BATCH_SIZE % 2),
           f"DATA.BATCH_SIZE {data.BATCH_SIZE} must be even when mixup/cutmix is on (images are mixed in pairs); "
           f"use an even batch or AUG.MIXUP 0 AUG.CUTMIX 0")


def _validate_architecture(arch: CN, section: str) -> None:
    for name in ('PATCH_SIZE', 'WINDOW_SIZE', 'EMBED_DIM', 'IN_CHANS', 'MLP_RATIO'):
        _check_positive(arch[name], f'{section}.{name}')
    depths, heads = list(arch.DEPTHS), list(arch.NUM_HEADS)
    _check(len(depths) > 0, f"{section}.DEPTHS must list at least one stage")
    _check(len(depths) == len(heads),
           f"{section}.DEPTHS has {len(depths)} stages but {section}.NUM_HEADS has {len(heads)}; "
           f"give one head count per stage")
    _check(all(d > 0 for d in depths), f"{section}.DEPTHS must be positive, got {depths}")
    for i, h in enumerate(heads):
        dim = arch.EMBED_DIM * 2 ** i
        _check(h > 0 and dim % h == 0,
               f"{section}.NUM_HEADS[{i}]={h} must divide the stage width {dim} "
               f"({section}.EMBED_DIM * 2^{i})")
    if 'PRETRAINED_WINDOW_SIZES' in arch:
        pretrained = list(arch.PRETRAINED_WINDOW_SIZES)
        # longer lists are cut to the stages, as the official model does (the default has 4)
        _check(len(pretrained) >= len(depths),
               f"{section}.PRETRAINED_WINDOW_SIZES has {len(pretrained)} entries but {section}.DEPTHS has "
               f"{len(depths)} stages; give one window size per stage (0: not pretrained at another window)")
        _check(all(w >= 0 for w in pretrained),
               f"{section}.PRETRAINED_WINDOW_SIZES must be >= 0 (0: none), got {pretrained}")


def get_config(args: argparse.Namespace) -> CN:
    """Defaults <- YAML (with BASE) <- --opts <- flags; validated and frozen.

    `args` needs `cfg`; every other attribute is optional, so callers may pass a minimal
    Namespace. The output folder becomes OUTPUT/MODEL.NAME/TAG as in the official code.
    """
    config = default_config()
    cfg_file = getattr(args, 'cfg', None)
    if not cfg_file:
        raise ConfigError('--cfg FILE is required (for example configs/swin_tiny_patch4_window7_224.yaml)')
    merge_config_file(config, cfg_file)
    if getattr(args, 'opts', None):
        merge_opts(config, list(args.opts))
    merge_flags(config, args)
    config.LOCAL_RANK = int(os.environ.get('LOCAL_RANK', 0))
    config.MODEL.TYPE = config.MODEL.TYPE.lower()
    config.TRAIN.OPTIMIZER.NAME = config.TRAIN.OPTIMIZER.NAME.lower()
    config.TRAIN.LR_SCHEDULER.NAME = config.TRAIN.LR_SCHEDULER.NAME.lower()
    config.TRAIN.LR_SCALING = config.TRAIN.LR_SCALING.lower()
    config.TRAIN.PARALLEL = config.TRAIN.PARALLEL.lower()
    config.TRAIN.FSDP.REDUCE_DTYPE = config.TRAIN.FSDP.REDUCE_DTYPE.lower()
    config.DATA.PREPARE = config.DATA.PREPARE.lower()
    config.AMP_DTYPE = config.AMP_DTYPE.lower()
    for section, key in (('DATA', 'DATASET'), ('DATA', 'INTERPOLATION'), ('DATA', 'CACHE_MODE'),
                         ('AUG', 'MIXUP_MODE'), ('AUG', 'REMODE')):
        config[section][key] = config[section][key].lower()
    validate_config(config)
    config.OUTPUT = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    config.freeze()
    return config


def config_from_yaml_text(text: str, source: str = "the checkpoint's config") -> CN:
    """A config from YAML text (the `config` entry of a checkpoint: a full `config.dump()`)
    over the defaults, validated and frozen, so tools rebuild a run's model from its
    checkpoint alone."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse the YAML of {source}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of keys, got {_type_name(data)}")
    config = default_config()
    _merge_mapping(config, data, source)
    validate_config(config)
    config.freeze()
    return config

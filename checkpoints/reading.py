"""Reading checkpoints safely: `torch.load(weights_only=True)` with one-line errors, the
newest readable checkpoint of a folder, and the model weights of any known format
(ours, the official files, timm's training checkpoints, bare state dicts, sharded folders).

A checkpoint is a plain dict (`model` in the official key format, `optimizer`,
`lr_scheduler`, `scaler`, `epoch`, `max_accuracy`, `config` as a YAML string, plus `step`,
`ranks`, ...): no pickled objects. Sharded runs (TRAIN.PARALLEL fsdp) write the same
content as a folder (`*.dcp`, see sharded.py).
"""
from __future__ import annotations

import argparse
import logging
import os

import torch

from models.adapt import LoadReport, fit_weights
from utils import CheckpointError, error_line

from . import sharded
from .experts import expert_names, own_model_state
from .folder import resume_candidates


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint file safely (weights_only) on the CPU, or raise CheckpointError.
    For a sharded checkpoint folder: its non-tensor part, the tensors stay on disk until
    `model_state_dict` (or a training resume) reads them."""
    if os.path.isdir(path):
        return _read_sharded_meta(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        # timm's train.py stores its argparse.Namespace beside the weights: plain values, allowed
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises several types for torn or foreign files
        if 'Weights only load failed' in str(e):
            raise CheckpointError(f"checkpoint '{path}' holds pickled Python objects, which safe "
                                  f"(weights_only) loading refuses; save its state dicts only") from None
        raise CheckpointError(f"cannot read checkpoint '{path}' (truncated, or not a PyTorch "
                              f"checkpoint): {error_line(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a dict of weights")
    return obj


def _read_sharded_meta(path: str) -> dict:
    """The non-tensor part of a sharded checkpoint, with sharded.SHARDED naming its folder."""
    meta_path = os.path.join(path, sharded.META_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"'{path}' is a folder without {sharded.META_FILE}: not a checkpoint of this project")
    meta = read_checkpoint(meta_path)
    meta[sharded.SHARDED] = path
    return meta


def newest_readable_checkpoint(folder: str, logger: logging.Logger) -> tuple[str, dict] | None:
    """The newest checkpoint in `folder` that loads; unreadable ones are skipped with a
    warning naming them (and left on disk for the user to inspect)."""
    for path in resume_candidates(folder):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as e:
            logger.warning(f'auto-resume skips {e}')
    return None


def model_state_dict(checkpoint: dict) -> dict:
    """The weights of an official/our checkpoint (`model` entry), of a timm training
    checkpoint (`state_dict`) or of a bare state dict, without DDP's `module.` prefix; the
    full weights of a sharded checkpoint."""
    if sharded.SHARDED in checkpoint:
        return sharded.read_full_state(checkpoint[sharded.SHARDED])
    state = checkpoint.get('model', checkpoint.get('state_dict', checkpoint))
    if not isinstance(state, dict):
        raise CheckpointError(f"the checkpoint's 'model' entry is a {type(state).__name__}, not a state dict")
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state.items()}


def load_pretrained(model: torch.nn.Module, path: str, logger: logging.Logger, class_map: str = '',
                    allow_head_reinit: bool = True) -> LoadReport:
    """Load the weights in `path` (any format `model_state_dict` knows) into `model`, adapted
    as a fine-tuning needs (models.adapt.fit_weights). `allow_head_reinit` False
    (evaluation) makes a class-count mismatch without a class map an error rather than a
    head of zeros."""
    state = model_state_dict(read_checkpoint(path))
    if experts := expert_names(model):  # Swin-MoE over several ranks: this rank's experts of the file's all
        state = own_model_state(state, model, experts, path)
    return fit_weights(model, state, path, logger, class_map, allow_head_reinit)

"""Loading a training checkpoint's model and optimizer state into this run's model (plain or
FSDP-sharded) and optimizer (plain or ZeRO), whatever kind of run wrote it: a file from a
ddp / zero / single-process run, or a sharded folder from an fsdp run (resharded on load).
The optimizer's hyperparameters (betas, weight decay, momentum...) stay the config's."""
from __future__ import annotations

import torch

from distributed.parallel import is_sharded, is_zero
from models.weights import load_model_weights
from optimizer import optimizer_kind
from utils import CheckpointError

from . import sharded
from .reading import model_state_dict


def check_training_checkpoint(state: dict, path: str) -> None:
    """A training checkpoint has weights, optimizer state and an epoch (sharded: in its folder)."""
    required = ('epoch',) if sharded.SHARDED in state else ('model', 'optimizer', 'epoch')
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"'{path}' is not a training checkpoint (no {', '.join(missing)}); "
                              f"to start from its weights use --pretrained")


def load_model_and_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                             path: str) -> None:
    """Every rank: the checkpoint's weights (strictly) and optimizer state into `model` and
    `optimizer`; the param groups keep this run's settings."""
    settings = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
    if sharded.SHARDED in state:
        if is_zero(optimizer):
            raise CheckpointError(f"'{path}' is a sharded (fsdp) checkpoint; resume it with TRAIN.PARALLEL "
                                  f"fsdp or ddp, not zero")
        sharded.load_training_state(path, model, optimizer)
    else:
        _load_file_state(model, optimizer, state, path)
    for group, own in zip(optimizer.param_groups, settings):  # exactly this run's settings
        params = group['params']
        group.clear()
        group.update(own, params=params)


def _load_file_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, path: str) -> None:
    saved = state['optimizer']
    # the update rule and grouping; sizes are the weights' check, whose message names the keys
    layout = [(optimizer_kind(g), g.get('name')) for g in saved.get('param_groups', [])]
    if layout != [(optimizer_kind(g), g.get('name')) for g in optimizer.param_groups]:
        raise CheckpointError(f"the optimizer state in '{path}' is from another optimizer or parameter "
                              f"grouping than TRAIN.OPTIMIZER / TRAIN.LAYER_DECAY now give")
    if is_sharded(model):  # a ddp run continued as fsdp
        sharded.load_full_training_state(path, model, optimizer, model_state_dict(state), saved)
        return
    load_model_weights(model, model_state_dict(state), path)
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"the optimizer state in '{path}' does not fit this model "
                              f"({str(e).splitlines()[0]})") from None

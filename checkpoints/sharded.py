"""Sharded checkpoints of TRAIN.PARALLEL fsdp runs: folders written with torch.distributed.checkpoint.

Every rank writes its own shards of the model and the optimizer state, in parallel, into a
temporary folder; rank 0 then adds `meta.pt` (all the rest of a checkpoint: epoch,
scheduler, scaler, RNG states, config as YAML, ...) and renames the folder into place. A
checkpoint folder is therefore whole or absent, never torn; a killed write leaves a
'*.tmp-shards' folder that the next start removes.

DCP records where each shard sits in the full tensor, so a folder loads into any number
of processes (it is resharded on load), into a DDP or single-process run, and into a plain
model as full tensors (`read_full_state`: --eval, --pretrained, tools/, and
tools/consolidate_checkpoint.py, which writes one official-format file).
"""
from __future__ import annotations

import os
import shutil
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from distributed.process_group import DistContext, broadcast_object
from models.weights import check_fits, shapes_of
from utils import TMP_MARK, CheckpointError, OutputError, error_line

from .folder import replace_folder

META_FILE = 'meta.pt'
SHARDED = 'sharded_checkpoint'  # read_checkpoint's key naming the folder the tensors are in
TMP_SUFFIX = TMP_MARK + 'shards'  # the same name on every rank
# DCP raises CheckpointException (a BaseException, not an Exception) for a failure on any rank
DCP_ERRORS = (Exception, CheckpointException)


def state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shards of the model and optimizer state, named by parameter (DCP's format)."""
    model_state, optim_state = get_state_dict(model, [optimizer])
    return {'model': model_state, 'optimizer': optim_state}


def save(path: str, state: dict[str, Any], ctx: DistContext) -> None:
    """Every rank: write the `model` and `optimizer` shards of `state` and (rank 0) the rest
    of it to the folder `path`, replacing an older folder of that name only once the new
    one is complete. A failure on any rank raises OutputError on every rank."""
    tmp = path + TMP_SUFFIX
    error = None
    if ctx.is_main and os.path.exists(tmp):
        error = _try(lambda: shutil.rmtree(tmp))
    if broadcast_object(error) is None:  # the old temporary is gone before any rank writes
        try:
            dcp.save({'model': state['model'], 'optimizer': state['optimizer']}, checkpoint_id=tmp)
        except DCP_ERRORS as e:  # DCP gathers every rank's failure and raises it on all
            error = error_line(e)
        if ctx.is_main and error is None:
            meta = {k: v for k, v in state.items() if k not in ('model', 'optimizer')}
            error = _try(lambda: _publish(tmp, path, meta))
    error = broadcast_object(error)
    if error is not None:
        raise OutputError(f"cannot write checkpoint '{path}': {error}; earlier checkpoints are untouched")


def _try(action) -> str | None:
    try:
        action()
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        return error_line(e)
    return None


def _publish(tmp: str, path: str, meta: dict) -> None:
    """Rank 0: add the metadata file and rename the finished folder to its name."""
    with open(os.path.join(tmp, META_FILE), 'wb') as f:
        torch.save(meta, f)
        f.flush()
        os.fsync(f.fileno())
    replace_folder(tmp, path)


def _saved_tensors(path: str, prefix: str) -> dict[str, TensorStorageMetadata]:
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # a missing or unreadable .metadata file
        raise CheckpointError(f"cannot read the sharded checkpoint '{path}': {error_line(e)}") from None
    start = prefix + '.'
    return {k[len(start):]: v for k, v in metadata.state_dict_metadata.items()
            if k.startswith(start) and isinstance(v, TensorStorageMetadata)}


def read_full_state(path: str, prefix: str = 'model') -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors of `prefix` on the CPU, read by this process alone
    (no collective), e.g. the model weights for evaluation or conversion."""
    state = {name: torch.empty(item.size, dtype=item.properties.dtype)
             for name, item in _saved_tensors(path, prefix).items()}
    if not state:
        raise CheckpointError(f"the sharded checkpoint '{path}' holds no '{prefix}' tensors")
    try:
        with warnings.catch_warnings():  # DCP warns that no process group is used: intended here
            warnings.simplefilter('ignore', UserWarning)
            dcp.load({prefix: state}, checkpoint_id=path, no_dist=True)
    except DCP_ERRORS as e:  # a shard file missing or torn
        raise CheckpointError(f"cannot read the sharded checkpoint '{path}': {error_line(e)}") from None
    return state


def load_training_state(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank: load the model and optimizer state of `path` into this run's model
    (sharded or not, any number of processes). The model must be the same (strict)."""
    model_state, optim_state = get_state_dict(model, [optimizer])
    saved = _saved_tensors(path, 'model')
    check_fits(shapes_of(model_state), {k: tuple(v.size) for k, v in saved.items()}, path)
    state: dict[str, Any] = {'model': {k: v for k, v in model_state.items() if k in saved},
                             'optimizer': optim_state}
    try:
        dcp.load(state, checkpoint_id=path)
    except DCP_ERRORS as e:
        raise CheckpointError(f"the optimizer state in '{path}' does not fit this run "
                                   f"({error_line(e)}); TRAIN.OPTIMIZER and TRAIN.LAYER_DECAY must be "
                                   f"the checkpoint's") from None
    model_state.update(state['model'])
    set_state_dict(model, [optimizer], model_state_dict=model_state, optim_state_dict=state['optimizer'])


def load_full_training_state(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             model_state: dict, optim_state: dict) -> None:
    """Every rank: a checkpoint file's full weights and optimizer state into a sharded
    model (a DDP run continued with fsdp). The file numbers parameters in param-group
    order; FSDP's state dicts name them, so the numbers are mapped to names first."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g['params']]
    if len(order) != sum(len(g['params']) for g in optim_state['param_groups']):
        raise CheckpointError(f"the optimizer state in '{path}' does not fit this model "
                                   f"(another number of parameters)")
    named = {'state': {order[i]: v for i, v in optim_state['state'].items()},
             'param_groups': [{**g, 'params': [order[i] for i in g['params']]} for g in optim_state['param_groups']]}
    own = model.state_dict()
    check_fits(shapes_of(own), shapes_of(model_state), path)
    weights = {k: v for k, v in model_state.items() if k in own}
    set_state_dict(model, [optimizer], model_state_dict=weights, optim_state_dict=named,
                   options=StateDictOptions(full_state_dict=True))

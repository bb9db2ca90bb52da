"""Swin-MoE checkpoints hold every expert in one file.

Each rank trains its own experts (`num_local_experts` of them, rank r holding experts
r*E .. (r+1)*E - 1). Writing a checkpoint, every rank takes part in gathering the expert
tensors (weights, their optimizer moments, the EMA copy) along the expert dimension, so rank
0's file has the layout of one process holding all experts; resuming, each rank takes its
own slice back. A file thus needs no companion files and stays valid if a rank's disk
fails; a run resumes it on the same number of experts per rank x ranks. Sharded experts
(NUM_LOCAL_EXPERTS -n) gather the same way, one row per rank (its hidden slice): such a file
resumes on the same world size and n. The official
training writes one file per rank instead; tools/consolidate_checkpoint.py merges those.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from utils import CheckpointError


def expert_names(model: nn.Module) -> list[str]:
    """The parameters that differ per rank (empty unless experts are split over ranks)."""
    return list(getattr(model, '_ddp_params_and_buffers_to_ignore', ()))


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _own_slice(tensor: torch.Tensor, local: int, what: str, source: str) -> torch.Tensor:
    total = local * dist.get_world_size()
    if tensor.shape[0] != total:
        raise CheckpointError(f"'{source}' holds {tensor.shape[0]} experts in {what}; this run places {local} per "
                              f"process x {dist.get_world_size()} processes = {total}: resume it with "
                              f"{tensor.shape[0] // max(local, 1)} processes")
    rank = dist.get_rank()
    return tensor[rank * local:(rank + 1) * local].clone()


def _optimizer_indices(model: nn.Module, optimizer: torch.optim.Optimizer, names: list[str]) -> dict[int, int]:
    """{index of the parameter in the optimizer's state dict: its local expert count}."""
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g['params'])}
    params = dict(model.named_parameters())
    return {index[id(params[n])]: params[n].shape[0] for n in names if id(params[n]) in index}


def gather_model_state(state: dict, names: list[str]) -> dict:
    """Every rank: `state` with each expert tensor replaced by all ranks' experts."""
    return {k: _gather(v) if k in names else v for k, v in state.items()}


def gather_optimizer_state(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                           names: list[str]) -> dict:
    """Every rank: the optimizer state dict with the experts' moments gathered likewise."""
    per_param = dict(state['state'])
    for i in _optimizer_indices(model, optimizer, names):
        per_param[i] = {k: _gather(v) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in per_param[i].items()}
    return dict(state, state=per_param)


def own_model_state(state: dict, model: nn.Module, names: list[str], source: str) -> dict:
    """This rank's experts out of a file holding them all."""
    local = {n: p.shape[0] for n, p in model.named_parameters() if n in names}
    return {k: _own_slice(v, local[k], k, source) if k in local else v for k, v in state.items()}


def own_optimizer_state(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, names: list[str],
                        source: str) -> dict:
    per_param = dict(state['state'])
    for i, local in _optimizer_indices(model, optimizer, names).items():
        if i in per_param:
            per_param[i] = {k: _own_slice(v, local, 'its optimizer state', source)
                            if torch.is_tensor(v) and v.dim() > 0 else v for k, v in per_param[i].items()}
    return dict(state, state=per_param)


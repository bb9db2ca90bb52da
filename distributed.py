"""Process-group setup and the few collectives the run needs.

Rank and world size come from the launcher's environment (torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK); a plain `python main.py` is one process with no group.
CUDA gets nccl and one GPU per local rank, anything else runs on the CPU with gloo.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launched_by_torchrun() -> bool:
    return 'RANK' in os.environ and 'WORLD_SIZE' in os.environ


def init_distributed() -> DistContext:
    """Join the launcher's process group, or run as a single process without one."""
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if torch.cuda.is_available():
        device = torch.device('cuda', local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
    if not _launched_by_torchrun():
        return DistContext(0, 1, 0, device)
    if not dist.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        kwargs = {'device_id': device} if device.type == 'cuda' else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op for one process); returns the tensor."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (small objects only)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (small objects only)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]

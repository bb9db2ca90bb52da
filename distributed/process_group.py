"""Process-group setup and the few collectives the run needs.

Rank and world size come from the launcher's environment (torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK); a plain `python main.py` is one process with no group.
CUDA gets nccl and one GPU per local rank, anything else runs on the CPU with gloo.
"""
from __future__ import annotations

import gc
import inspect
import os
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from utils import USER_ERRORS, ConfigError, OutputError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control_group: Any = None  # a gloo group for small CPU-side agreements (None: the default group)

    @property
    def distributed(self) -> bool:
        return _active()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _active() -> bool:
    """A process group is up (the collectives below are no-ops without one)."""
    return dist.is_available() and dist.is_initialized()


def _launched_by_torchrun() -> bool:
    return 'RANK' in os.environ and 'WORLD_SIZE' in os.environ


def init_distributed(group_of_one: bool = False, cpu_collectives: bool = False) -> DistContext:
    """Join the launcher's process group, or run as a single process: without a group, or
    with `group_of_one` in a group of just this process (FSDP shards over a group).
    `cpu_collectives`: CUDA runs also reduce CPU tensors (gloo beside nccl), as FSDP's
    CPU offload needs for its gradient norm."""
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if torch.cuda.is_available():
        device = torch.device('cuda', local_gpu(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
    if not _launched_by_torchrun():
        if not group_of_one:
            return DistContext(0, 1, 0, device)
        if not dist.is_initialized():
            dist.init_process_group(_backend(device, cpu_collectives), store=dist.HashStore(), rank=0, world_size=1)
    elif not dist.is_initialized():
        backend = _backend(device, cpu_collectives)
        kwargs = {'device_id': device} if device.type == 'cuda' else {}
        store, rank, world_size = next(dist.rendezvous('env://'))
        # Keys of this attempt only: after torchrun restarts a group, a store still holding
        # the previous attempt's keys made new ranks dial a dead peer's address.
        attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f'attempt_{attempt}/', store),
                                rank=rank, world_size=world_size, **kwargs)
    control = dist.new_group(backend='gloo') if dist.get_backend() != 'gloo' else None
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, control)


def local_gpu(local_rank: int, visible: int) -> int:
    """The GPU index of this process: its local rank, or the only visible GPU when the
    launcher binds one GPU per task (SLURM's --gpus-per-task, CUDA_VISIBLE_DEVICES per rank)."""
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise ConfigError(f'local rank {local_rank} has no GPU of its own ({visible} visible); start at most '
                      f'{visible} processes per node (--nproc_per_node), or bind one GPU to each')


def _backend(device: torch.device, cpu_collectives: bool) -> str:
    if device.type != 'cuda':
        return 'gloo'
    return 'cuda:nccl,cpu:gloo' if cpu_collectives else 'nccl'


def wrap_ddp(model: torch.nn.Module, device: torch.device,
             static_graph: bool = False) -> torch.nn.parallel.DistributedDataParallel:
    """DDP without buffer syncing (the model's buffers are derived from its shape, the same
    on every rank) and with gradients viewing the all-reduce buckets (no extra copy).
    `static_graph`: every step uses the same parameters in the same order, so DDP may
    rebuild its buckets once in that order and skip its per-step bookkeeping."""
    no_buffer_sync = ({'forward_sync_buffers': False} if 'forward_sync_buffers' in
                      inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
                      else {'broadcast_buffers': False})  # older torch knows only this name
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == 'cuda' else None,
        gradient_as_bucket_view=True, static_graph=static_graph, **no_buffer_sync)


def shutdown() -> None:
    """Destroy the process group, and so join its gloo worker threads, before the interpreter
    exits. `destroy_process_group` drops only torch.distributed's own references; after FSDP
    the DeviceMeshes of the sharded parameters stay in DTensor's module-level caches, each
    holding the group, which would then live (with its threads) into interpreter shutdown,
    where a gloo worker freeing a finished collective's tensors needs the GIL, Python ends
    that thread, and the process aborts ('terminate called without an active exception')
    after a complete run."""
    if not _active():
        return
    world = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    if world() is not None:
        _release_mesh_groups()
    if world() is not None:
        warnings.warn('the default process group is still referenced after destroy_process_group; its gloo '
                      'threads may outlive the run and abort the process at exit', RuntimeWarning, stacklevel=2)


def _release_mesh_groups() -> None:
    """Drop the process groups held by every DeviceMesh still alive (in DTensor's caches): the
    last reference goes, and the group's destructor joins its threads now. Eager DTensor code
    resolves groups by name, so a cached mesh left without them is never asked for one."""
    from torch.distributed.device_mesh import DeviceMesh
    gc.collect()  # a sharded model or optimizer left in a reference cycle holds its mesh's group too
    for obj in gc.get_objects():
        if issubclass(type(obj), DeviceMesh):
            registry = getattr(obj, '_pg_registry', None)
            if isinstance(registry, dict):
                registry.clear()


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op for one process); returns the tensor."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest `value` of all ranks (`value` itself for one process); `device` is the
    run's, where the backend reduces."""
    if not _active():
        return value
    box = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (small objects only)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (small objects only)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def run_on_main(ctx: DistContext, work: Callable[[], Any]) -> None:
    """Run rank 0's `work` (writing files) and raise its one-line error on every rank, so no
    rank carries on into a collective that rank 0 will never join."""
    message = None
    if ctx.is_main:
        try:
            work()
        except USER_ERRORS as e:
            message = str(e)
    message = broadcast_object(message)
    if message is not None:
        raise OutputError(message)

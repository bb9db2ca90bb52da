"""How the model and its optimizer are spread over the processes (TRAIN.PARALLEL).

- 'ddp': a full replica per process; DDP all-reduces the gradients.
- 'zero': DDP, with the optimizer state split over the processes by PyTorch's
  ZeroRedundancyOptimizer (each rank updates its share of the parameters and broadcasts it).
- 'fsdp': FSDP2 (`fully_shard`): one unit per Swin block, the rest (patch embedding,
  patch merging, final norm, head) in the root unit. Parameters, gradients and optimizer
  state are sharded; a block's parameters are gathered just before it runs. Under AMP they
  are gathered in the AMP dtype (the optimizer keeps fp32 master shards), and gradients are
  reduced in TRAIN.FSDP.REDUCE_DTYPE (by default the AMP dtype: bf16 weights and reductions,
  fp32 master weights; fp32 throughout without AMP).

All three train the same function: on the same data they give the same updates up to
floating-point summation order (tests/integration/test_parallel.py).
"""
from __future__ import annotations

import contextlib
import inspect

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer

from distributed.process_group import DistContext, wrap_ddp
from utils import ConfigError

_DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}


def reduce_dtype(config, amp_dtype: torch.dtype | None) -> torch.dtype:
    """TRAIN.FSDP.REDUCE_DTYPE as a dtype: 'amp' follows the AMP dtype (fp32 without AMP)."""
    name = config.TRAIN.FSDP.REDUCE_DTYPE
    return (amp_dtype or torch.float32) if name == 'amp' else _DTYPES[name]


def check_supported(config) -> None:
    """Combinations this project does not run, refused before anything is built."""
    if config.TRAIN.PARALLEL != 'fsdp':
        return
    if config.TRAIN.EMA.ENABLE:
        raise ConfigError('TRAIN.EMA is not supported with TRAIN.PARALLEL fsdp (the EMA copy would be a full, '
                          'unsharded model on every rank); use ddp or zero, or turn TRAIN.EMA.ENABLE off')
    if config.TRAIN.COMPILE:
        raise ConfigError('TRAIN.COMPILE is not supported with TRAIN.PARALLEL fsdp here; use ddp or zero with '
                          'compile, or fsdp without it')
    if config.AMP_ENABLE and config.AMP_DTYPE == 'fp16':
        raise ConfigError('TRAIN.PARALLEL fsdp runs fp32 or bf16 (no fp16 loss scaling for sharded gradients); '
                          'set AMP_DTYPE bf16')


def is_sharded(model: nn.Module) -> bool:
    """The model's parameters are FSDP shards (DTensors)."""
    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, config, amp_dtype: torch.dtype | None, offload: bool = False) -> nn.Module:
    """TRAIN.PARALLEL fsdp: `fully_shard` each of the model's `fsdp_units()` (the Swin
    blocks), then the root, in place.
    Call it after loading pretrained weights (they load into the full model) and before
    building the optimizer (which must see the shards). `offload`: keep the shards in
    (pinned) host memory, for CUDA runs."""
    # Every rank built (or loaded) its own weights; DDP would broadcast rank 0's, FSDP keeps
    # each rank's own slice, so without this the model would be a patchwork of initializations.
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor, src=0)
    fsdp = config.TRAIN.FSDP
    options = {'mp_policy': MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=reduce_dtype(config, amp_dtype)),
               'reshard_after_forward': fsdp.RESHARD_AFTER_FORWARD}
    if offload:
        options['offload_policy'] = CPUOffloadPolicy()
    for unit in model.fsdp_units():
        fully_shard(unit, **options)
    fully_shard(model, **options)
    return model


def training_module(model: nn.Module, config, ctx: DistContext) -> nn.Module:
    """The module the training step calls: DDP around the model for ddp and zero when
    distributed, the (already sharded) model itself for fsdp or a single process."""
    if not ctx.distributed or is_sharded(model):
        return model
    # A Swin step always uses every trainable parameter once (drop path scales samples and
    # skips no module), so the graph is static, but DDP's static mode fails an internal
    # assert after no_sync micro-steps (torch 2.14), and compiled runs place their own graph
    # breaks at the buckets: only plain eager runs without accumulation use it.
    static = config.TRAIN.ACCUMULATION_STEPS == 1 and not config.TRAIN.COMPILE
    average_expert_gradients(model, ctx.world_size)
    return wrap_ddp(model, ctx.device, static_graph=static)


def average_expert_gradients(model: nn.Module, world_size: int) -> None:
    """Swin-MoE: DDP leaves each rank's own experts alone (the model lists them in
    `_ddp_params_and_buffers_to_ignore`); their gradients, summed over the tokens all ranks
    sent them, are divided by the world size as the official training does, to match the
    averaged gradients of the replicated weights."""
    ignored = set(getattr(model, '_ddp_params_and_buffers_to_ignore', ()))
    for name, param in model.named_parameters():
        if name in ignored and param.requires_grad:
            param.register_hook(lambda grad: grad / world_size)


def shard_optimizer(optimizer: torch.optim.Optimizer, config, ctx: DistContext) -> torch.optim.Optimizer:
    """TRAIN.PARALLEL zero: the same optimizer (class, groups, settings, fused kernel) with
    its state split over the ranks; otherwise `optimizer` unchanged."""
    if config.TRAIN.PARALLEL != 'zero' or not ctx.distributed:
        return optimizer
    groups = [dict(g) for g in optimizer.param_groups]  # with their names, lr_scale and settings
    # the constructor's own arguments only (AdamW's defaults also hold Adam's decoupled_weight_decay)
    accepted = inspect.signature(type(optimizer)).parameters
    settings = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    # bucket views: each rank's parameters are views into one flat tensor per device, so the
    # updated shards go out in one broadcast per rank instead of one per tensor
    return ZeroRedundancyOptimizer(groups, optimizer_class=type(optimizer), parameters_as_bucket_view=True,
                                   **settings)


def is_zero(optimizer: torch.optim.Optimizer) -> bool:
    """The optimizer state is split over the ranks (TRAIN.PARALLEL zero, distributed)."""
    return isinstance(optimizer, ZeroRedundancyOptimizer)


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that runs the kernel: ZeRO's per-rank one, else `optimizer`."""
    return optimizer.optim if is_zero(optimizer) else optimizer


def gather_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Every rank, before rank 0 reads `optimizer.state_dict()`: ZeRO collects the
    shards on rank 0 (a collective); other optimizers hold their whole state already."""
    if is_zero(optimizer):
        optimizer.consolidate_state_dict(to=0)


def gradient_sync(model: nn.Module, enabled: bool):
    """A context for one micro-step's backward: gradients are reduced across ranks only
    when `enabled` (the last micro-step of an accumulation), for DDP and FSDP alike."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()

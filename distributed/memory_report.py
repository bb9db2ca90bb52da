"""Estimate, before the first training step, the memory one process will need: parameters,
gradients, optimizer state and activations for the chosen parallelism, so a run that will
not fit says so at start-up rather than with an out-of-memory error minutes later.

Accounting (bytes per process; P = all parameters, T = those with requires_grad, each in
its own dtype, normally fp32; frozen stages get no gradients and no optimizer state):
- ddp: P params, T grads (DDP's buckets are views of the gradients with
  gradient_as_bucket_view, no copy), optimizer state k * T with k = 2 for AdamW and LAMB
  (exp_avg, exp_avg_sq), 1 for SGD and LARS with momentum (the momentum buffer), 0 for
  SGD without momentum.
- zero (ZeroRedundancyOptimizer): params and grads as ddp, optimizer state / world size.
- fsdp (FSDP2 fully_shard per Swin block, the root holds the rest): params, grads and
  optimizer state are sharded on dim 0 (each rank holds ceil(dim0 / world size) rows of
  every tensor, FSDP2's padded shard), plus the gathered full parameters of the units in
  use, in the compute dtype (the AMP dtype under mixed precision, else fp32): the root
  unit (kept gathered through the step) and the two largest blocks (the one running and
  the next one prefetched). With TRAIN.FSDP.CPU_OFFLOAD the shards live in host memory:
  they are reported as host bytes and drop out of the device figure.
- TRAIN.EMA: one more fp32 copy of all parameters (timm's ModelEmaV3 on the same device).
- activations: measured, not a formula. The model is built again from the config on the
  meta device (no weights allocated, no initialisation), moved to fake tensors on the
  training device type (torch's FakeTensorMode: shapes, dtypes and storages without
  memory), frozen like the real model, and run forward once at batch 1 and once at batch 2
  under the run's autocast, while `saved_tensors_hooks` record every tensor autograd keeps
  for backward, counted once per storage, parameters and buffers excluded. The two
  measurements give a per-image slope and a batch-independent part (the joined attention
  masks, the AMP copies of the weights), extrapolated linearly to DATA.BATCH_SIZE. The
  fake tensors take the same code path as the real device (the CPU attention kernel on the
  CPU, SDPA on CUDA), and autocast applies to them as to real tensors, so half-precision
  saves are counted in half precision. A real forward gives the same bytes on the CPU
  (tested; under AMP ~1% fewer, as the fake layer_norm keeps its per-token mean and rstd
  in half precision where the CPU kernel keeps fp32). Under fsdp with AMP the saved
  half-precision weight copies are the gathered parameters, already counted, so they are left out of activations.
- activation checkpointing (TRAIN.USE_CHECKPOINT, each block checkpointed): the same
  forward records which saved tensors belong to which block; what stays saved is
  everything outside the blocks plus each block's input, and backward adds the largest
  block's recomputed internals while that block is recomputed.
Not counted: temporary buffers inside ops and during backward (gradients of activations,
all-gather / reduce-scatter buffers, FSDP's unsharded gradients of one unit), the caching
allocator's fragmentation, the CUDA context (~0.5 GB per process), the data loader, and
torch.compile's own buffers.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

GIB = 1024 ** 3
WARN_FRACTION = 0.9
# optimizer state tensors per trainable parameter
STATE_TENSORS = {'adamw': 2, 'adam': 2, 'lamb': 2, 'sgd': 1, 'lars': 1, 'fused_adam': 2, 'fused_lamb': 2}
_WRAPPER_PREFIXES = ('_orig_mod.', 'module.', '_fsdp_wrapped_module.', '_checkpoint_wrapped_module.')


@dataclass
class MemoryEstimate:
    """Bytes one process needs on its device, and what they were computed from."""
    params: int
    grads: int
    optimizer_state: int
    activations: int
    total: int
    parallel: str
    world_size: int
    batch: int
    checkpointing: bool
    optimizer: str
    activation_bytes: int              # bytes per activation element in the compute dtype (4 fp32, 2 bf16/fp16)
    ema: int = 0                       # TRAIN.EMA's copy of the weights
    host_bytes: int = 0                # what CPU offload keeps in host memory instead
    activations_saved: int = 0         # held from forward to backward
    activations_recompute: int = 0     # peak of one checkpointed block's recomputation
    activation_method: str = ''        # how activations were measured
    notes: list[str] = field(default_factory=list)


def _normalized(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, '')
    return name


def _shard_numel(p: torch.Tensor, world_size: int) -> int:
    """Elements of FSDP2's padded dim-0 shard of `p` on one rank."""
    shape = tuple(p.shape)
    if not shape:
        return 1  # a scalar is padded to one element per rank
    rows = -(-shape[0] // world_size)
    return rows * math.prod(shape[1:])


def _unique_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    seen, out = set(), []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _fsdp_units(model: nn.Module) -> tuple[list[int], int]:
    """Element counts of the FSDP units: each of the model's `fsdp_units()`, and the root's rest."""
    units, in_units = [], set()
    for unit in model.fsdp_units():
        ps = [p for p in unit.parameters() if id(p) not in in_units]
        in_units.update(id(p) for p in ps)
        units.append(sum(p.numel() for p in ps))
    root = sum(p.numel() for _, p in _unique_params(model) if id(p) not in in_units)
    return units, root


def _state_tensors(config) -> tuple[int, str | None]:
    name = config.TRAIN.OPTIMIZER.NAME.lower()
    if name in ('sgd', 'lars') and config.TRAIN.OPTIMIZER.MOMENTUM <= 0:
        return 0, None
    if name in STATE_TENSORS:
        return STATE_TENSORS[name], None
    return 2, f'optimizer {name!r} unknown here: counted as 2 state tensors per parameter'


# ---------------------------------------------------------------------------------------
# activations


@dataclass
class _Saved:
    """What one forward saved for backward: bytes per storage, and where."""
    outside: dict                       # storage key -> bytes, saved outside every block
    blocks: list                        # per block: storage key -> bytes first saved in it
    inputs: dict                        # storage key -> bytes of every block's input
    weight_copies: int                  # bytes of saved half-precision copies of weights

    def all_bytes(self) -> int:
        return sum(self.outside.values()) + sum(sum(b.values()) for b in self.blocks)

    def checkpointed(self) -> tuple[int, list[int]]:
        """(bytes kept with every block checkpointed, per-block recomputation bytes)."""
        kept = dict(self.outside)
        kept.update(self.inputs)
        return sum(kept.values()), [sum(v for k, v in b.items() if k not in self.inputs) for b in self.blocks]


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return s._cdata, s.nbytes()


def _measure_saved(model: nn.Module, make_input: Callable[[], torch.Tensor], autocast, amp_dtype) -> _Saved:
    """Run model(make_input()) once with autograd recording, and classify what it saves."""
    excluded = {_storage_key(t)[0] for t in list(model.parameters()) + list(model.buffers())}
    weight_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape[::-1]) for p in model.parameters()}
    blocks = [blk for m in model.modules() if isinstance(getattr(m, 'blocks', None), nn.ModuleList)
              for blk in m.blocks]
    saved = _Saved({}, [{} for _ in blocks], {}, 0)
    seen: set = set()
    keep: list = []  # keeps saved tensors alive so storage keys are not reused
    current = [None]

    def pack(t: torch.Tensor):
        key, nbytes = _storage_key(t)
        if key in excluded or key in seen:
            return t
        seen.add(key)
        keep.append(t)
        if amp_dtype is not None and t.dtype == amp_dtype and tuple(t.shape) in weight_shapes:
            saved.weight_copies += nbytes
        (saved.outside if current[0] is None else saved.blocks[current[0]])[key] = nbytes
        return t

    def enter(i):
        def hook(module, args):
            current[0] = i
            key, nbytes = _storage_key(args[0])
            saved.inputs[key] = nbytes
            keep.append(args[0])
        return hook

    def leave(module, args, output):
        current[0] = None

    handles = []
    for i, blk in enumerate(blocks):
        handles.append(blk.register_forward_pre_hook(enter(i)))
        handles.append(blk.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            model(make_input())
    finally:
        for h in handles:
            h.remove()
    return saved


def _prepare_twin(model: nn.Module, twin: nn.Module, config) -> nn.Module:
    """Freeze `twin` as `model` is frozen, train mode, no checkpointing (accounted apart)."""
    if hasattr(twin, 'freeze'):
        twin.freeze(config.TRAIN.FREEZE_STAGES, config.TRAIN.LINEAR_PROBE)
    flags = {_normalized(n): p.requires_grad for n, p in model.named_parameters()}
    for n, p in twin.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
    twin.train()
    if hasattr(twin, 'set_grad_checkpointing'):
        twin.set_grad_checkpointing(False)
    return twin


def _image(config, batch: int, **kw) -> torch.Tensor:
    s = config.MODEL.SWIN if config.MODEL.TYPE.lower() == 'swin' else config.MODEL.SWINV2
    return torch.empty(batch, s.IN_CHANS, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE, **kw)


def _autocast(device_type: str, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=amp_dtype)


def _fake_measure(model: nn.Module, config, device_type: str, amp_dtype) -> tuple[_Saved, _Saved]:
    """Saved tensors at batch 1 and 2, on fake tensors of `device_type`: no memory, no
    arithmetic, the same code path and autocast behaviour as real tensors there."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import models

    with torch.device('meta'):  # no weight memory and no initialisation, even for Swin-L
        twin = models.build_model(config)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        twin.to_empty(device=device_type)
    _prepare_twin(model, twin, config)
    out = []
    for batch in (1, 2):
        # frozen blocks key their mask cache on data_ptr(), which fake tensors warn about
        with mode, warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='Accessing the data pointer of FakeTensor')
            out.append(_measure_saved(twin, lambda b=batch: _image(config, b, device=device_type),
                                      _autocast(device_type, amp_dtype), amp_dtype))
    return out[0], out[1]


def _real_measure(model: nn.Module, config, amp_dtype) -> _Saved:
    """Fallback: a real CPU forward at batch 1 of a fresh model (RNG state left untouched)."""
    import models
    with torch.random.fork_rng(devices=[]):
        twin = _prepare_twin(model, models.build_model(config), config)
        return _measure_saved(twin, lambda: torch.randn(_image(config, 1).shape),
                              _autocast('cpu', amp_dtype), amp_dtype)


def _linear(at1: float, at2: float, batch: int) -> int:
    return int(round(at1 + (batch - 1) * (at2 - at1)))


def _activations(model: nn.Module, config, amp_dtype, parallel: str,
                 notes: list[str]) -> tuple[int, int, str]:
    """(bytes saved from forward to backward, bytes of one block's recomputation, method)."""
    batch = config.DATA.BATCH_SIZE
    params = list(model.parameters())
    device_type = params[0].device.type if params else 'cpu'
    if device_type not in ('cpu', 'cuda'):
        device_type = 'cpu'
    pair = None
    try:
        pair = _fake_measure(model, config, device_type, amp_dtype)
        method = f'measured on fake {device_type} tensors at batch 1 and 2, linear in the batch'
    except Exception as e:
        if device_type != 'cpu':
            try:
                pair = _fake_measure(model, config, 'cpu', amp_dtype)
                method = 'measured on fake cpu tensors (the CPU attention kernel) at batch 1 and 2'
                notes.append(f'fake {device_type} forward failed ({type(e).__name__}): activations measured '
                             'with the CPU kernels, which save a little less than SDPA')
            except Exception:
                pair = None
        if pair is None:
            notes.append(f'fake-tensor forward failed ({type(e).__name__}: {e}); activations measured by a '
                         'real CPU forward at batch 1 and scaled by the batch')
    drop_copies = parallel == 'fsdp' and amp_dtype is not None
    if pair is None:
        one = _real_measure(model, config, amp_dtype)
        kept, recompute = one.checkpointed()
        full = one.all_bytes() - (one.weight_copies if drop_copies else 0)
        kept -= one.weight_copies if drop_copies else 0
        if config.TRAIN.USE_CHECKPOINT:
            return kept * batch, max(recompute, default=0) * batch, 'real CPU forward at batch 1, times the batch'
        return full * batch, 0, 'real CPU forward at batch 1, times the batch'
    s1, s2 = pair
    copies = _linear(s1.weight_copies, s2.weight_copies, batch) if drop_copies else 0
    if config.TRAIN.USE_CHECKPOINT:
        (k1, r1), (k2, r2) = s1.checkpointed(), s2.checkpointed()
        recompute = max((_linear(a, b, batch) for a, b in zip(r1, r2)), default=0)
        return _linear(k1, k2, batch) - copies, recompute, method
    return _linear(s1.all_bytes(), s2.all_bytes(), batch) - copies, 0, method


# ---------------------------------------------------------------------------------------


def estimate_memory(model: nn.Module, config, world_size: int,
                    amp_dtype: torch.dtype | None) -> MemoryEstimate:
    """Bytes per process for `model` (on its training device, frozen as it will train)
    under `config`'s parallelism, optimizer, batch and checkpointing. See the module
    docstring for what is counted."""
    parallel = config.TRAIN.PARALLEL.lower()
    notes: list[str] = []
    plist = _unique_params(model)
    p_bytes = sum(p.numel() * p.element_size() for _, p in plist)
    t_bytes = sum(p.numel() * p.element_size() for _, p in plist if p.requires_grad)
    k, note = _state_tensors(config)
    if note:
        notes.append(note)
    opt_bytes = k * t_bytes
    host = 0
    compute_size = torch.tensor([], dtype=amp_dtype).element_size() if amp_dtype is not None else 4
    if parallel == 'ddp':
        params, grads, state = p_bytes, t_bytes, opt_bytes
    elif parallel == 'zero':
        params, grads, state = p_bytes, t_bytes, -(-opt_bytes // world_size)
    elif parallel == 'fsdp':
        shard = {id(p): _shard_numel(p, world_size) * p.element_size() for _, p in plist}
        params = sum(shard.values())
        grads = sum(shard[id(p)] for _, p in plist if p.requires_grad)
        state = k * grads
        units, root = _fsdp_units(model)
        gathered = (root + sum(sorted(units, reverse=True)[:2])) * compute_size
        if config.TRAIN.FSDP.CPU_OFFLOAD:
            host = params + grads + state
            notes.append(f'CPU offload: {_gib(host)} GiB of sharded parameters, gradients and optimizer state '
                         'are in host memory, not on the device')
            params = grads = state = 0
        params += gathered
        notes.append(f'fsdp: parameters include {_gib(gathered)} GiB of gathered units (root + 2 largest '
                     f'blocks) in {"fp32" if amp_dtype is None else str(amp_dtype).replace("torch.", "")}')
    else:
        raise ValueError(f"unknown TRAIN.PARALLEL '{parallel}'")  # validate_config rejects it first
    ema = p_bytes if config.TRAIN.EMA.ENABLE else 0
    saved, recompute, method = _activations(model, config, amp_dtype, parallel, notes)
    activations = saved + recompute
    return MemoryEstimate(
        params=params, grads=grads, optimizer_state=state, activations=activations,
        total=params + grads + state + activations + ema, parallel=parallel, world_size=world_size,
        batch=config.DATA.BATCH_SIZE, checkpointing=bool(config.TRAIN.USE_CHECKPOINT),
        optimizer=config.TRAIN.OPTIMIZER.NAME.lower(), activation_bytes=compute_size, ema=ema,
        host_bytes=host, activations_saved=saved, activations_recompute=recompute,
        activation_method=method, notes=notes)


def _gib(n: int) -> str:
    return f'{n / GIB:.2f}'


def _capacity(device: torch.device) -> tuple[int | None, str]:
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f'{device} ({props.name})'
    try:
        ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return None, str(device)
    return ram, 'host RAM'


def report_lines(estimate: MemoryEstimate, device: torch.device) -> list[str]:
    """2-4 log lines: the parts, the total against the device's memory, and the notes.
    A line that starts with 'WARNING' means the estimate is above 90% of the device."""
    e = estimate
    ckpt = 'on' if e.checkpointing else 'off'
    act = (f'activations {_gib(e.activations)} GiB (batch {e.batch} per process, {e.activation_bytes}-byte '
           f'compute dtype, checkpointing {ckpt}')
    if e.checkpointing:
        act += f': {_gib(e.activations_saved)} kept + {_gib(e.activations_recompute)} one block recomputed'
    act += ')'
    ema = f', EMA weights {_gib(e.ema)} GiB' if e.ema else ''
    lines = [f'memory estimate per process ({e.parallel}, world size {e.world_size}): parameters '
             f'{_gib(e.params)} GiB, gradients {_gib(e.grads)} GiB, optimizer state ({e.optimizer}) '
             f'{_gib(e.optimizer_state)} GiB{ema}, {act}']
    capacity, where = _capacity(device)
    total = f'total {_gib(e.total)} GiB'
    if capacity is None:
        lines.append(f'memory estimate: {total} per process (device memory unknown)')
    else:
        procs = 1
        if device.type != 'cuda':  # processes on one machine share its RAM
            procs = int(os.environ.get('LOCAL_WORLD_SIZE', '1') or 1)
        need = e.total * procs
        share = need / capacity
        of = f'{total}' + (f' x {procs} local processes' if procs > 1 else '')
        if share > WARN_FRACTION:
            lines.append(f'WARNING: memory estimate {of} is {share:.0%} of the {_gib(capacity)} GiB of {where}: '
                         'it may not fit; lower DATA.BATCH_SIZE, turn on TRAIN.USE_CHECKPOINT or use '
                         'TRAIN.PARALLEL zero / fsdp')
        else:
            lines.append(f'memory estimate: {of}, {share:.0%} of the {_gib(capacity)} GiB of {where}: fits '
                         '(not counted: CUDA context ~0.5 GiB, temporaries, allocator fragmentation)')
    extra = [e.activation_method] + e.notes if e.notes else []
    if extra:
        lines.append('memory estimate notes: ' + '; '.join(extra))
    return lines

"""The loops of a run: one training epoch, validation, and the throughput measurement,
with the AMP, loss and logging choices they share."""
from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.distributed.tensor import DTensor

from config import model_arch
from data.prefetch import DevicePrefetcher
from distributed.parallel import gradient_sync, is_sharded, local_optimizer
from distributed.process_group import all_reduce_sum, max_over_ranks
from engine.metrics_log import MetricsLog
from utils import DivergedError, peak_memory_mb, synchronize  # noqa: F401


def resolve_amp_dtype(config, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype (None: fp32) and a note for the log. bf16 falls back to fp16 on
    GPUs without bf16 support."""
    if not config.AMP_ENABLE:
        return None, 'fp32 (AMP off)'
    if config.AMP_DTYPE == 'fp16':
        return torch.float16, 'fp16 autocast with a gradient scaler'
    if device.type == 'cuda' and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16, 'fp16 autocast with a gradient scaler (this GPU has no bf16)'
    return torch.bfloat16, 'bf16 autocast (no loss scaling)'


def autocast_context(amp_dtype: torch.dtype | None, device: torch.device):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def make_scaler(amp_dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler only for fp16: bf16 has fp32's exponent range and needs none."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


def build_criterion(config, mixup_active: bool) -> nn.Module:
    """Soft-target cross-entropy under mixup/cutmix (the targets carry the smoothing),
    label-smoothing cross-entropy otherwise, plain cross-entropy without smoothing."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


@dataclass
class TrainParts:
    """What a training epoch works with (built once by main)."""
    config: Any
    model: nn.Module            # DDP-wrapped when distributed (ddp, zero); with fsdp the sharded model
    optimizer: torch.optim.Optimizer
    scheduler: Any              # lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    mixup_fn: Any
    prep: Any                   # data.DevicePreprocessor for training
    device: torch.device
    amp_dtype: torch.dtype | None
    world_size: int
    logger: logging.Logger
    metrics: MetricsLog
    guard: NonFiniteGuard
    ema: Any = None             # timm ModelEmaV3, updated after every optimizer update
    compiled: nn.Module | None = None  # torch.compile(model) with TRAIN.COMPILE: runs the forward
    compile_logged: bool = False  # the first compiled steps' time is logged once per run


def compile_model(model: nn.Module, config, logger: logging.Logger, what: str) -> nn.Module | None:
    """`torch.compile(model)` with TRAIN.COMPILE (None without): a handle that shares the
    module's weights, so checkpoints keep being written from the plain module (a compiled
    module's state_dict keys start with `_orig_mod.`). Batch-size changes (the validation's
    last batch) cost one recompilation to a dynamic batch dimension, not one per step."""
    if not config.TRAIN.COMPILE:
        return None
    logger.info(f'torch.compile: {what} (compiled on the first step)')
    return torch.compile(model)


def updates_per_epoch(num_batches: int, accumulation_steps: int) -> int:
    return num_batches // accumulation_steps


def _grad_norm(parameters: list[torch.Tensor], clip: float | None) -> torch.Tensor:
    """Clip to `clip` and return the norm before clipping; with no clip only measure (the
    gradients are not touched, not even multiplied by 1)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):  # FSDP shards: the norm over all ranks' pieces
        norm = norm.full_tensor()
    if clip:
        torch.nn.utils.clip_grads_with_norm_(parameters, clip, norm)
    return norm


class NonFiniteGuard:
    """Skips an update whose gradient norm is not finite (a non-finite loss makes it so),
    for fp16 and bf16 alike, and counts skips on the device: with a fused optimizer the
    skip is the kernel's `found_inf` flag, so no step waits for the GPU. The gradients are
    all-reduced before the norm, so every rank takes the same decision."""

    def __init__(self, device: torch.device, limit: int):
        self.limit = limit
        self.total = torch.zeros((), dtype=torch.int64, device=device)
        self.consecutive = torch.zeros((), dtype=torch.int64, device=device)
        self.last_update = torch.full((), -1, dtype=torch.int64, device=device)
        self.reported = 0

    def step(self, optimizer: torch.optim.Optimizer, scaler, grad_norm: torch.Tensor, update: int) -> None:
        bad = ~torch.isfinite(grad_norm.to(self.total.device))  # CPU-offloaded shards give a CPU norm
        self.total += bad
        self.consecutive = (self.consecutive + 1) * bad
        self.last_update = torch.where(bad, torch.full_like(self.last_update, update), self.last_update)
        kernel = local_optimizer(optimizer)  # ZeRO's step runs its per-rank optimizer
        if scaler is not None:  # the scaler skips non-finite gradients by itself
            scaler.step(optimizer)
            scaler.update()
        elif kernel.defaults.get('fused'):
            kernel.found_inf = bad.float().to(kernel.param_groups[0]['params'][0].device)
            optimizer.step()
            del kernel.found_inf
        elif not bad.item():  # other kernels cannot skip on the device
            optimizer.step()

    def check(self, logger: logging.Logger) -> str | None:
        """Log new skips; past the limit, the message to stop with (reads the counters:
        call it only where the loop waits for the device anyway)."""
        total, consecutive = int(self.total.item()), int(self.consecutive.item())
        if total > self.reported:
            logger.warning(f'skipped {total - self.reported} update(s) with a non-finite loss or gradient norm '
                           f'(last: update {int(self.last_update.item())}; {total} in this run)')
            self.reported = total
        if consecutive < self.limit:
            return None
        return (f'{consecutive} consecutive updates had a non-finite loss or gradient norm '
                           f'(TRAIN.MAX_CONSECUTIVE_SKIPS {self.limit}); likely causes: a learning rate too '
                           f'high (lower TRAIN.BASE_LR, lengthen TRAIN.WARMUP_EPOCHS, set TRAIN.CLIP_GRAD) or fp16 '
                f'overflow (use AMP_DTYPE bf16)')


@dataclass
class EpochStart:
    """Where an epoch begins: micro-steps already done (a mid-epoch resume) and their loss."""
    step: int = 0
    loss_sum: float = 0.0


def train_one_epoch(parts: TrainParts, loader, epoch: int, start: EpochStart | None = None,
                    on_update: Callable[[int, int, torch.Tensor], bool] | None = None) -> dict[str, Any]:
    """One pass over the training loader: `TRAIN.ACCUMULATION_STEPS` micro-batches per
    optimizer update (gradients all-reduced only on the last one), the LR set per update,
    a log line every PRINT_FREQ micro-steps. Nothing waits for the device except on those
    lines and at the end. `start` resumes inside the epoch (the sampler must already skip
    the samples done). After each update `on_update(steps_done, updates_done, loss_sum)`
    may save a checkpoint and return True to stop the epoch there. Returns the epoch's mean
    loss over all ranks, the LR, images/s, and `stop`: None, 'signal' (on_update asked) or
    'diverged' (with `message`: too many non-finite updates in a row)."""
    cfg, model, optimizer, device = parts.config, parts.model, parts.optimizer, parts.device
    start = start or EpochStart()
    accum = cfg.TRAIN.ACCUMULATION_STEPS
    n_updates = updates_per_epoch(len(loader), accum)
    n_steps = n_updates * accum  # a trailing partial accumulation would leak into the next epoch
    first_update = epoch * n_updates
    params = [p for p in model.parameters() if p.requires_grad]
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)  # its module is the plain model
    clip = cfg.TRAIN.CLIP_GRAD or None

    net = parts.compiled if parts.compiled is not None else model
    net.train()  # through a compiled handle too: its guards read the modules' flags
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.full((), start.loss_sum, device=device, dtype=torch.float64)
    grad_norm = torch.zeros((), device=device)
    logged_loss, logged_step = start.loss_sum, start.step
    epoch_start = interval_start = time.perf_counter()
    prefetcher = DevicePrefetcher(loader, parts.prep)  # batch n+1 is read and copied during step n
    batches = iter(prefetcher)
    timing_compile = parts.compiled is not None and not parts.compile_logged
    first_step_s = 0.0
    stop, message, check_due = None, None, False
    for step in range(start.step, n_steps):
        images, targets = next(batches)
        if parts.mixup_fn is not None:
            images, targets = parts.mixup_fn(images, targets)

        updating = (step + 1) % accum == 0
        with gradient_sync(model, updating):
            with autocast_context(parts.amp_dtype, device):
                outputs = net(images)
            loss = parts.criterion(outputs.float(), targets)
            scaled = loss / accum  # the update equals one batch of accum x batch images
            if parts.scaler is not None:
                parts.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        loss_sum += loss.detach()

        printing = (step + 1) % cfg.PRINT_FREQ == 0 or step + 1 == n_steps
        if updating:
            update = first_update + step // accum
            if parts.scaler is not None:
                parts.scaler.unscale_(optimizer)
            grad_norm = _grad_norm(params, clip)
            parts.guard.step(optimizer, parts.scaler, grad_norm, update)
            if parts.ema is not None:  # step = updates done, so a resumed run gets the same decays
                parts.ema.update(model.module if ddp else model, step=update + 1)
            optimizer.zero_grad(set_to_none=True)
            parts.scheduler.step_update(update + 1)
        if timing_compile and step == start.step:  # host time: compilation dominates it
            first_step_s = time.perf_counter() - epoch_start

        if printing:
            synchronize(device)
            now = time.perf_counter()
            steps = step + 1 - logged_step
            total = loss_sum.item()
            step_time = (now - interval_start) / steps
            update = first_update + step // accum
            lr = parts.scheduler.lr_at(update)
            scale = parts.scaler.get_scale() if parts.scaler is not None else None
            norm = grad_norm.item()
            if timing_compile:
                timing_compile, parts.compile_logged = False, True
                rest = (now - epoch_start - first_step_s) / (steps - 1) if steps > 1 else None
                parts.logger.info(f'torch.compile: first step took {first_step_s:.1f} s (compilation)'
                                  + (f', the next {steps - 1} took {rest:.4f} s each' if rest is not None else ''))
            eta = datetime.timedelta(seconds=int(step_time * (n_steps - step - 1)))
            parts.logger.info(
                f'Train: [{epoch}/{cfg.TRAIN.EPOCHS}][{step + 1}/{n_steps}]  eta {eta}  lr {lr:.6g}  '
                f'wd {cfg.TRAIN.WEIGHT_DECAY:.4f}  time {step_time:.4f}  data {prefetcher.wait_s / steps:.4f}  '
                f'img/s {images.shape[0] * parts.world_size / step_time:.1f}  '
                f'loss {(total - logged_loss) / steps:.4f} ({total / (step + 1):.4f})  '
                f'grad_norm {norm:.4f}' + (f'  loss_scale {scale:.0f}' if scale is not None else '')
                + f'  mem {peak_memory_mb(device):.0f}MB')
            parts.metrics.scalars(update, {'train/loss': (total - logged_loss) / steps, 'train/lr': lr,
                                           'train/grad_norm': norm})
            logged_loss, logged_step, interval_start, prefetcher.wait_s = total, step + 1, now, 0.0
            check_due = True  # at the next update boundary, where a checkpoint could be taken

        if updating and check_due:
            check_due = False
            message = parts.guard.check(parts.logger)
            if message:
                stop = 'diverged'
                break
        if updating and on_update is not None and on_update(step + 1, first_update + (step + 1) // accum, loss_sum):
            stop = 'signal'
            break

    synchronize(device)
    elapsed = time.perf_counter() - epoch_start
    steps_done = step + 1 if n_steps > start.step else start.step
    totals = all_reduce_sum(torch.stack([loss_sum, torch.full((), steps_done, dtype=torch.float64, device=device)]))
    images_seen = (steps_done - start.step) * cfg.DATA.BATCH_SIZE * parts.world_size
    result = {'train_loss': (totals[0] / totals[1]).item(),
              'lr': parts.scheduler.lr_at(first_update + steps_done // accum - 1),
              'img_per_s': images_seen / elapsed, 'train_time': elapsed,
              'updates': first_update + steps_done // accum, 'steps_done': steps_done,
              'loss_sum': loss_sum.item(), 'stop': stop, 'message': message}
    if stop is None:
        result['message'] = parts.guard.check(parts.logger)
        result['stop'] = 'diverged' if result['message'] else None
        parts.logger.info(f'EPOCH {epoch} training took {datetime.timedelta(seconds=int(elapsed))}, '
                          f'{result["img_per_s"]:.1f} images/s, loss {result["train_loss"]:.4f}')
    return result


def validate(config, model: nn.Module, loader, prep, device: torch.device, amp_dtype: torch.dtype | None,
             logger: logging.Logger) -> dict[str, float]:
    """Loss, top-1 and top-5 over the whole validation split. Each rank scores its own
    unpadded shard and the sums of loss, correct and seen images are added across ranks,
    so every image counts once whatever the world size. Pass the model without DDP (shards
    differ in length, so no collective may run inside the loop). An FSDP model gathers its
    parameters in every forward, a collective: ranks with fewer batches then run
    throw-away forwards until all ranks have run as many."""
    model.eval()
    sharded = is_sharded(model)
    # inference_mode where possible; FSDP writes gathered weights into its own buffers
    with torch.no_grad() if sharded else torch.inference_mode():
        result = _score(config, model, loader, prep, device, amp_dtype, logger, sharded)
    logger.info(f' * Acc@1 {result["acc1"]:.3f} Acc@5 {result["acc5"]:.3f} loss {result["val_loss"]:.4f} '
                f'on {result["n_images"]} images')
    return result


def _score(config, model: nn.Module, loader, prep, device: torch.device, amp_dtype: torch.dtype | None,
           logger: logging.Logger, lockstep: bool) -> dict[str, float]:
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
    # agreed before any forward: a collective after the loop would meet other ranks' gathers
    rounds = max_over_ranks(len(loader), device) if lockstep else len(loader)
    start = time.perf_counter()
    for step, (images, targets) in enumerate(DevicePrefetcher(loader, prep)):
        with autocast_context(amp_dtype, device):
            outputs = model(images)
        outputs = outputs.float()
        top = outputs.topk(min(5, outputs.shape[1]), dim=1).indices.eq(targets[:, None])
        sums += torch.stack([F.cross_entropy(outputs, targets, reduction='sum').double(),
                             top[:, 0].sum().double(), top.any(dim=1).sum().double(),
                             torch.full((), targets.shape[0], dtype=torch.float64, device=device)])
        if (step + 1) % config.PRINT_FREQ == 0:
            logger.info(f'Test: [{step + 1}/{len(loader)}]')
    for _ in range(rounds - len(loader)):
        with autocast_context(amp_dtype, device):
            model(torch.zeros(1, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE, device=device))
    all_reduce_sum(sums)
    loss, correct1, correct5, seen = sums.tolist()
    return {'acc1': 100.0 * correct1 / max(seen, 1), 'acc5': 100.0 * correct5 / max(seen, 1),
            'val_loss': loss / max(seen, 1), 'n_images': int(round(seen)),
            'val_time': time.perf_counter() - start}


@torch.inference_mode()
def throughput(model: nn.Module, config, device: torch.device, amp_dtype: torch.dtype | None,
               logger: logging.Logger) -> float:
    """Inference images/s on a synthetic batch of the configured size and dtype (official
    procedure: warm up, then time repeated forwards; fewer repetitions on CPU)."""
    model.eval()
    batch = config.DATA.BATCH_SIZE
    size = config.DATA.IMG_SIZE
    images = torch.randn(batch, model_arch(config)[0].IN_CHANS, size, size, device=device)
    warmup, timed = (50, 30) if device.type == 'cuda' else (2, 5)
    with autocast_context(amp_dtype, device):
        for _ in range(warmup):
            model(images)
        synchronize(device)
        logger.info(f'throughput averaged over {timed} batches')
        tic = time.perf_counter()
        for _ in range(timed):
            model(images)
        synchronize(device)
    rate = timed * batch / (time.perf_counter() - tic)
    precision = {None: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[amp_dtype]
    logger.info(f'batch_size {batch} throughput {rate:.1f} images/s ({device.type}, {precision}, synthetic input)')
    return rate

"""The loops of a run as plain functions: one training epoch, validation and the throughput
measurement, with the loss and compile choices they share.

`train_one_epoch` is the maths of a step and nothing else: the Trainer owns the state it
works on, the StepLogger reports it, and what happens between updates (stop signals,
mid-epoch checkpoints) is the Trainer's `after_update`.
"""
from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from config import model_arch
from data.prefetch import DevicePrefetcher
from distributed.parallel import gradient_sync, is_sharded
from distributed.process_group import all_reduce_sum, max_over_ranks
from lr_scheduler import schedule_position
from models import logits_of
from optimizer import gradient_clip
from utils import synchronize

from .amp import autocast_context
from .guard import clip_grad_norm

if TYPE_CHECKING:
    from .trainer import Trainer


class Stop(enum.Enum):
    """Why an epoch ended early."""
    SIGNAL = 'signal'      # every rank agreed to stop after a signal; the checkpoint is written
    DIVERGED = 'diverged'  # too many consecutive non-finite updates


@dataclass
class EpochResult:
    train_loss: float   # mean over the epoch's micro-steps on all ranks
    lr: float           # of the last update
    img_per_s: float
    train_time: float
    updates: int        # optimizer updates done in the run
    stop: Stop | None = None
    message: str = ''   # why, for Stop.DIVERGED


def build_criterion(config, mixup_active: bool) -> nn.Module:
    """Soft-target cross-entropy under mixup/cutmix (the targets carry the smoothing),
    label-smoothing cross-entropy otherwise, plain cross-entropy without smoothing."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def compile_model(model: nn.Module, config, logger: logging.Logger, what: str) -> nn.Module:
    """`torch.compile(model)` with TRAIN.COMPILE, else `model`: a handle that shares the
    module's weights, so checkpoints keep being written from the plain module (a compiled
    module's state_dict keys start with `_orig_mod.`). Batch-size changes (the validation's
    last batch) cost one recompilation to a dynamic batch dimension, not one per step."""
    if not config.TRAIN.COMPILE:
        return model
    logger.info(f'torch.compile: {what} (compiled on the first step)')
    return torch.compile(model)


def updates_per_epoch(num_batches: int, accumulation_steps: int) -> int:
    return num_batches // accumulation_steps


def step_loss(t: Trainer, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A micro-batch's loss: the criterion on the classifier's logits, or (SimMIM
    pre-training, where `targets` are the masks) the loss the model returns."""
    with autocast_context(t.amp_dtype, t.device):
        outputs = t.forward_module(images, targets) if t.pretraining else t.forward_module(images)
    if t.pretraining:
        return outputs.float()
    if isinstance(outputs, tuple):  # Swin-MoE: (logits, its weighted auxiliary loss), added as officially
        logits, aux_loss = outputs
        return t.criterion(logits.float(), targets) + aux_loss.float()
    return t.criterion(outputs.float(), targets)


def train_one_epoch(t: Trainer, loader, epoch: int) -> EpochResult:
    """One pass over `loader` from micro-step `t.epoch_step` (a resumed epoch: the sampler
    already skips what was done): TRAIN.ACCUMULATION_STEPS micro-batches per optimizer
    update, gradients all-reduced only on the last, clipped, the update skipped if not
    finite, the EMA and the LR moved on. Returns early with `Stop` when the trainer stops
    after an update or the updates diverge."""
    accum = t.config.TRAIN.ACCUMULATION_STEPS
    n_steps = t.updates_per_epoch * accum  # a trailing partial accumulation would leak into the next epoch
    params = [p for p in t.train_module.parameters() if p.requires_grad]
    clip = gradient_clip(t.config)
    t.forward_module.train()  # through a compiled handle too: its guards read the modules' flags
    t.optimizer.zero_grad(set_to_none=True)
    batches = DevicePrefetcher(loader, t.prep_train)  # batch n+1 is read and copied during step n
    t.step_logger.start_epoch(t, epoch, n_steps, batches)
    grad_norm, check_due = torch.zeros((), device=t.device), False
    for step, (images, targets) in zip(range(t.epoch_step, n_steps), batches):
        if t.mixup_fn is not None:
            images, targets = t.mixup_fn(images, targets)
        updating = (step + 1) % accum == 0
        with gradient_sync(t.train_module, updating):
            loss = step_loss(t, images, targets)
            scaled = loss / accum  # the update equals one batch of accum x batch images
            (scaled if t.scaler is None else t.scaler.scale(scaled)).backward()
        t.loss_sum += loss.detach()
        if updating:
            update = t.updates_done
            if t.scaler is not None:
                t.scaler.unscale_(t.optimizer)
            grad_norm = clip_grad_norm(params, clip)
            t.guard.step(t.optimizer, t.scaler, grad_norm, update)  # the optimizer step, unless not finite
            if t.ema is not None:  # step = updates done, so a resumed run gets the same decays
                t.ema.update(t.model, step=update + 1)
            t.optimizer.zero_grad(set_to_none=True)
            t.scheduler.step_update(schedule_position(update + 1))
            t.epoch_step = step + 1
        t.step_logger.step_done(step)
        if t.step_logger.due(t, step):
            t.step_logger.log(t, step, grad_norm, images.shape[0])
            check_due = True  # at the next update boundary, where a checkpoint could be taken
        if updating and check_due and (message := t.guard.check(t.logger)):
            return EpochResult(**t.step_logger.summary(t, finished=False), stop=Stop.DIVERGED, message=message)
        check_due = check_due and not updating
        if updating and (stop := t.after_update()):
            return EpochResult(**t.step_logger.summary(t, finished=False), stop=stop)
    message = t.guard.check(t.logger)
    stop = Stop.DIVERGED if message else None
    return EpochResult(**t.step_logger.summary(t, finished=stop is None), stop=stop, message=message or '')


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
        outputs = logits_of(outputs).float()
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

"""Gradient clipping and the guard that skips non-finite updates.

A non-finite loss or gradient norm skips the update (fp16 and bf16 alike) and is counted on
the device, so no step waits for it; the counts are read where the loop waits for the device
anyway (print steps, the epoch end), and too many skips in a row stop the run.
"""
from __future__ import annotations

import logging

import torch
from torch.distributed.tensor import DTensor

from distributed.parallel import local_optimizer
from skipping_optimizers import DeviceSkipping


def reads_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """The optimizer skips its step on the device when its `found_inf` tensor is 1: torch's
    fused kernels and this project's LAMB, LARS and sharded SGD."""
    return bool(optimizer.defaults.get('fused')) or isinstance(optimizer, DeviceSkipping)


def _parameter_device(optimizer: torch.optim.Optimizer) -> torch.device | None:
    # ZeRO gives every rank every group, some of them empty on a rank
    return next((p.device for group in optimizer.param_groups for p in group['params']), None)


def clip_grad_norm(parameters: list[torch.Tensor], clip: float | None) -> torch.Tensor:
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
    """Takes the optimizer step unless the gradient norm is not finite. Optimizers that read a
    `found_inf` flag (torch's fused kernels, `skipping_optimizers`) skip on the device, so no
    step waits for the GPU; any other needs the flag on the host. The gradients are all-reduced before the norm,
    so every rank takes the same decision.

    `device`: where the gradients (and so their norm) live: the model's device, or the host
    for CPU-offloaded FSDP shards, so the counters and the flag never cross devices."""

    def __init__(self, device: torch.device, limit: int):
        self.limit = limit
        self.total = torch.zeros((), dtype=torch.int64, device=device)
        self.consecutive = torch.zeros((), dtype=torch.int64, device=device)
        self.last_update = torch.full((), -1, dtype=torch.int64, device=device)
        self.reported = 0

    def step(self, optimizer: torch.optim.Optimizer, scaler, grad_norm: torch.Tensor, update: int) -> None:
        """The guarded update. With a gradient scaler (fp16) the gradients are already
        unscaled (`scaler.unscale_`), so a non-finite norm is exactly the scaler's own
        overflow test; the scaler then only moves its scale, on the device."""
        bad = ~torch.isfinite(grad_norm.to(self.total.device))
        self.total += bad
        self.consecutive = (self.consecutive + 1) * bad
        self.last_update = torch.where(bad, torch.full_like(self.last_update, update), self.last_update)
        kernel = local_optimizer(optimizer)  # ZeRO's step runs its per-rank optimizer
        if reads_found_inf(kernel):
            device = _parameter_device(kernel)  # None: this ZeRO rank holds no parameter
            if device is not None:
                kernel.found_inf = bad.to(device, torch.float32)
            optimizer.step()
            kernel.__dict__.pop('found_inf', None)
        elif not bad.item():  # a kernel that cannot skip on the device
            optimizer.step()
        if scaler is not None:
            scaler.update()

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
                f'(TRAIN.MAX_CONSECUTIVE_SKIPS {self.limit}); likely causes: a learning rate too high (lower '
                f'TRAIN.BASE_LR, lengthen TRAIN.WARMUP_EPOCHS, set TRAIN.CLIP_GRAD) or fp16 overflow (use AMP_DTYPE '
                f'bf16)')

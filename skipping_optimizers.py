"""LAMB, LARS and momentum SGD whose step can be skipped on the device: set
`optimizer.found_inf` (a 0-dim tensor, 1 = skip) before `step()`, as torch's fused kernels
read it, and a non-finite update leaves weights, moments and step counts exactly as they were
without the host ever reading the flag. Without `found_inf` they are the plain algorithms.

The arithmetic is timm's (`timm.optim.Lamb` with grad averaging, bias correction and no
internal clip; `timm.optim.Lars`; torch's SGD without dampening): the tests compare them
step by step. One parameter at a time, so FSDP shards (DTensors) work on their local pieces,
with only the norms LAMB and LARS need taken over the whole tensor.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor to update in place: an FSDP shard's local piece, or `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _norm(t: torch.Tensor) -> torch.Tensor:
    """The 2-norm of the whole tensor (over all ranks' pieces of a shard)."""
    norm = t.norm(2.0)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class DeviceSkipping(torch.optim.Optimizer):
    """The skip flag as `keep`: None (always step) or a float 0/1 tensor on the given device."""

    def _keep(self, device: torch.device) -> torch.Tensor | None:
        found_inf = getattr(self, 'found_inf', None)
        return None if found_inf is None else 1.0 - found_inf.to(device, torch.float32)

    @staticmethod
    def _masked(grad: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        # a skipped step's gradient is not finite: replaced, as 0 x inf would poison the moments
        return grad if keep is None else torch.where(keep > 0, grad, torch.zeros((), device=grad.device))

    @staticmethod
    def _apply(p: torch.Tensor, update: torch.Tensor, lr: float, keep: torch.Tensor | None) -> None:
        # one operation whether or not the step may be skipped, so both give the same bits
        p.addcmul_(update, torch.ones((), device=p.device) if keep is None else keep, value=-lr)


class Lamb(DeviceSkipping):
    """LAMB (You et al. 2019). Groups whose `weight_decay` is 0 take plain Adam steps unless
    `always_adapt`; `trust_clip` caps the trust ratio at 1. The step count is kept per
    parameter (`state[p]['step']`, a tensor), so a skipped step does not count."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, trust_clip: bool = False, always_adapt: bool = False):
        super().__init__(params, {'lr': lr, 'betas': tuple(betas), 'eps': eps, 'weight_decay': weight_decay,
                                  'trust_clip': trust_clip, 'always_adapt': always_adapt})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        beta1, beta2 = group['betas']
        state = self.state[p]
        w, grad = _local(p), _local(p.grad)
        if not state:
            state['step'] = torch.zeros((), device=w.device)
            state['exp_avg'], state['exp_avg_sq'] = torch.zeros_like(p), torch.zeros_like(p)
        keep = self._keep(w.device)
        m, v, grad = _local(state['exp_avg']), _local(state['exp_avg_sq']), self._masked(grad, keep)
        step = state['step'] = _as_tensor(state['step'], w.device).add_(1 if keep is None else keep)
        m.lerp_(grad, _where(keep, 1 - beta1, 0.0))
        v.mul_(_where(keep, beta2, 1.0)).addcmul_(grad, grad, value=1 - beta2)
        count = step.clamp(min=1)  # a skipped first step divides by nothing
        denom = (v.sqrt() / (1 - beta2 ** count).sqrt()).add_(group['eps'])
        update = (m / (1 - beta1 ** count)).div_(denom)
        decay = group['weight_decay']
        if decay != 0:
            update.add_(w, alpha=decay)
        if decay != 0 or group['always_adapt']:
            update.mul_(self._trust_ratio(p, update, group['trust_clip']))
        self._apply(w, update, group['lr'], keep)

    @staticmethod
    def _trust_ratio(p: torch.Tensor, local_update: torch.Tensor, trust_clip: bool) -> torch.Tensor:
        w_norm = _norm(p)
        u_norm = _norm(DTensor.from_local(local_update, p.device_mesh, p.placements, shape=p.shape,
                                          stride=p.stride()) if isinstance(p, DTensor) else local_update)
        one = torch.ones_like(w_norm)
        ratio = torch.where(w_norm > 0, torch.where(u_norm > 0, w_norm / u_norm, one), one)
        return ratio.clamp(max=1.0) if trust_clip else ratio


class Lars(DeviceSkipping):
    """LARS (You et al. 2017) over momentum SGD: in groups with weight decay (or
    `always_adapt`) the decayed gradient is scaled by trust_coeff x ||w|| / (||g|| + wd ||w||
    + eps) (capped at 1 / lr with `trust_clip`, the LARC form). With `adapt=False` it is
    torch's momentum SGD (coupled weight decay, optional Nesterov), skippable on the device."""

    def __init__(self, params, lr: float = 1.0, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, trust_coeff: float = 0.001, eps: float = 1e-8, trust_clip: bool = False,
                 always_adapt: bool = False, adapt: bool = True):
        super().__init__(params, {'lr': lr, 'momentum': momentum, 'weight_decay': weight_decay, 'nesterov': nesterov,
                                  'trust_coeff': trust_coeff, 'eps': eps, 'trust_clip': trust_clip,
                                  'always_adapt': always_adapt, 'adapt': adapt})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        w, grad, decay = _local(p), _local(p.grad), group['weight_decay']
        if group['adapt'] and (decay != 0 or group['always_adapt']):
            grad = grad.add(w, alpha=decay).mul_(self._trust_ratio(_norm(p), _norm(p.grad), group))
        elif decay != 0:
            grad = grad.add(w, alpha=decay)
        keep = self._keep(w.device)
        grad = self._masked(grad, keep)
        momentum = group['momentum']
        if momentum != 0:
            state = self.state[p]
            if 'momentum_buffer' not in state:  # zeros: the first step then sets it to the gradient
                state['momentum_buffer'] = torch.zeros_like(p)
            buf = _local(state['momentum_buffer'])
            buf.mul_(_where(keep, momentum, 1.0)).add_(grad)
            grad = grad.add(buf, alpha=momentum) if group['nesterov'] else buf
        self._apply(w, grad, group['lr'], keep)

    @staticmethod
    def _trust_ratio(w_norm: torch.Tensor, g_norm: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        ratio = group['trust_coeff'] * w_norm / (g_norm + w_norm * group['weight_decay'] + group['eps'])
        ratio = torch.where(w_norm > 0, torch.where(g_norm > 0, ratio, 1.0), 1.0)
        return ratio.div(group['lr']).clamp(max=1.0) if group['trust_clip'] else ratio


def _where(keep: torch.Tensor | None, stepping: float, skipping: float) -> float | torch.Tensor:
    """`stepping`, or on the device the value for this step (the same float32 number)."""
    return stepping if keep is None else torch.where(keep > 0, stepping, skipping)


def _as_tensor(step: Any, device: torch.device) -> torch.Tensor:
    """A step count as a float tensor on the parameter's device (checkpoints of earlier
    versions hold a number or a CPU tensor)."""
    return torch.as_tensor(step, dtype=torch.float32).to(device) if not torch.is_tensor(step) or \
        step.device != device or step.dtype != torch.float32 else step

"""Training steps on the GPU: bf16 and fp16 (GradScaler) steps of the real loop with the fused
optimizers (`adamw`: torch's fused AdamW on CUDA; `fused_adam`: the same; `fused_lamb`: the
project's LAMB), the non-finite guard skipping an inf gradient without touching the weights
or the optimizer state, and activation checkpointing giving the gradients of the plain model."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

import main
from distributed.parallel import local_optimizer
from distributed.process_group import DistContext
from engine.amp import autocast_context, resolve_amp_dtype
from engine.guard import NonFiniteGuard, clip_grad_norm
from engine.loops import train_one_epoch
from engine.trainer import Trainer
from helpers.models import rel_err
from models import build_model
from models.swin_transformer import SwinTransformer
from optimizer import build_optimizer, gradient_clip

OPTIMIZERS = ['adamw', 'fused_adam', 'fused_lamb']
ADAM_KERNELS = ('adamw', 'fused_adam')  # torch's AdamW with fused=True on CUDA
STEPS = 8


def _config(cfg_file, tmp_path, *opts):
    """The tiny Swin of the run tests (tests/helpers/runs.py TINY) with `opts` on top."""
    return main.parse_option(['--cfg', cfg_file, '--opts', 'MODEL.NUM_CLASSES', '3', 'PRINT_FREQ', '1000',
                              'OUTPUT', str(tmp_path), *opts])[1]


def _step_count(optimizer) -> int:
    """Updates the optimizer has applied: its per-parameter count (torch's AdamW, our LAMB),
    or the first group's for optimizers that count there."""
    kernel = local_optimizer(optimizer)
    group = kernel.param_groups[0]
    count = kernel.state.get(group['params'][0], {}).get('step', group.get('step'))
    assert count is not None, f'{type(kernel).__name__} keeps no step count'
    return int(count)


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    kernel = local_optimizer(optimizer)
    return [v.detach().clone() for state in kernel.state.values() for _, v in sorted(state.items())
            if torch.is_tensor(v)]


def _weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _batches(device, n: int, batch: int = 8):
    """uint8 loader batches; pinned on CUDA, as the run's loader pins them (DATA.PIN_MEMORY)."""
    gen = torch.Generator().manual_seed(0)
    out = [(torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=gen),
            torch.randint(0, 3, (batch,), generator=gen)) for _ in range(n)]
    return [(x.pin_memory(), y.pin_memory()) for x, y in out] if device.type == 'cuda' else out


# --- the training loop under AMP ------------------------------------------------------------

@pytest.mark.parametrize('optimizer', OPTIMIZERS)
@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_amp_training_steps_with_the_fused_optimizers(cfg_file, tmp_path, device, precision, optimizer):
    """STEPS updates of `train_one_epoch` (prefetcher, autocast, scaler, clipping, guard):
    a finite loss, finite fp32 weights that moved, the optimizer's step count equal to the
    updates not skipped; bf16 skips none and has no scaler; fp16's scale halved once per skip."""
    config = _config(cfg_file, tmp_path, 'AMP_ENABLE', 'True', 'AMP_DTYPE', precision,
                     'TRAIN.OPTIMIZER.NAME', optimizer)
    amp_dtype, note = resolve_amp_dtype(config, device)
    assert amp_dtype == {'bf16': torch.bfloat16, 'fp16': torch.float16}[precision], note  # an H100 has bf16
    batches = _batches(device, STEPS)
    model = build_model(config).to(device)
    with Trainer(config, DistContext(0, 1, 0, device), model, batches, None, None, amp_dtype,
                 logging.getLogger('cuda-tests')) as trainer:  # the context closes its metrics writer
        kernel = local_optimizer(trainer.optimizer)
        if optimizer in ADAM_KERNELS and device.type == 'cuda':
            assert isinstance(kernel, torch.optim.AdamW) and kernel.defaults.get('fused') is True, kernel.defaults
        before = _weights(trainer.model)
        result = train_one_epoch(trainer, batches, 0)

    skips = int(trainer.guard.total)
    assert math.isfinite(result.train_loss) and result.updates == STEPS
    if precision == 'bf16':
        assert trainer.scaler is None and skips == 0
    else:
        assert trainer.scaler is not None and skips < STEPS
        assert trainer.scaler.get_scale() == 2.0 ** 16 * 0.5 ** skips  # default init scale, no growth yet
    assert _step_count(trainer.optimizer) == STEPS - skips
    after = _weights(trainer.model)
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


# --- the non-finite guard -------------------------------------------------------------------

@pytest.mark.parametrize('optimizer', OPTIMIZERS)
@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_guard_skips_an_inf_gradient_without_touching_the_weights(cfg_file, tmp_path, device, precision,
                                                                  optimizer):
    """Update 0 applies; update 1 has an inf gradient: skipped on the device (fused kernels'
    found_inf) or the host, weights and optimizer state bit for bit unchanged, the step count
    still 1, the guard's counters 1 / 1 / update 1, fp16's scale halved; update 2 applies."""
    config = _config(cfg_file, tmp_path, 'AMP_ENABLE', 'True', 'AMP_DTYPE', precision,
                     'TRAIN.OPTIMIZER.NAME', optimizer)
    amp_dtype, _ = resolve_amp_dtype(config, device)
    model = build_model(config).to(device).train()
    optimizer_ = build_optimizer(config, model)
    # a modest initial scale, so no update overflows by itself before the poisoned one
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10) if amp_dtype == torch.float16 else None
    guard = NonFiniteGuard(device, limit=3)
    params = [p for p in model.parameters() if p.requires_grad]
    images = torch.randn(4, 3, 32, 32, device=device)
    targets = torch.tensor([0, 1, 2, 0], device=device)

    def update(n: int, poison: bool) -> None:
        with autocast_context(amp_dtype, device):
            loss = F.cross_entropy(model(images).float(), targets)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if poison:
            with torch.no_grad():
                params[0].grad.view(-1)[0] = float('inf')
        if scaler is not None:
            scaler.unscale_(optimizer_)
        guard.step(optimizer_, scaler, clip_grad_norm(params, gradient_clip(config)), n)
        optimizer_.zero_grad(set_to_none=True)

    start = _weights(model)
    update(0, poison=False)
    assert int(guard.total) == 0 and _step_count(optimizer_) == 1
    after_good = _weights(model)
    assert any(not torch.equal(a, b) for a, b in zip(start, after_good))
    state = _optimizer_tensors(optimizer_)
    scale = scaler.get_scale() if scaler is not None else None

    update(1, poison=True)
    assert all(torch.equal(a, b) for a, b in zip(after_good, _weights(model))), 'a skipped update moved weights'
    assert all(torch.equal(a, b) for a, b in zip(state, _optimizer_tensors(optimizer_))), 'optimizer state moved'
    assert _step_count(optimizer_) == 1
    assert (int(guard.total), int(guard.consecutive), int(guard.last_update)) == (1, 1, 1)
    if scaler is not None:
        assert scaler.get_scale() == scale * 0.5

    update(2, poison=False)
    assert _step_count(optimizer_) == 2
    assert (int(guard.total), int(guard.consecutive)) == (1, 0)
    final = _weights(model)
    assert any(not torch.equal(a, b) for a, b in zip(after_good, final))
    assert all(bool(torch.isfinite(p).all()) for p in final)


@pytest.mark.parametrize('name,reference,tol', [('fused_adam', 'adamw', 1e-5), ('fused_lamb', 'lamb', 1e-4)])
def test_fused_optimizer_names_update_like_their_reference(cfg_file, tmp_path, device, name, reference, tol):
    """`fused_adam` is torch's AdamW with fused=True on CUDA and `fused_lamb` the project's
    LAMB (plus FusedLAMB's clip of the update's gradient norm at 1.0): from the same weights
    and gradients, three optimizer steps move every tensor as the reference optimizer moves it."""
    moved = {}
    for opt_name in (name, reference):
        config = _config(cfg_file, tmp_path, 'TRAIN.OPTIMIZER.NAME', opt_name)
        clip = gradient_clip(config)  # TINY's TRAIN.CLIP_GRAD is the default 5.0
        assert clip == (1.0 if opt_name == 'fused_lamb' else 5.0), (opt_name, clip)
        torch.manual_seed(0)
        model = build_model(config).to(device)
        optimizer = build_optimizer(config, model)
        if opt_name == 'fused_adam' and device.type == 'cuda':
            kernel = local_optimizer(optimizer)
            assert isinstance(kernel, torch.optim.AdamW) and kernel.defaults.get('fused') is True
        start = _weights(model)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(device)
            optimizer.step()
        moved[opt_name] = [p.detach() - s for p, s in zip(model.parameters(), start)]
    names = [n for n, _ in build_model(config).named_parameters()]
    for key, got, want in zip(names, moved[name], moved[reference]):
        assert want.norm() > 0, key
        assert rel_err(got, want) < tol, (key, rel_err(got, want))


# --- activation checkpointing ---------------------------------------------------------------

def _swin(device, use_checkpoint: bool) -> SwinTransformer:
    torch.manual_seed(0)
    return SwinTransformer(img_size=64, patch_size=4, num_classes=3, embed_dim=16, depths=[2, 2],
                           num_heads=[2, 4], window_size=4, drop_path_rate=0.2,
                           use_checkpoint=use_checkpoint).to(device).train()


@pytest.mark.parametrize('amp_dtype', [None, torch.bfloat16], ids=['fp32', 'bf16'])
def test_activation_checkpointing_gives_the_same_gradients(device, amp_dtype):
    """TRAIN.USE_CHECKPOINT on the device: every block recomputed in backward, with drop path
    on (the recomputation must draw the same device random numbers), gives the plain model's
    outputs and gradients (all together to 1e-5 in fp32, 2e-2 in bf16); on CUDA it also peaks
    lower."""
    plain, ckpt = _swin(device, False), _swin(device, True)
    ckpt.load_state_dict(plain.state_dict())
    images = torch.randn(32, 3, 64, 64, device=device)
    targets = torch.randint(0, 3, (32,), device=device)
    outputs, grads, peaks = {}, {}, {}
    for name, model in (('plain', plain), ('checkpointed', ckpt)):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        torch.manual_seed(1)  # the same drop-path draws in both forwards
        with autocast_context(amp_dtype, device):
            out = model(images)
        F.cross_entropy(out.float(), targets).backward()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
            peaks[name] = torch.cuda.max_memory_allocated(device) - base
        outputs[name] = out.detach().float()
        grads[name] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    # all gradients together, and each tensor with a looser bound: GPU attention backward may
    # sum in a varying order, and bf16 rounds that into small, cancelling gradients (norm biases)
    tol, tol_each = (1e-5, 1e-3) if amp_dtype is None else (2e-2, 0.5)
    assert rel_err(outputs['checkpointed'], outputs['plain']) < tol
    got, want = grads['checkpointed'], grads['plain']
    assert got.keys() == want.keys() and all(g.norm() > 0 for g in want.values())
    flat = [torch.cat([g[k].flatten().double() for k in want]) for g in (got, want)]
    assert rel_err(*flat) < tol, rel_err(*flat)
    worst = max(want, key=lambda k: rel_err(got[k], want[k]))
    assert rel_err(got[worst], want[worst]) < tol_each, (worst, rel_err(got[worst], want[worst]))
    if peaks:
        print(f'\npeak memory of one step: plain {peaks["plain"] / 2**20:.1f} MiB, checkpointed '
              f'{peaks["checkpointed"] / 2**20:.1f} MiB')
        assert peaks['checkpointed'] < peaks['plain'], peaks

"""The GPU side of issue-17's fixes: no host sync in the guarded step of any optimizer, random
erasing as a fixed set of kernels, TF32 in fp32 runs, the per-epoch peak-memory figure, the
one-visible-GPU launch and ZeRO's bucket broadcasts in an nccl group of one."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from data.erasing import BatchRandomErasing
from engine.guard import NonFiniteGuard, clip_grad_norm
from engine.step_logger import StepLogger
from helpers.configs import make_config
from helpers.runs import ROOT, free_port
from optimizer import build_optimizer


def _model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).to(device)
    for module in model:
        if isinstance(module, nn.Linear):  # weights far from their gradients' scale, as trained ones
            nn.init.normal_(module.weight, std=2.0)
    return model


def _backward(model: nn.Module, device: torch.device, poison: bool) -> torch.Tensor:
    x = torch.randn(32, 8, device=device)
    loss = nn.functional.cross_entropy(model(x), torch.randint(0, 4, (32,), device=device))
    (loss * float('nan') if poison else loss).backward()
    return clip_grad_norm([p for p in model.parameters()], 5.0)


@pytest.mark.parametrize('name', ['adamw', 'fused_adam', 'lamb', 'fused_lamb', 'lars', 'sgd'])
def test_guarded_steps_never_read_the_device(device, monkeypatch, name):
    """A normal update, a poisoned one (skipped: weights unchanged), a normal one; the host
    reads no tensor in any of the guarded steps."""
    model = _model(device)
    optimizer = build_optimizer(make_config('TRAIN.OPTIMIZER.NAME', name, 'TRAIN.BASE_LR', '0.01'), model)
    guard = NonFiniteGuard(device, limit=3)
    reads = []
    item = torch.Tensor.item
    for update, poison in enumerate((False, True, False)):
        norm = _backward(model, device, poison)
        before = [p.detach().clone() for p in model.parameters()]
        monkeypatch.setattr(torch.Tensor, 'item', lambda self, u=update: reads.append(u) or item(self))
        guard.step(optimizer, None, norm, update)
        monkeypatch.setattr(torch.Tensor, 'item', item)
        optimizer.zero_grad(set_to_none=True)
        unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert unchanged == poison, update
    assert reads == [] and int(guard.total) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_overflow_backs_off_on_the_device(device, monkeypatch):
    if device.type != 'cuda':
        pytest.skip('fp16 gradient scaling is the CUDA path')
    model = _model(device)
    optimizer = build_optimizer(make_config(), model)
    scaler = torch.amp.GradScaler('cuda', init_scale=2.0 ** 16)
    guard = NonFiniteGuard(device, limit=3)
    with torch.autocast('cuda', dtype=torch.float16):
        out = model(torch.full((4, 8), 1e4, device=device))  # logits overflow fp16 once scaled
    scaler.scale(out.float().square().sum() * 1e30).backward()
    scaler.unscale_(optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(torch.Tensor, 'item', lambda self: pytest.fail('the host read a tensor'))
    guard.step(optimizer, scaler, clip_grad_norm(list(model.parameters()), 5.0), update=0)
    monkeypatch.undo()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0 ** 15


def _kernels(device: torch.device, batch: int) -> int:
    from torch.profiler import ProfilerActivity, profile
    images = torch.randn(batch, 3, 224, 224, device=device)
    erase = BatchRandomErasing(1.0, mode='pixel', max_count=1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        erase(images)
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def test_random_erasing_launches_the_same_kernels_at_any_batch(cuda_device):
    small, large = _kernels(cuda_device, 8), _kernels(cuda_device, 256)
    print(f'random erasing: {small} CUDA kernels at batch 8, {large} at batch 256')
    assert small == large


def _erased_share(device: torch.device) -> tuple[float, float]:
    erased = BatchRandomErasing(0.25, mode='pixel')(torch.full((4000, 3, 32, 32), 7.0, device=device))
    changed = erased.ne(7.0).any(1).flatten(1)
    hit = changed.any(1)
    return hit.float().mean().item(), changed.float().mean(1)[hit].mean().item()


def test_random_erasing_on_the_gpu_has_the_cpu_distribution(device):
    torch.manual_seed(0)
    (hit, area), (cpu_hit, cpu_area) = _erased_share(device), _erased_share(torch.device('cpu'))
    assert abs(hit - 0.25) < 0.03 and abs(cpu_hit - 0.25) < 0.03
    assert abs(area - cpu_area) < 0.012


def test_peak_memory_figure_restarts_each_epoch(cuda_device):
    big = torch.empty(2 ** 28, device=cuda_device)  # 1 GiB
    del big
    trainer = SimpleNamespace(epoch_step=0, loss_sum=torch.zeros((), device=cuda_device), device=cuda_device)
    StepLogger(compiled=False).start_epoch(trainer, 0, n_steps=1, prefetcher=None)
    assert torch.cuda.max_memory_allocated(cuda_device) < 2 ** 29


def _run_main(tmp_path, env_extra: dict, *opts: str) -> subprocess.CompletedProcess:
    from helpers.runs import TINY, write_color_folder
    data = write_color_folder(tmp_path / 'data')
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text(TINY.format(data=data))
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), '--cfg', str(cfg), '--output',
                           str(tmp_path / 'out'), '--opts', 'TRAIN.EPOCHS', '1', *opts],
                          env=env, capture_output=True, text=True, timeout=300)


def test_fp32_run_uses_tf32_and_a_late_local_rank_takes_the_visible_gpu(cuda_device, tmp_path):
    """`--disable_amp` logs TF32 on; LOCAL_RANK 3 with one visible GPU (a launcher binding
    one GPU per task) trains on it instead of stopping."""
    env = {'LOCAL_RANK': '3', 'CUDA_VISIBLE_DEVICES': os.environ.get('CUDA_VISIBLE_DEVICES', '0').split(',')[0]}
    result = _run_main(tmp_path, env, 'AMP_ENABLE', 'False')
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / 'out' / 'tiny' / 'default' / 'log_rank0.txt').read_text()
    assert 'device cuda:0' in log and 'in TF32 (TF32 True)' in log


def test_zero_step_is_one_broadcast_in_an_nccl_group_of_one(cuda_device, tmp_path, monkeypatch):
    from distributed import parallel
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(free_port()))
    dist.init_process_group('nccl', rank=0, world_size=1, device_id=cuda_device)
    try:
        model = _model(cuda_device)
        config = make_config('TRAIN.PARALLEL', 'zero', 'TRAIN.LAYER_DECAY', '0.5')
        optimizer = parallel.shard_optimizer(build_optimizer(config, model), config, SimpleNamespace(distributed=True))
        _backward(model, cuda_device, poison=False)
        calls = []
        broadcast = dist.broadcast
        monkeypatch.setattr(dist, 'broadcast', lambda *a, **k: calls.append(1) or broadcast(*a, **k))
        NonFiniteGuard(cuda_device, 3).step(optimizer, None, clip_grad_norm(list(model.parameters()), 5.0), 0)
        monkeypatch.setattr(dist, 'broadcast', broadcast)
        assert len(calls) <= 1
    finally:
        dist.destroy_process_group()

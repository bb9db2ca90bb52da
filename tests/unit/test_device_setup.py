"""How a run sets up its GPU, checked on the CPU with torch.cuda's calls stood in for: the
GPU a process takes, TF32 for fp32 math, and the per-epoch peak-memory figure."""
from types import SimpleNamespace

import pytest
import torch

from distributed import process_group
from engine.amp import set_fp32_matmul_math
from engine.step_logger import StepLogger
from helpers.configs import make_config
from utils import ConfigError


@pytest.mark.parametrize('local_rank, visible, expected', [(0, 8, 0), (5, 8, 5), (5, 1, 0), (0, 1, 0)])
def test_local_gpu(local_rank, visible, expected):
    assert process_group.local_gpu(local_rank, visible) == expected


def test_more_ranks_than_gpus_is_one_clear_error():
    with pytest.raises(ConfigError, match='local rank 3 has no GPU of its own \\(2 visible\\)'):
        process_group.local_gpu(3, 2)


def test_a_launcher_that_binds_one_gpu_per_task(monkeypatch):
    """LOCAL_RANK 5 of 8 with one visible device (SLURM --gpus-per-task=1): that device."""
    chosen = []
    monkeypatch.setenv('LOCAL_RANK', '5')
    monkeypatch.delenv('RANK', raising=False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_device', chosen.append)
    ctx = process_group.init_distributed()
    assert ctx.device == torch.device('cuda', 0) and chosen == [torch.device('cuda', 0)]


@pytest.fixture
def restore_fp32_math():
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


@pytest.mark.parametrize('tf32, precision', [('True', 'high'), ('False', 'highest')])
def test_fp32_math_on_cuda_follows_tf32(restore_fp32_math, tf32, precision):
    torch.set_float32_matmul_precision('medium')
    note = set_fp32_matmul_math(make_config('TF32', tf32, 'AMP_ENABLE', 'False'), torch.device('cuda'))
    assert torch.get_float32_matmul_precision() == precision
    assert torch.backends.cudnn.allow_tf32 is (tf32 == 'True') and 'TF32' in note


def test_fp32_math_on_the_cpu_is_left_alone(restore_fp32_math):
    torch.set_float32_matmul_precision('highest')
    assert set_fp32_matmul_math(make_config(), torch.device('cpu')) is None
    assert torch.get_float32_matmul_precision() == 'highest'


def test_each_epoch_starts_a_new_peak_memory_figure(monkeypatch):
    resets = []
    monkeypatch.setattr(torch.cuda, 'reset_peak_memory_stats', resets.append)
    trainer = SimpleNamespace(epoch_step=0, loss_sum=torch.zeros(()), device=torch.device('cuda', 0))
    logger = StepLogger(compiled=False)
    for epoch in range(2):
        logger.start_epoch(trainer, epoch, n_steps=4, prefetcher=None)
    assert resets == [torch.device('cuda', 0)] * 2

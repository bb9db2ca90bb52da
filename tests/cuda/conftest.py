"""The CUDA suite's device and its skips.

Every test in tests/cuda is marked `cuda` (tests/conftest.py, from the folder) and skipped
when torch sees no GPU. SWIN_CUDA_TESTS_ON_CPU=1 dry-runs the suite on the CPU instead, to
check the tests' own logic where there is no GPU: `device` is then the CPU, and the tests
that need CUDA-only APIs (`cuda_device`: the CUDA allocator's statistics, SDPA backend
selection, the profiler's CUDA kernels, nccl) skip.

No __init__.py here on purpose: tests/ is on sys.path, and a regular package named `cuda`
would shadow NVIDIA's `cuda` namespace package (cuda-bindings) that torch may import.
"""
from __future__ import annotations

import os

import pytest
import torch

DRY_RUN_VAR = 'SWIN_CUDA_TESTS_ON_CPU'
HERE = os.path.dirname(os.path.abspath(__file__))


def dry_run() -> bool:
    return os.environ.get(DRY_RUN_VAR, '') not in ('', '0')


def _skip_reason() -> str | None:
    if dry_run():
        if torch.cuda.is_available():  # in-process runs would pick the GPU while `device` says cpu
            return (f'{DRY_RUN_VAR}=1 runs this suite on the CPU, but a GPU is visible: also set '
                    f'CUDA_VISIBLE_DEVICES= (or unset {DRY_RUN_VAR} to run it on the GPU)')
        return None
    if not torch.cuda.is_available():
        return f'needs a CUDA device (torch.cuda.is_available() is False); {DRY_RUN_VAR}=1 dry-runs it on the CPU'
    return None


def pytest_collection_modifyitems(config, items):
    mine = [item for item in items if os.path.dirname(os.path.abspath(str(item.fspath))) == HERE]
    reason = _skip_reason() if mine else None
    for item in mine if reason else ():
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope='session')
def device() -> torch.device:
    """cuda:0 (the device main.py picks for one process), or the CPU in a dry run."""
    return torch.device('cpu') if dry_run() else torch.device('cuda', 0)


@pytest.fixture
def cuda_device(device) -> torch.device:
    """The GPU, for tests of CUDA-only APIs; they skip in a dry run."""
    if device.type != 'cuda':
        pytest.skip(f'uses CUDA-only APIs (e.g. allocator statistics, SDPA backend selection, CUDA kernels in the '
                    f'profiler, nccl): not run by the CPU dry run ({DRY_RUN_VAR}=1)')
    return device


@pytest.fixture(autouse=True)
def _full_fp32_math():
    """Each test starts with full fp32 matmuls and convolutions (no TF32), whatever an earlier
    in-process run set (main.py turns TF32 on for CUDA runs by default, config TF32), so fp32
    comparisons do not depend on the order the tests run in; the previous setting comes back
    after the test."""
    precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision('highest')
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = cudnn_tf32

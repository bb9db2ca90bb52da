"""The start-up memory estimate (distributed/memory_report.py) against the CUDA caching
allocator on a small Swin (the demo's micro model at 112 px, batch 32).

What the module documents: activations are measured on fake tensors of the training device
and equal the bytes a real forward saves for backward (about 1% fewer under AMP); the total
counts no temporaries, allocator fragmentation or CUDA context, so it is a floor. Checked
here: the activations measured on fake CUDA tensors (not a fallback) and within 5% of the
bytes a real forward leaves allocated (the documented equality; the margin covers the input
image, which the estimate counts but was allocated before, and the logits); the step's peak,
`torch.cuda.max_memory_allocated`, at least 95% of the estimated total (gradients kept
allocated, as the estimate counts them); and the peak at most the steady state plus three
times the estimated activations (backward's temporaries stay bounded)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distributed.memory_report import estimate_memory, report_lines
from engine.amp import autocast_context
from helpers.configs import make_config
from models import build_model
from optimizer import build_optimizer

BATCH = 32


def _requested(device) -> int:
    """Bytes the program asked the caching allocator for (without its rounding up to 512 B
    and unsplit block tails, which `memory_allocated` includes); `memory_allocated` where
    this torch has no such counter."""
    return torch.cuda.memory_stats(device).get('requested_bytes.all.current', torch.cuda.memory_allocated(device))


@pytest.mark.parametrize('amp_dtype', [None, torch.bfloat16], ids=['fp32', 'bf16'])
def test_memory_estimate_against_max_memory_allocated(cuda_device, amp_dtype):
    device = cuda_device
    config = make_config('DATA.BATCH_SIZE', str(BATCH), 'MODEL.DROP_PATH_RATE', '0.0')
    size, classes = config.DATA.IMG_SIZE, config.MODEL.NUM_CLASSES
    torch.manual_seed(0)
    model = build_model(config).to(device).train()
    estimate = estimate_memory(model, config, 1, amp_dtype)
    optimizer = build_optimizer(config, model)
    images = torch.randn(BATCH, 3, size, size, device=device)
    targets = torch.randint(0, classes, (BATCH,), device=device)

    def forward() -> torch.Tensor:
        with autocast_context(amp_dtype, device):
            return F.cross_entropy(model(images).float(), targets)

    # one full step first: optimizer state, gradients, cached layouts and library workspaces exist
    forward().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as the estimate counts them
    torch.cuda.synchronize(device)
    steady, steady_requested = torch.cuda.memory_allocated(device), _requested(device)
    torch.cuda.reset_peak_memory_stats(device)
    loss = forward()
    torch.cuda.synchronize(device)
    held = _requested(device) - steady_requested  # what the forward keeps for backward
    loss.backward()
    optimizer.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)

    mib = 2 ** 20
    print(f'\n{"bf16" if amp_dtype else "fp32"}: estimate {estimate.total / mib:.1f} MiB (parameters '
          f'{estimate.params / mib:.1f}, gradients {estimate.grads / mib:.1f}, optimizer state '
          f'{estimate.optimizer_state / mib:.1f}, activations {estimate.activations / mib:.1f}); allocator: '
          f'steady {steady / mib:.1f} MiB, forward holds {held / mib:.1f} MiB, step peak {peak / mib:.1f} MiB')
    print('\n'.join(report_lines(estimate, device)))
    assert estimate.activation_method.startswith('measured on fake cuda'), (estimate.activation_method, estimate.notes)
    assert abs(estimate.activations - held) <= 0.05 * held, (estimate.activations, held)
    assert peak >= 0.95 * estimate.total, (peak, estimate.total)
    assert peak - steady <= 3 * estimate.activations, (peak - steady, estimate.activations)

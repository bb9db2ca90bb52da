"""The device side of the input pipeline against the CPU on the same input: the prefetcher's
side-stream copies (the real JPEG loader, pinned memory), normalization, random erasing (drawn
by the device's own generator: its statistics against the CPU's) and mixup / cutmix (drawn by
NumPy: the same values)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import main
from data import DevicePrefetcher, DevicePreprocessor, build_datasets, build_loaders, build_mixup

CPU = torch.device('cpu')
# CUDA divides by the scalar 255 as a multiplication by its reciprocal (one rounding more than
# the CPU's division), so a normalized value may differ by a few ulps of values up to ~2.7
ULPS = dict(rtol=0.0, atol=2e-6)


def _config(cfg_file, *opts):
    return main.parse_option(['--cfg', cfg_file, '--opts', 'MODEL.NUM_CLASSES', '3', *opts])[1]


def _images(n: int = 16, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_prefetcher_side_stream_batches_equal_the_cpu_ones(cfg_file, device):
    """The validation loader of the tiny JPEG set (pinned on CUDA; batches 8, 8, 5) through
    the prefetcher on the device: each batch on the device, equal to the CPU normalization of
    the same loader batch, with the consumer's stream kept busy after each batch so the next
    batch's copy on the side stream overlaps it."""
    config = _config(cfg_file)
    _, dataset_val = build_datasets(config, 0, 1, None)
    _, loader, _ = build_loaders(config, None, dataset_val)
    assert loader.pin_memory == (device.type == 'cuda')
    expected = [DevicePreprocessor(config, CPU, is_train=False)(x, y) for x, y in loader]
    prefetcher = DevicePrefetcher(loader, DevicePreprocessor(config, device, is_train=False))
    if device.type == 'cuda':
        assert prefetcher.stream is not None and prefetcher.stream != torch.cuda.current_stream(device)
    got = []
    for images, targets in prefetcher:
        assert images.device == device and targets.device == device and images.dtype == torch.float32
        if device.type == 'cuda':
            torch.cuda._sleep(5_000_000)  # a long kernel on the consumer's stream: the next copy runs meanwhile
        got.append((images.cpu(), targets.cpu()))
    assert [x.shape[0] for x, _ in got] == [x.shape[0] for x, _ in expected] == [8, 8, 5]
    for (x, y), (want_x, want_y) in zip(got, expected):
        torch.testing.assert_close(x, want_x, **ULPS)
        assert torch.equal(y, want_y)


def test_device_normalization_equals_the_cpu_values(cfg_file, device):
    config = _config(cfg_file)
    images, labels = _images(), torch.arange(16) % 3
    want, _ = DevicePreprocessor(config, CPU, is_train=False)(images, labels)
    got, got_labels = DevicePreprocessor(config, device, is_train=False)(images, labels)
    assert got.device == device and got_labels.device == device
    torch.testing.assert_close(got.cpu(), want, **ULPS)
    print(f'\nnormalization: max |device - cpu| = {(got.cpu() - want).abs().max().item():.2e}')


def _erased(config, where, images, labels, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    out, _ = DevicePreprocessor(config, where, is_train=True)(images, labels)
    return out.cpu()


def _erasing_stats(out: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(erased pixels (B, H, W), share of images erased, mean erased area of those)."""
    boxes = (out != clean).any(dim=1)
    hit = boxes.any(dim=(1, 2))
    area = boxes.float().mean(dim=(1, 2))[hit].mean().item() if hit.any() else 0.0
    return boxes, hit.float().mean().item(), area


@pytest.mark.parametrize('mode', ['pixel', 'const'])
def test_device_random_erasing_matches_the_cpu_distribution(cfg_file, device, mode):
    """Random erasing (data/erasing.py) draws everything from the generator of the device it
    runs on, so the device and the CPU erase different rectangles for the same seed: the
    device repeats itself for a seed, and over 2048 images erases as many images (REPROB 0.5)
    and as much of each as the CPU does; erased pixels are N(0, 1) noise ('pixel') or 0
    ('const'); every other pixel is the plain normalized value."""
    config = _config(cfg_file, 'AUG.REPROB', '0.5', 'AUG.REMODE', mode)
    images = _images(2048, 32)
    labels = torch.zeros(2048, dtype=torch.int64)
    clean, _ = DevicePreprocessor(config, CPU, is_train=False)(images, labels)
    cpu_out = _erased(config, CPU, images, labels, seed=11)
    dev_out = _erased(config, device, images, labels, seed=11)
    assert torch.equal(_erased(config, device, images, labels, seed=11), dev_out)  # deterministic per device
    boxes_cpu, share_cpu, area_cpu = _erasing_stats(cpu_out, clean)
    boxes_dev, share_dev, area_dev = _erasing_stats(dev_out, clean)
    print(f'\n{mode} erasing: images erased cpu {share_cpu:.3f} / {device.type} {share_dev:.3f}, mean area '
          f'cpu {area_cpu:.4f} / {device.type} {area_dev:.4f}')
    assert abs(share_dev - 0.5) < 0.05 and abs(share_dev - share_cpu) < 0.06
    assert 0.1 < area_dev < 0.25 and abs(area_dev - area_cpu) < 0.02  # area fraction uniform(0.02, 1/3): ~0.18
    erased = dev_out.permute(1, 0, 2, 3)[:, boxes_dev]
    if mode == 'pixel':
        mean, std = erased.mean().item(), erased.std().item()
        print(f'{device.type} erasing noise: {erased.numel()} values, mean {mean:.4f}, std {std:.4f}')
        assert erased.numel() > 100_000 and abs(mean) < 0.02 and abs(std - 1) < 0.02
    else:
        assert erased.numel() > 100_000 and bool((erased == 0).all())
    kept, kept_clean = dev_out.permute(1, 0, 2, 3)[:, ~boxes_dev], clean.permute(1, 0, 2, 3)[:, ~boxes_dev]
    torch.testing.assert_close(kept, kept_clean, **ULPS)


@pytest.mark.parametrize('mixup,cutmix,mode', [('0.8', '0.0', 'batch'), ('0.0', '1.0', 'batch'),
                                               ('0.8', '1.0', 'batch'), ('0.8', '1.0', 'elem')])
def test_device_mixup_equals_the_cpu_result(cfg_file, device, mixup, cutmix, mode):
    """timm's Mixup draws lambda and the box from NumPy: with the same seed, the mixed images
    and soft targets on the device equal the CPU's."""
    config = _config(cfg_file, 'AUG.MIXUP', mixup, 'AUG.CUTMIX', cutmix, 'AUG.MIXUP_MODE', mode)
    images, labels = _images(), torch.arange(16) % 3
    mixed = []
    for where in (CPU, device):
        x, y = DevicePreprocessor(config, where, is_train=False)(images, labels)
        np.random.seed(7)
        x, y = build_mixup(config)(x, y)
        assert x.device == where and y.device == where and y.shape == (16, 3)
        mixed.append((x.cpu(), y.cpu()))
    (x_cpu, y_cpu), (x_dev, y_dev) = mixed
    plain, _ = DevicePreprocessor(config, CPU, is_train=False)(images, labels)
    assert not torch.equal(x_cpu, plain)  # mixed
    torch.testing.assert_close(x_dev, x_cpu, rtol=0.0, atol=4e-6)
    torch.testing.assert_close(y_dev, y_cpu, rtol=0.0, atol=1e-6)
    torch.testing.assert_close(y_dev.sum(1), torch.ones(16))

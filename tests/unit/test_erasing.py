"""Batched random erasing against timm's per-sample RandomErasing (the official pipeline's):
the same distribution of which images are erased, how much, in what shape and where, and
the same fill per mode. Statistics over a few thousand images, with tolerances several
standard errors wide, so the tests do not flake."""
import random

import pytest
import torch
from timm.data.random_erasing import RandomErasing
from torch.profiler import ProfilerActivity, profile

from data.device_prep import DevicePreprocessor
from data.erasing import BatchRandomErasing
from helpers.configs import make_config

SIZE, N = 32, 4000
VALUE = 7.0  # no normal draw lands on it


def _boxes(erased: torch.Tensor):
    """Per image: (erased?, erased area fraction, bounding-box height, width, centre row)."""
    changed = erased.ne(VALUE).any(dim=1)  # (N, H, W)
    rows, cols = changed.any(dim=2), changed.any(dim=1)
    index = torch.arange(SIZE, dtype=torch.float64)
    height, width = rows.sum(1).double(), cols.sum(1).double()
    centre = (rows.double() * index).sum(1) / height.clamp(min=1)
    return changed.flatten(1).any(1), changed.flatten(1).double().mean(1), height, width, centre


def _timm(mode, count, seed):
    random.seed(seed)
    torch.manual_seed(seed)
    images = torch.full((N, 3, SIZE, SIZE), VALUE)
    return RandomErasing(0.25, mode=mode, max_count=count, num_splits=0, device='cpu')(images)


def _ours(mode, count, seed):
    torch.manual_seed(seed)
    return BatchRandomErasing(0.25, mode=mode, max_count=count)(torch.full((N, 3, SIZE, SIZE), VALUE))


@pytest.mark.parametrize('mode, count', [('pixel', 1), ('rand', 1), ('const', 1), ('pixel', 3)])
def test_same_distribution_as_timm(mode, count):
    hit_t, area_t, h_t, w_t, c_t = _boxes(_timm(mode, count, 1))
    hit_o, area_o, h_o, w_o, c_o = _boxes(_ours(mode, count, 2))
    assert abs(hit_o.double().mean() - 0.25) < 0.03 and abs(hit_t.double().mean() - 0.25) < 0.03
    for ours, theirs, tolerance in ((area_o, area_t, 0.012), (h_o, h_t, 0.8), (w_o, w_t, 0.8), (c_o, c_t, 0.8)):
        ours, theirs = ours[hit_o], theirs[hit_t]
        assert abs(ours.mean() - theirs.mean()) < tolerance
        for q in (0.1, 0.5, 0.9):
            assert abs(ours.quantile(q) - theirs.quantile(q)) < 3 * tolerance


def test_fill_per_mode():
    torch.manual_seed(0)
    pixel = BatchRandomErasing(1.0, mode='pixel')(torch.full((64, 3, SIZE, SIZE), VALUE))
    noise = pixel[pixel.ne(VALUE)]
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05  # standard normal per pixel
    rand = BatchRandomErasing(1.0, mode='rand')(torch.full((64, 3, SIZE, SIZE), VALUE))
    for image in rand:  # one colour per channel in the rectangle
        for channel in image:
            assert channel[channel.ne(VALUE)].unique().numel() == 1
    const = BatchRandomErasing(1.0, mode='const')(torch.full((64, 3, SIZE, SIZE), VALUE))
    assert set(const.unique().tolist()) == {0.0, VALUE}


def test_untouched_images_keep_their_values():
    torch.manual_seed(3)
    images = torch.randn(200, 3, SIZE, SIZE)
    out = BatchRandomErasing(0.5, mode='pixel')(images.clone())
    same = out.eq(images).flatten(1).all(1)
    assert 70 < int(same.sum()) < 130  # about half not erased at all
    changed = out.ne(images).any(1)  # a rectangle: its rows x its columns
    for mask in changed[~same][:20]:
        rows, cols = mask.any(1), mask.any(0)
        assert torch.equal(mask, rows[:, None] & cols[None, :])


def _ops_for_batch(batch: int) -> int:
    prep = DevicePreprocessor(make_config('AUG.REPROB', '1.0'), torch.device('cpu'), is_train=True)
    images = torch.full((batch, 3, SIZE, SIZE), 100, dtype=torch.uint8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        prep(images, torch.zeros(batch, dtype=torch.long))
    return sum(event.count for event in prof.key_averages())


def test_the_device_step_costs_the_same_ops_at_any_batch_size():
    """The training preprocessing launches a fixed number of operations per batch, not a
    few per image (a per-sample loop would be tens of kernel launches per step on a GPU)."""
    assert _ops_for_batch(64) == _ops_for_batch(4)

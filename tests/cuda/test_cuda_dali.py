"""DATA.LOADER dali on the GPU: `mixed` decoding (nvJPEG, the hardware decoder where the GPU
has one) and GPU operators, the path the CPU suite cannot run. Batches must come back on the
GPU as uint8 with the sampler's labels, repeat with the seed, and validation must stay close
to our EvalTransform; the training images/s of the GPU pipeline are recorded (`-rP` or the
JUnit XML), not asserted. Skipped where nvidia-dali is not installed (its wheel is too large
to carry to a lent GPU machine that has none; docs/speed.md "The GPU check")."""
from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

from data import build_loader
from data.dali_loader import DaliLoader
from data.samplers import ShardSampler, TrainSampler
from data.sources import FolderSource
from data.transforms import EvalTransform
from helpers.configs import data_config
from helpers.images import write_photo_folder

pytestmark = pytest.mark.skipif(importlib.util.find_spec('nvidia.dali') is None,
                                reason='nvidia-dali is not installed (pip install nvidia-dali-cuda120)')


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return write_photo_folder(str(tmp_path_factory.mktemp('imagenet')))


def _config(root, **overrides):
    return data_config(root, **{'DATA.LOADER': 'dali', 'DATA.NUM_WORKERS': 2, 'DATA.IMG_SIZE': 224,
                                'AUG.AUTO_AUGMENT': 'rand-m9-mstd0.5-inc1', **overrides})


def test_gpu_train_batches_repeat_with_the_seed_and_follow_the_sampler(data_root, device, record_property):
    config = _config(data_root)

    def epoch_batches(epoch):
        dataset, _, loader, _, _ = build_loader(config, rank=0, world_size=1)
        loader.sampler.set_epoch(epoch)
        tic = time.perf_counter()
        batches = list(loader)
        return dataset, loader, batches, time.perf_counter() - tic

    dataset, _, first, _ = epoch_batches(0)
    _, _, again, seconds = epoch_batches(0)
    for (images, labels), (images2, labels2) in zip(first, again):
        assert images.device == device and images.dtype == torch.uint8 and images.shape[1:] == (3, 224, 224)
        assert torch.equal(images, images2) and torch.equal(labels, labels2)
    order = TrainSampler(dataset, 1, 0, seed=config.SEED)
    order.set_epoch(0)
    served = [label for _, labels in first for label in labels.tolist()]
    assert served == [dataset.source.label(i) for i in list(order)[:len(served)]]
    images = sum(len(labels) for _, labels in again)
    record_property('dali_train_images_per_s', round(images / seconds, 1))
    print(f'DALI on {device}: {images / seconds:.1f} training images/s (tiny set, includes the pipeline start)')


@pytest.mark.parametrize('crop', [True, False])
def test_gpu_validation_close_to_eval_transform(data_root, device, crop):
    config = _config(data_root, **{'TEST.CROP': crop})
    source = FolderSource(os.path.join(data_root, 'val'))
    loader = DaliLoader(config, source, ShardSampler(len(source), 0, 1), is_train=False, rank=0)
    reference = EvalTransform(config)
    diffs = []
    for images, _ in loader:
        assert images.device == device
        for image in images.cpu():
            expected = reference(source.read(len(diffs)))
            diffs.append((image.float() - expected.float()).abs().mean().item())
    assert len(diffs) == len(source)
    # nvJPEG's IDCT and upsampling differ a little from libjpeg-turbo's; the CPU backend
    # measures 0.1-0.2 grey levels per image
    assert max(diffs) < 3, diffs

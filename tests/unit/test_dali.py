"""DATA.LOADER dali on DALI's CPU backend (no GPU here): batch format, labels and order,
validation shards, equal training steps, seeding, closeness to our EvalTransform, and the
one-line errors. The GPU (`mixed` decoding) path is the same graph on other devices and is
not run here."""
import builtins
import importlib.util
import math
import os

import numpy as np
import pytest
import torch

from config import ConfigError, default_config
from data import DataError, build_loader
from data.build import build_loaders
from data.dali_loader import DaliLoader, parse_rand_augment
from data.samplers import ShardSampler, TrainSampler
from data.sources import FolderSource
from data.transforms import EvalTransform
from helpers.configs import data_config
from helpers.images import write_photo_folder

needs_dali = pytest.mark.skipif(importlib.util.find_spec('nvidia.dali') is None,
                                reason='nvidia-dali-cuda120 is not installed')


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return write_photo_folder(str(tmp_path_factory.mktemp('imagenet')))


def _config(root, **overrides):
    # building RandAugment's graph takes ~1 s; on where tested
    return data_config(root, **{'DATA.NUM_WORKERS': 1, 'DATA.LOADER': 'dali', 'AUG.AUTO_AUGMENT': 'none',
                                **overrides})


class IndexSource(FolderSource):
    """A folder whose label of sample i is i, so the labels of a batch name its samples."""

    def label(self, index: int) -> int:
        return index


def _labels(loader) -> list[int]:
    return [label for _, labels in loader for label in labels.tolist()]


# --- batches ------------------------------------------------------------------------------

@needs_dali
def test_train_batches_uint8_and_labels_follow_the_sampler(data_root):
    config = _config(data_root, **{'AUG.AUTO_AUGMENT': 'rand-m9-mstd0.5-inc1'})
    dataset_train, _, loader_train, loader_val, _ = build_loader(config, rank=0, world_size=1)
    assert len(loader_train) == 24 // 4 and len(loader_val) == math.ceil(15 / 4)
    loader_train.sampler.set_epoch(3)
    expected = TrainSampler(dataset_train, 1, 0, seed=config.SEED)
    expected.set_epoch(3)
    labels = []
    for images, targets in loader_train:
        assert images.shape == (4, 3, 64, 64) and images.dtype == torch.uint8
        assert targets.dtype == torch.int64 and targets.shape == (4,)
        assert int(images.max()) > int(images.min())  # not blank
        labels += targets.tolist()
    assert labels == [dataset_train.source.label(i) for i in expected]


@needs_dali
def test_indices_served_in_the_sampler_order(data_root):
    config = _config(data_root, **{'AUG.COLOR_JITTER': 0.4})  # the color-jitter branch
    source = IndexSource(os.path.join(data_root, 'train'))
    sampler = TrainSampler(source, 1, 0, seed=config.SEED)
    loader = DaliLoader(config, source, sampler, is_train=True, rank=0)
    sampler.set_epoch(2)
    served = _labels(loader)
    expected = TrainSampler(source, 1, 0, seed=config.SEED)
    expected.set_epoch(2)
    assert served == list(expected)
    assert sorted(served) == list(range(24))


@needs_dali
@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_validation_serves_every_image_once(data_root, world_size):
    config = _config(data_root, **{'DATA.BATCH_SIZE': 3, 'AUG.MIXUP': 0.0, 'AUG.CUTMIX': 0.0})
    source = IndexSource(os.path.join(data_root, 'val'))
    served = []
    for rank in range(world_size):
        loader = DaliLoader(config, source, ShardSampler(len(source), rank, world_size), is_train=False, rank=rank)
        sizes = [images.shape[0] for images, _ in loader]
        assert len(sizes) == len(loader) == math.ceil(len(loader.sampler) / 3)  # last batch partial
        served += _labels(loader)
    assert served == list(range(15))


@needs_dali
@pytest.mark.parametrize('world_size', [3, 5])
def test_training_steps_equal_on_every_rank(data_root, world_size):
    config = _config(data_root)
    source = IndexSource(os.path.join(data_root, 'train'))
    counts, served = [], []
    for rank in range(world_size):
        sampler = TrainSampler(source, world_size, rank, seed=config.SEED)
        loader = DaliLoader(config, source, sampler, is_train=True, rank=rank)
        sampler.set_epoch(0)
        batches = [labels.tolist() for _, labels in loader]
        assert len(batches) == len(loader) and all(len(b) == 4 for b in batches)
        counts.append(len(batches))
        served += [i for b in batches for i in b]
    assert len(set(counts)) == 1 and counts[0] == math.ceil(24 / world_size) // 4
    assert len(set(served)) == len(served) or world_size == 5  # 5 ranks pad the order
    # a resumed epoch skips the samples already trained on
    sampler = TrainSampler(source, world_size, 0, seed=config.SEED)
    loader = DaliLoader(config, source, sampler, is_train=True, rank=0)
    sampler.set_epoch(0, start=4)
    assert sum(1 for _ in loader) == counts[0] - 1


@needs_dali
def test_seeded_batches_repeat_and_change_with_the_epoch(data_root):
    config = _config(data_root, **{'AUG.AUTO_AUGMENT': 'rand-m9-mstd0.5-inc1'})

    def first_batch(epoch):
        _, _, loader, _, _ = build_loader(config, rank=0, world_size=1)
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))

    (a, la), (b, lb), (c, _) = first_batch(0), first_batch(0), first_batch(1)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


# --- validation pixels ----------------------------------------------------------------------

@needs_dali
@pytest.mark.parametrize('crop', [True, False])
def test_validation_close_to_eval_transform(data_root, crop):
    config = _config(data_root, **{'TEST.CROP': crop})
    source = FolderSource(os.path.join(data_root, 'val'))
    loader = DaliLoader(config, source, ShardSampler(len(source), 0, 1), is_train=False, rank=0)
    ours = EvalTransform(config)
    diffs, index = [], 0
    for images, _ in loader:
        for image in images:
            reference = ours(source.read(index))
            assert image.shape == reference.shape
            diffs.append((image.float() - reference.float()).abs().mean().item())
            index += 1
    assert index == len(source)
    # measured: 0.11-0.21 grey levels per image (decoders and cubic kernels differ slightly)
    assert max(diffs) < 3, diffs


# --- config and errors ---------------------------------------------------------------------

def test_rand_augment_string_maps_to_timm_defaults():
    assert parse_rand_augment('rand-m9-mstd0.5-inc1') == {'n': 2, 'm': 9.0, 'mmax': 10.0, 'mstd': 0.5,
                                                          'p': 0.5, 'inc': 1}
    assert parse_rand_augment('rand-n3-m7')['n'] == 3
    with pytest.raises(ConfigError, match='does not support'):
        parse_rand_augment('rand-m9-w0')


def test_loader_choice_validated(data_root):
    with pytest.raises(ConfigError, match='DATA.LOADER'):
        _config(data_root, **{'DATA.LOADER': 'dail'})
    with pytest.raises(ConfigError, match='synthetic'):
        _config(data_root, **{'DATA.DATASET': 'synthetic'})
    with pytest.raises(ConfigError, match='RandAugment'):
        _config(data_root, **{'AUG.AUTO_AUGMENT': 'original'})
    assert default_config().DATA.LOADER == 'torch'


def test_missing_dali_is_one_line(data_root, monkeypatch):
    real_import = builtins.__import__

    def no_dali(name, *args, **kwargs):
        if name.startswith('nvidia.dali') or (name == 'nvidia' and 'dali' in str(args[2:3])):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, '__import__', no_dali)
    config = _config(data_root)
    with pytest.raises(DataError, match='pip install nvidia-dali') as info:
        build_loaders(config, _FakeDataset(), _FakeDataset())
    assert '\n' not in str(info.value)


class _FakeDataset:
    source = None

    def __len__(self):
        return 8


def test_torch_loader_unchanged_by_default(data_root):
    config = _config(data_root, **{'DATA.LOADER': 'torch', 'DATA.NUM_WORKERS': 0})
    _, _, loader_train, _, _ = build_loader(config, rank=0, world_size=1)
    assert isinstance(loader_train, torch.utils.data.DataLoader)
    images, labels = next(iter(loader_train))
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert np.isfinite(images.float().mean().item())

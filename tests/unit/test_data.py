"""Data pipeline: sources, transforms, samplers, loaders, mixup and bad input, on small
JPEG folders written with PIL."""
import json
import logging
import os
import random
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from config import ConfigError
from data import DataError, DevicePreprocessor, build_loader, build_mixup
from data.build import build_dataset
from data.decode import decode_rgb
from data.samplers import ShardSampler, TrainSampler
from data.sources import CachedSource, FolderSource, ZipSource
from data.transforms import EvalTransform, TrainTransform
from helpers.configs import data_config
from helpers.images import CLASSES, photo, write_photo_folder, write_split


def _zip_split(root, split, out_root):
    """The official zip layout from a folder split: <split>.zip + <split>_map.txt."""
    src = FolderSource(os.path.join(root, split))
    with zipfile.ZipFile(os.path.join(out_root, f'{split}.zip'), 'w') as zf, \
            open(os.path.join(out_root, f'{split}_map.txt'), 'w') as mf:
        for path, label in src.samples:
            member = os.path.relpath(path, os.path.join(root, split))
            zf.write(path, member)
            mf.write(f'{member}\t{label}\n')


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return write_photo_folder(str(tmp_path_factory.mktemp('imagenet')))


@pytest.fixture(scope='module')
def zip_root(data_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('imagenet_zip'))
    _zip_split(data_root, 'train', out)
    _zip_split(data_root, 'val', out)
    return out


def _config(root, **overrides):
    return data_config(root, **overrides)


# --- sources -----------------------------------------------------------------------------

def test_folder_classes_and_order_match_torchvision(data_root):
    ours = FolderSource(os.path.join(data_root, 'train'))
    theirs = datasets.ImageFolder(os.path.join(data_root, 'train'))
    assert ours.classes == theirs.classes == sorted(CLASSES)
    assert ours.samples == theirs.samples


def test_num_classes_set_from_data_and_logged(data_root, caplog):
    config = _config(data_root, **{'MODEL.NUM_CLASSES': 1000})
    with caplog.at_level(logging.INFO):
        build_loader(config, rank=0, world_size=1, logger=logging.getLogger('numcls'))
    assert config.MODEL.NUM_CLASSES == len(CLASSES)
    assert config.is_frozen()
    assert any('NUM_CLASSES set to 3' in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize('split', ['train', 'val'])
def test_folder_zip_and_cache_give_identical_samples(data_root, zip_root, split):
    is_train = split == 'train'
    folder = build_dataset(_config(data_root), is_train)
    variants = [build_dataset(_config(zip_root, **{'DATA.ZIP_MODE': True, 'DATA.CACHE_MODE': mode}), is_train)
                for mode in ('no', 'part', 'full')]
    assert isinstance(variants[0].source, ZipSource)
    assert isinstance(variants[2].source, CachedSource) and variants[2].source.cached == len(folder)
    for index in (0, 5, len(folder) - 1):
        image, label = folder[index]
        for other in variants:
            other_image, other_label = other[index]
            assert other_label == label
            assert torch.equal(other_image, image)


def test_part_cache_holds_only_this_ranks_share(zip_root):
    config = _config(zip_root, **{'DATA.ZIP_MODE': True, 'DATA.CACHE_MODE': 'part'})
    dataset = build_dataset(config, True, rank=1, world_size=3)
    n = len(dataset)
    assert dataset.source.cached == len(range(1, n, 3))
    # samples outside the share are still readable (from the zip)
    assert dataset.source.read(0) == dataset.source.source.read(0)


def test_imagenet22k_list_layout(data_root, tmp_path):
    entries = [[os.path.relpath(p, data_root), label]
               for p, label in FolderSource(os.path.join(data_root, 'val')).samples]
    for split in ('train', 'val'):
        with open(os.path.join(data_root, f'ILSVRC2011fall_whole_map_{split}.txt'), 'w') as f:
            json.dump(entries, f)
    try:
        config = _config(data_root, **{'DATA.DATASET': 'imagenet22k', 'MODEL.NUM_CLASSES': 2})
        train, val, loader_train, _, _ = build_loader(config, rank=0, world_size=1)
        assert len(val) == len(entries) and config.MODEL.NUM_CLASSES == 3  # labels 0..2 need 3
        # lists only number their classes: a larger configured head is kept
        config = _config(data_root, **{'DATA.DATASET': 'imagenet22k', 'MODEL.NUM_CLASSES': 21841})
        build_loader(config, rank=0, world_size=1)
        assert config.MODEL.NUM_CLASSES == 21841
        images, labels = next(iter(loader_train))
        assert images.shape == (4, 3, 64, 64)
    finally:
        for split in ('train', 'val'):
            os.remove(os.path.join(data_root, f'ILSVRC2011fall_whole_map_{split}.txt'))


def test_synthetic_dataset():
    config = _config('', **{'DATA.DATASET': 'synthetic', 'DATA.SYNTHETIC_LENGTH': [40, 12],
                            'MODEL.NUM_CLASSES': 7})
    train, val, loader_train, loader_val, _ = build_loader(config, rank=0, world_size=1)
    assert (len(train), len(val)) == (40, 12)
    image, label = train[9]
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64) and label == 9 % 7
    assert torch.equal(train[9][0], image)
    assert not torch.equal(train[10][0], image)
    assert sum(len(x) for x, _ in loader_val) == 12


# --- transforms --------------------------------------------------------------------------

def test_train_and_eval_shapes_and_ranges(data_root):
    config = _config(data_root)
    _, _, loader_train, loader_val, _ = build_loader(config, rank=0, world_size=1)
    for loader in (loader_train, loader_val):
        images, labels = next(iter(loader))
        assert images.dtype == torch.uint8 and images.shape == (4, 3, 64, 64)
        assert labels.dtype == torch.int64
        # batches travel channels-last (plain copies when stacking) and arrive contiguous
        assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
        prep = DevicePreprocessor(config, torch.device('cpu'), is_train=False)
        x, y = prep(images, labels)
        assert x.is_contiguous()
        mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
        low, high = (-mean / std).view(1, 3, 1, 1), ((1 - mean) / std).view(1, 3, 1, 1)
        assert x.dtype == torch.float32 and bool(((x >= low - 1e-6) & (x <= high + 1e-6)).all())
        assert torch.equal(y, labels)


def test_device_preprocessor_equals_totensor_normalize(data_root):
    config = _config(data_root)
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    reference = transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(
        transforms.ToTensor()(image.permute(1, 2, 0).numpy()))
    x, _ = DevicePreprocessor(config, torch.device('cpu'), is_train=False)(image[None], torch.zeros(1))
    assert torch.equal(x[0], reference)


def test_random_erasing_only_in_training(data_root):
    config = _config(data_root, **{'AUG.REPROB': 1.0})
    images = torch.full((4, 3, 64, 64), 128, dtype=torch.uint8)
    clean, _ = DevicePreprocessor(config, torch.device('cpu'), is_train=False)(images, torch.zeros(4))
    erased, _ = DevicePreprocessor(config, torch.device('cpu'), is_train=True)(images, torch.zeros(4))
    assert torch.equal(clean, clean[:1].expand_as(clean))
    for i in range(4):  # every image got a random-noise rectangle
        assert not torch.equal(erased[i], clean[i])


def _official_eval(config, path):
    """The official test transform up to the uint8 image."""
    size = config.DATA.IMG_SIZE
    t = transforms.Compose([transforms.Resize(int(256 / 224 * size), interpolation=InterpolationMode.BICUBIC),
                            transforms.CenterCrop(size)])
    return np.asarray(t(Image.open(path).convert('RGB')))


@pytest.mark.parametrize('img_size', [64, 50])
def test_eval_transform_matches_official_pipeline(data_root, img_size):
    config = _config(data_root, **{'DATA.IMG_SIZE': img_size})
    transform = EvalTransform(config)
    for path, _ in FolderSource(os.path.join(data_root, 'val')).samples[:6]:
        with open(path, 'rb') as f:
            ours = transform(f.read()).permute(1, 2, 0).numpy().astype(int)
        reference = _official_eval(config, path).astype(int)
        assert ours.shape == reference.shape
        diff = np.abs(ours - reference)
        assert diff.max() <= 3 and diff.mean() < 0.1


def test_eval_without_crop_resizes_to_square(data_root):
    config = _config(data_root, **{'TEST.CROP': False})
    path = FolderSource(os.path.join(data_root, 'val')).samples[1][0]
    with open(path, 'rb') as f:
        assert EvalTransform(config)(f.read()).shape == (3, 64, 64)


def test_train_crop_matches_timm_random_resized_crop(data_root):
    """Without color augmentation, our crop + flip equals timm's RandomResizedCrop + flip
    (same random draws, so the same boxes) to within the resampling engines' 2-3 levels."""
    from timm.data import create_transform
    config = _config(data_root, **{'AUG.AUTO_AUGMENT': 'none', 'AUG.COLOR_JITTER': 0.0})
    ours = TrainTransform(config)
    official = create_transform(64, is_training=True, color_jitter=None, auto_augment=None,
                                interpolation='bicubic', separate=True)[0]
    for path, _ in FolderSource(os.path.join(data_root, 'train')).samples[:10]:
        with open(path, 'rb') as f:
            data = f.read()
        random.seed(3), torch.manual_seed(3)
        mine = ours(data).permute(1, 2, 0).numpy().astype(int)
        random.seed(3), torch.manual_seed(3)
        reference = np.asarray(official(Image.open(path).convert('RGB'))).astype(int)
        diff = np.abs(mine - reference)
        assert diff.max() <= 3 and diff.mean() < 0.1


def test_flips_can_be_switched_off(data_root):
    config = _config(data_root, **{'AUG.AUTO_AUGMENT': 'none', 'AUG.COLOR_JITTER': 0.0, 'AUG.HFLIP': 0.0})
    transform = TrainTransform(config)
    path = FolderSource(os.path.join(data_root, 'train')).samples[0][0]
    data = open(path, 'rb').read()
    torch.manual_seed(0)
    outputs = []
    for _ in range(6):  # same crop every time (random reseeded), flip never drawn
        random.seed(1)
        outputs.append(transform(data))
    assert all(torch.equal(o, outputs[0]) for o in outputs)


def test_reduced_decode_keeps_the_crop_and_stays_close(tmp_path):
    # a smooth gradient: any misplaced crop would show, while the two resampling paths
    # (DCT scaling + resize vs resize alone) agree on such content
    yy, xx = np.mgrid[0:900, 0:1200]
    gradient = np.stack([xx * 255 // 1200, yy * 255 // 900, (xx + yy) * 255 // 2100], -1).astype(np.uint8)
    path = tmp_path / 'big.jpg'
    Image.fromarray(gradient).save(path, quality=90)
    data = path.read_bytes()
    assert decode_rgb(data, 2).shape == (450, 600, 3)
    assert decode_rgb(data, 8).shape == (113, 150, 3)
    base = _config(str(tmp_path), **{'AUG.AUTO_AUGMENT': 'none', 'AUG.COLOR_JITTER': 0.0})
    fast = _config(str(tmp_path), **{'AUG.AUTO_AUGMENT': 'none', 'AUG.COLOR_JITTER': 0.0,
                                     'DATA.REDUCED_DECODE': True})
    for seed in range(5):
        random.seed(seed), torch.manual_seed(seed)
        full = TrainTransform(base)(data).numpy().astype(int)
        random.seed(seed), torch.manual_seed(seed)
        reduced = TrainTransform(fast)(data).numpy().astype(int)
        assert full.shape == reduced.shape == (3, 64, 64)
        assert np.abs(full - reduced).mean() < 1.5
    full_val = EvalTransform(base)(data).numpy().astype(int)
    reduced_val = EvalTransform(fast)(data).numpy().astype(int)
    assert np.abs(full_val - reduced_val).mean() < 1.5


# --- mixup -------------------------------------------------------------------------------

@pytest.mark.parametrize('mixup,cutmix', [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix_and_both(data_root, mixup, cutmix):
    config = _config(data_root, **{'AUG.MIXUP': mixup, 'AUG.CUTMIX': cutmix})
    _, _, loader_train, _, mixup_fn = build_loader(config, rank=0, world_size=1)
    assert mixup_fn is not None
    prep = DevicePreprocessor(config, torch.device('cpu'), is_train=True)
    for images, labels in loader_train:  # every batch full: drop_last, no odd last batch
        assert len(images) == config.DATA.BATCH_SIZE
        x, y = mixup_fn(*prep(images, labels))
        assert x.shape == (4, 3, 64, 64) and y.shape == (4, 3)
        assert torch.allclose(y.sum(1), torch.ones(4))


def test_no_mixup_when_both_off(data_root):
    assert build_mixup(_config(data_root, **{'AUG.MIXUP': 0.0, 'AUG.CUTMIX': 0.0})) is None


def test_odd_batch_with_mixup_is_a_config_error(data_root):
    with pytest.raises(ConfigError, match='even'):
        _config(data_root, **{'DATA.BATCH_SIZE': 5})
    _config(data_root, **{'DATA.BATCH_SIZE': 5, 'AUG.MIXUP': 0.0, 'AUG.CUTMIX': 0.0})


def test_odd_split_size_never_gives_a_short_train_batch(data_root):
    config = _config(data_root, **{'DATA.BATCH_SIZE': 10})  # 24 images: 2 full batches, 4 dropped
    _, _, loader_train, loader_val, _ = build_loader(config, rank=0, world_size=1)
    assert [len(x) for x, _ in loader_train] == [10, 10]
    assert sum(len(x) for x, _ in loader_val) == 15  # validation keeps every image


# --- samplers ----------------------------------------------------------------------------

@pytest.mark.parametrize('world_size', [1, 2, 3])
@pytest.mark.parametrize('length', [15, 16, 2])
def test_validation_shards_cover_every_index_once(world_size, length):
    seen = [i for rank in range(world_size) for i in ShardSampler(length, rank, world_size)]
    assert sorted(seen) == list(range(length))
    shuffled = [i for rank in range(world_size) for i in ShardSampler(length, rank, world_size, shuffle=True)]
    assert sorted(shuffled) == list(range(length))


@pytest.mark.parametrize('world_size', [2, 3])
def test_validation_loaders_over_ranks_see_each_image_once(data_root, world_size):
    config = _config(data_root)
    labels = []
    for rank in range(world_size):
        _, val, _, loader_val, _ = build_loader(config, rank=rank, world_size=world_size)
        labels += [int(y) for _, batch in loader_val for y in batch]
    assert sorted(labels) == sorted(label for _, label in val.samples)


def test_train_sampler_reshuffles_every_epoch_across_ranks(data_root):
    dataset = build_dataset(_config(data_root), True)
    samplers = [TrainSampler(dataset, 2, rank, seed=0) for rank in range(2)]
    epochs = []
    for epoch in range(2):
        for s in samplers:
            s.set_epoch(epoch)
        epochs.append([list(s) for s in samplers])
    for per_rank in epochs:
        assert sorted(per_rank[0] + per_rank[1]) == list(range(len(dataset)))
    assert set(epochs[0][0]) != set(epochs[1][0])  # a rank's share changes between epochs
    again = TrainSampler(dataset, 2, 0, seed=0)
    again.set_epoch(1)
    assert list(again) == epochs[1][0]


@pytest.mark.parametrize('workers', [0, 2])
def test_seeded_workers_reproduce_the_first_batch(data_root, workers):
    def first_batch(num_workers):
        config = _config(data_root, **{'DATA.NUM_WORKERS': num_workers})
        _, _, loader_train, _, _ = build_loader(config, rank=0, world_size=1)
        loader_train.sampler.set_epoch(4)
        return next(iter(loader_train))
    reference = first_batch(0)
    images, labels = first_batch(workers)
    assert torch.equal(images, reference[0]) and torch.equal(labels, reference[1])


def test_augmentation_changes_with_the_epoch(data_root):
    dataset = build_dataset(_config(data_root), True)
    dataset.set_epoch(0)
    first = dataset[3][0]
    assert torch.equal(dataset[3][0], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[3][0], first)


def test_loading_in_main_process_leaves_training_rng_alone(data_root):
    dataset = build_dataset(_config(data_root), True)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    dataset[0]
    assert torch.equal(torch.rand(3), expected)


def test_eval_and_throughput_build_only_validation(data_root, tmp_path):
    # a training split that would fail to load proves it is never read
    os.makedirs(tmp_path / 'val')
    os.symlink(os.path.join(data_root, 'val', 'a_cls'), tmp_path / 'val' / 'a_cls')
    for mode in ('EVAL_MODE', 'THROUGHPUT_MODE'):
        config = _config(str(tmp_path), **{mode: True})
        train, val, loader_train, loader_val, mixup_fn = build_loader(config, rank=0, world_size=1)
        assert train is None and loader_train is None and mixup_fn is None
        assert len(val) == 5


# --- bad input ---------------------------------------------------------------------------

def _one_line_error(config, match):
    with pytest.raises(DataError) as info:
        build_loader(config, rank=0, world_size=1)
    message = str(info.value)
    assert '\n' not in message and match in message, message
    return message


def test_missing_data_path(tmp_path):
    _one_line_error(_config(str(tmp_path / 'nowhere')), 'nowhere')
    _one_line_error(_config(''), '--data-path')


def test_missing_train_or_val_folder(data_root, tmp_path):
    os.symlink(os.path.join(data_root, 'val'), tmp_path / 'val')
    _one_line_error(_config(str(tmp_path)), os.path.join(str(tmp_path), 'train'))


def test_empty_class_folder(tmp_path):
    write_split(str(tmp_path), 'val', per_class=1, seed=0)
    os.makedirs(tmp_path / 'val' / 'empty_cls')
    _one_line_error(_config(str(tmp_path), EVAL_MODE=True), 'empty_cls')


def test_non_image_file(tmp_path):
    write_split(str(tmp_path), 'val', per_class=1, seed=0)
    (tmp_path / 'val' / 'a_cls' / 'notes.txt').write_text('hello')
    _one_line_error(_config(str(tmp_path), EVAL_MODE=True), 'notes.txt')


def test_zip_map_listing_a_missing_member(data_root, tmp_path):
    _zip_split(data_root, 'val', str(tmp_path))
    with open(tmp_path / 'val_map.txt', 'a') as f:
        f.write('a_cls/ghost.jpg\t0\n')
    _one_line_error(_config(str(tmp_path), **{'DATA.ZIP_MODE': True, 'EVAL_MODE': True}), 'a_cls/ghost.jpg')


def _corrupt_split(tmp_path):
    write_split(str(tmp_path), 'val', per_class=4, seed=0)
    folder = tmp_path / 'val' / 'a_cls'
    good = (folder / 'img_000.jpg').read_bytes()
    (folder / 'img_001.jpg').write_bytes(good[:len(good) // 2])  # truncated
    (folder / 'img_002.jpg').write_bytes(b'\xff\xd8\xff\xe0 definitely not a jpeg')  # corrupt
    return folder


def test_corrupt_images_are_logged_replaced_and_counted(tmp_path, caplog):
    folder = _corrupt_split(tmp_path)
    config = _config(str(tmp_path), **{'EVAL_MODE': True, 'DATA.MAX_CORRUPT_FRACTION': 0.2})
    _, val, _, loader_val, _ = build_loader(config, rank=0, world_size=1, logger=logging.getLogger('corrupt'))
    with caplog.at_level(logging.WARNING, logger='corrupt'):
        images = torch.cat([x for x, _ in loader_val])
    assert len(images) == len(val) == 12
    assert val.corrupt_count == 2
    logged = ' '.join(r.getMessage() for r in caplog.records)
    assert str(folder / 'img_001.jpg') in logged and str(folder / 'img_002.jpg') in logged
    # a replaced sample is a real image: the next readable one ('a_cls' is class 1: 4..7)
    assert torch.equal(val[5][0], val[7][0]) and torch.equal(val[6][0], val[7][0])


@pytest.mark.parametrize('workers', [0, 1])
def test_too_many_corrupt_images_stop_the_run(tmp_path, workers):
    _corrupt_split(tmp_path)
    config = _config(str(tmp_path), **{'EVAL_MODE': True, 'DATA.MAX_CORRUPT_FRACTION': 0.1,
                                       'DATA.NUM_WORKERS': workers})
    _, val, _, loader_val, _ = build_loader(config, rank=0, world_size=1)
    with pytest.raises(DataError, match='img_002.jpg') as info:
        for _ in loader_val:
            pass
    assert '\n' not in str(info.value) and 'MAX_CORRUPT_FRACTION' in str(info.value)


def test_corrupt_count_is_shared_by_workers(tmp_path):
    _corrupt_split(tmp_path)
    config = _config(str(tmp_path), **{'EVAL_MODE': True, 'DATA.MAX_CORRUPT_FRACTION': 0.2,
                                       'DATA.NUM_WORKERS': 2, 'DATA.BATCH_SIZE': 1})
    _, val, _, loader_val, _ = build_loader(config, rank=0, world_size=1)
    assert sum(len(x) for x, _ in loader_val) == 12
    assert val.corrupt_count == 2


def test_train_and_val_classes_must_agree(data_root, tmp_path):
    os.symlink(os.path.join(data_root, 'train'), tmp_path / 'train')
    os.makedirs(tmp_path / 'val')
    os.symlink(os.path.join(data_root, 'val', 'a_cls'), tmp_path / 'val' / 'a_cls')
    _one_line_error(_config(str(tmp_path)), 'different classes')


def test_zero_bit_posterize_gives_black_instead_of_an_error(data_root):
    """timm's RandAugment can draw posterize with 0 bits; Pillow 13 raises on it."""
    transform = TrainTransform(_config(data_root))
    ops = [op for op in transform.augment.transforms[0].ops if 'Posterize' in op.name]
    assert ops
    image = photo(40, 30, seed=1)
    for op in ops:
        out = op.aug_fn(image, 0)
        assert out.size == image.size and np.asarray(out).max() == 0
        assert np.array_equal(np.asarray(op.aug_fn(image, 4)), np.asarray(image) & 0xF0)


def test_train_order_changes_even_without_set_epoch(data_root):
    config = _config(data_root)
    _, _, loader_train, _, _ = build_loader(config, rank=0, world_size=1)
    first = [int(y) for _, batch in loader_train for y in batch]
    second = [int(y) for _, batch in loader_train for y in batch]
    assert first != second
    loader_train.sampler.set_epoch(0)  # naming an epoch reproduces it
    assert [int(y) for _, batch in loader_train for y in batch] == first


def test_transforms_accept_pil_images(data_root):
    config = _config(data_root)
    path = FolderSource(os.path.join(data_root, 'val')).samples[0][0]
    from_bytes = EvalTransform(config)(open(path, 'rb').read())
    from_pil = EvalTransform(config)(Image.open(path))
    assert torch.equal(from_bytes, from_pil)
    assert TrainTransform(config)(Image.open(path)).shape == (3, 64, 64)


def test_dataset_exposes_imagefolder_attributes(data_root):
    dataset = build_dataset(_config(data_root), False)
    reference = datasets.ImageFolder(os.path.join(data_root, 'val'))
    assert dataset.classes == reference.classes
    assert dataset.class_to_idx == reference.class_to_idx
    assert dataset.targets == reference.targets


@pytest.mark.parametrize('cache_mode', ['no', 'full'])
def test_damaged_zip_member_is_counted_not_fatal(data_root, tmp_path, cache_mode):
    _zip_split(data_root, 'val', str(tmp_path))
    member_bytes = open(FolderSource(os.path.join(data_root, 'val')).samples[2][0], 'rb').read()
    blob = bytearray((tmp_path / 'val.zip').read_bytes())
    at = blob.find(member_bytes) + len(member_bytes) // 2  # stored members sit verbatim in the zip
    blob[at] ^= 0xFF
    (tmp_path / 'val.zip').write_bytes(bytes(blob))
    config = _config(str(tmp_path), **{'DATA.ZIP_MODE': True, 'DATA.CACHE_MODE': cache_mode,
                                       'EVAL_MODE': True, 'DATA.MAX_CORRUPT_FRACTION': 0.2})
    _, val, _, loader_val, _ = build_loader(config, rank=0, world_size=1)
    assert sum(len(x) for x, _ in loader_val) == 15
    assert val.corrupt_count == 1


def test_missing_listed_image_is_counted_not_fatal(data_root, tmp_path):
    entries = [[os.path.relpath(p, data_root), label]
               for p, label in FolderSource(os.path.join(data_root, 'val')).samples]
    entries.append(['val/a_cls/ghost.jpg', 1])
    os.symlink(os.path.join(data_root, 'val'), tmp_path / 'val')
    (tmp_path / 'ILSVRC2011fall_whole_map_val.txt').write_text(json.dumps(entries))
    config = _config(str(tmp_path), **{'DATA.DATASET': 'imagenet22k', 'EVAL_MODE': True,
                                       'DATA.MAX_CORRUPT_FRACTION': 0.1})
    _, val, _, loader_val, _ = build_loader(config, rank=0, world_size=1)
    assert sum(len(x) for x, _ in loader_val) == 16 and val.corrupt_count == 1


def test_validation_cache_holds_only_the_ranks_shard(zip_root):
    config = _config(zip_root, **{'DATA.ZIP_MODE': True, 'DATA.CACHE_MODE': 'full'})
    val = build_dataset(config, False, rank=1, world_size=3)
    assert val.source.cached == 5  # 15 images over 3 ranks


def test_choice_values_are_case_insensitive(data_root, tmp_path):
    import argparse

    from config import get_config
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('DATA:\n  INTERPOLATION: Bicubic\n  CACHE_MODE: Part\n  DATASET: ImageNet\n'
                   'AUG:\n  MIXUP_MODE: Pair\n  REMODE: Pixel\n')
    config = get_config(argparse.Namespace(cfg=str(cfg)))
    assert (config.DATA.INTERPOLATION, config.DATA.CACHE_MODE, config.DATA.DATASET) == ('bicubic', 'part', 'imagenet')
    assert (config.AUG.MIXUP_MODE, config.AUG.REMODE) == ('pair', 'pixel')


def test_reduced_decode_box_mapping_has_no_drift():
    from data.transforms import _scaled_box
    assert _scaled_box((3, 5, 100, 60), 4, (250, 250)) == (1, 1, 25, 15)
    rng = random.Random(0)
    errors = []
    for _ in range(2000):
        r = rng.choice([2, 4, 8])
        h, w = rng.randint(r, 400), rng.randint(r, 400)
        top, left = rng.randint(0, 500 - h), rng.randint(0, 500 - w)
        t, lft, hh, ww = _scaled_box((top, left, h, w), r, (-(-500 // r), -(-500 // r)))
        errors += [(t * r - top) / r, (lft * r - left) / r, ((t + hh) * r - top - h) / r]
        assert hh >= 1 and ww >= 1
    assert abs(float(np.mean(errors))) < 0.05 and max(map(abs, errors)) <= 0.5 + 1e-9


def test_without_simplejpeg_pil_decodes_the_same(data_root, monkeypatch):
    """Machines without simplejpeg (it is optional) decode through PIL: same pixels."""
    import data.decode as decode
    config = _config(data_root)
    data = open(FolderSource(os.path.join(data_root, 'val')).samples[4][0], 'rb').read()
    with_simplejpeg = EvalTransform(config)(data)
    monkeypatch.setattr(decode, 'simplejpeg', None)
    assert torch.equal(EvalTransform(config)(data), with_simplejpeg)
    assert decode.decode_rgb(data, 2).shape[0] < decode.decode_rgb(data).shape[0]  # PIL draft

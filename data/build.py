"""`build_loader(config)`: datasets, samplers, loaders and the mixup function of a run."""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from timm.data import Mixup
from torch.utils.data import DataLoader

from config import mixup_active

from .datasets import ImageDataset, SyntheticDataset, collate_channels_last
from .samplers import ShardSampler, TrainSampler, shard_bounds
from .simmim import mask_targets, pretrain_transform
from .sources import CachedSource, DataError, FolderSource, ListSource, Source, ZipSource
from .transforms import build_transform

IN22K_PREFIX = 'ILSVRC2011fall_whole'  # official list names: <prefix>_map_train.txt / _map_val.txt


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_source(config, split: str) -> Source:
    """The encoded-image source of `split` ('train' or 'val') for DATA.DATASET."""
    root = config.DATA.DATA_PATH
    dataset = config.DATA.DATASET.lower()
    if dataset == 'wds':  # shards may be given by pattern or URL, without DATA_PATH
        from .shards import ShardSource, split_shards
        paths = split_shards(config, split)
        return ShardSource(paths, root if root and os.path.isdir(root) else os.path.dirname(paths[0]))
    if not root:
        raise DataError('DATA.DATA_PATH is empty; pass --data-path /path/to/dataset')
    if not os.path.isdir(root):
        raise DataError(f"DATA.DATA_PATH '{root}' does not exist" if not os.path.exists(root)
                        else f"DATA.DATA_PATH '{root}' is not a directory")
    if dataset == 'hf':  # imported here: the datasets library takes seconds to import
        from .hf_source import HFSource
        return HFSource(root, split)
    if dataset == 'imagenet22k':
        return ListSource(root, os.path.join(root, f'{IN22K_PREFIX}_map_{split}.txt'))
    if config.DATA.ZIP_MODE:
        return ZipSource(os.path.join(root, f'{split}.zip'), os.path.join(root, f'{split}_map.txt'))
    return FolderSource(os.path.join(root, split))


def _cache(source: Source, config, is_train: bool, rank: int, world_size: int) -> Source:
    # as in the official code the cache serves zip mode: its default ('part') would otherwise
    # read a whole folder tree into RAM before the first step
    mode = config.DATA.CACHE_MODE
    if mode == 'no' or not isinstance(source, ZipSource):
        return source
    if not is_train:  # a rank only ever reads its own validation shard
        return CachedSource(source, keep=range(*shard_bounds(len(source), rank, world_size)))
    if mode == 'part':
        # this rank's share of the bytes in RAM; other samples come from the zip, so the
        # sampler can still deal a fresh permutation of the whole split every epoch
        return CachedSource(source, keep=range(rank, len(source), world_size))
    return CachedSource(source)


def build_dataset(config, is_train: bool, rank: int = 0, world_size: int = 1, logger_name: str = 'data'):
    split = 'train' if is_train else 'val'
    if config.DATA.DATASET.lower() == 'synthetic':
        length = config.DATA.SYNTHETIC_LENGTH[0 if is_train else 1]
        return SyntheticDataset(length, config.DATA.IMG_SIZE, config.MODEL.NUM_CLASSES, seed=config.SEED)
    source = _cache(build_source(config, split), config, is_train, rank, world_size)
    pretraining = config.MODEL.SIMMIM.PRETRAIN  # SimMIM: (image, mask) samples, the labels unused
    transform = (pretrain_transform if pretraining else build_transform)(is_train, config)
    return ImageDataset(source, transform, seed=config.SEED, max_corrupt_fraction=config.DATA.MAX_CORRUPT_FRACTION,
                        world_size=world_size, logger_name=logger_name,
                        targets=mask_targets(config) if pretraining else None)


def build_mixup(config) -> Mixup | None:
    """timm's Mixup from the AUG keys, or None when neither mixup nor cutmix is on."""
    if not mixup_active(config):
        return None
    aug = config.AUG
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX,
                 cutmix_minmax=list(aug.CUTMIX_MINMAX) if aug.CUTMIX_MINMAX is not None else None,
                 prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)


def _loader(dataset, sampler, config, is_train: bool, rank: int) -> DataLoader:
    workers = config.DATA.NUM_WORKERS
    extra = dict(persistent_workers=True, prefetch_factor=config.DATA.PREFETCH_FACTOR) if workers > 0 else {}
    # The loader draws its workers' base seed when an iterator starts (with persistent
    # workers only the first time); a generator of its own keeps that draw out of the
    # training RNG, so a resumed run's drop path and mixup continue exactly.
    generator = torch.Generator().manual_seed(config.SEED + rank)
    return DataLoader(dataset, batch_size=config.DATA.BATCH_SIZE, sampler=sampler, num_workers=workers,
                      pin_memory=config.DATA.PIN_MEMORY and torch.cuda.is_available(),
                      drop_last=is_train, generator=generator, collate_fn=collate_channels_last, **extra)


def _check_same_classes(dataset_train, dataset_val) -> None:
    classes = [d.source.classes for d in (dataset_train, dataset_val) if d is not None]
    if len(classes) == 2 and classes[0] is not None and classes[0] != classes[1]:
        only = sorted(set(classes[0]) ^ set(classes[1])) or ['the same names in another order']
        raise DataError(f"the train and val splits have different classes (for example '{only[0]}'); "
                        f"labels would not match")


def data_num_classes(config, dataset_train, dataset_val) -> int:
    """The class count the data gives. Folders, shards with classes.txt and ClassLabel columns
    name their classes; shards and Hugging Face int labels give the largest label + 1 over the
    splits built; zip maps and 22k lists the same but never below the config's (a split may
    lack the last classes, and a checkpoint's head must still fit). Synthetic data keeps the
    config's."""
    if config.DATA.DATASET.lower() == 'synthetic':
        return config.MODEL.NUM_CLASSES
    built = [d for d in (dataset_train, dataset_val) if d is not None]
    if built[0].source.classes is not None:
        return built[0].num_classes
    if config.DATA.DATASET.lower() in ('wds', 'hf'):  # their interface: the largest label + 1
        return max(d.num_classes for d in built)
    return max([config.MODEL.NUM_CLASSES] + [d.num_classes for d in built])


def _set_num_classes(config, num_classes: int, logger: logging.Logger) -> None:
    if config.MODEL.NUM_CLASSES != num_classes:
        logger.info(f'MODEL.NUM_CLASSES set to {num_classes} from the data (the config said '
                    f'{config.MODEL.NUM_CLASSES})')
    frozen = config.is_frozen()
    config.defrost()
    config.MODEL.NUM_CLASSES = num_classes
    if frozen:
        config.freeze()


def build_datasets(config, rank: int = 0, world_size: int = 1, logger: logging.Logger | None = None):
    """(dataset_train, dataset_val); no training split with EVAL_MODE or THROUGHPUT_MODE.
    Raises DataError when the splits' class folders differ."""
    logger = logger or logging.getLogger(config.MODEL.NAME)
    build_train = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    dataset_val = build_dataset(config, False, rank, world_size, logger.name)
    dataset_train = build_dataset(config, True, rank, world_size, logger.name) if build_train else None
    if config.DATA.DATASET.lower() != 'synthetic':
        _check_same_classes(dataset_train, dataset_val)
    return dataset_train, dataset_val


def build_loaders(config, dataset_train, dataset_val, rank: int = 0, world_size: int = 1):
    """(loader_train, loader_val, mixup_fn) over built datasets; the training side is None
    without a training split. config.MODEL.NUM_CLASSES must already be the data's (mixup's
    targets have that many columns)."""
    make_loader, what = _loader_kind(config, rank)
    logging.getLogger(config.MODEL.NAME).info(f'data loader: {what}')
    loader_val = make_loader(dataset_val, ShardSampler(len(dataset_val), rank, world_size,
                                                       shuffle=config.TEST.SHUFFLE, seed=config.SEED), False)
    if dataset_train is None:
        return None, loader_val, None
    if len(dataset_train) < config.DATA.BATCH_SIZE * world_size:
        raise DataError(f'the training split has {len(dataset_train)} images, fewer than one batch of '
                        f'{config.DATA.BATCH_SIZE} on each of {world_size} ranks; lower --batch-size')
    sampler_train = TrainSampler(dataset_train, world_size, rank, seed=config.SEED)
    return make_loader(dataset_train, sampler_train, True), loader_val, build_mixup(config)


def _loader_kind(config, rank: int):
    """(make(dataset, sampler, is_train) -> loader, its name for the log) for DATA.LOADER."""
    if config.DATA.LOADER.lower() == 'dali':  # imported only when asked: DALI is an optional package
        from .dali_loader import DaliLoader, describe
        what = describe()
        return (lambda dataset, sampler, is_train: DaliLoader(config, dataset, sampler, is_train, rank)), what
    return ((lambda dataset, sampler, is_train: _loader(dataset, sampler, config, is_train, rank)),
            f'torch DataLoader, {config.DATA.NUM_WORKERS} workers')


def build_loader(config, rank: int | None = None, world_size: int | None = None,
                 logger: logging.Logger | None = None):
    """(dataset_train, dataset_val, loader_train, loader_val, mixup_fn), the official interface.

    With EVAL_MODE or THROUGHPUT_MODE the training side is not built (None for its three
    entries, mixup_fn too). MODEL.NUM_CLASSES is set from the data in `config`, as the
    official code does (a run settles it into its own config instead: engine/runner.py).
    Loader batches are uint8 (B, 3, S, S); `data.DevicePreprocessor` turns them into
    normalized float on the device. Rank and world size default to torch.distributed's.
    config.SEED is the base seed of the training order and the augmentation and must be the
    same on every rank (seed the model's RNGs with SEED + rank elsewhere).
    """
    if rank is None or world_size is None:
        rank, world_size = _rank_and_world()
    logger = logger or logging.getLogger(config.MODEL.NAME)
    dataset_train, dataset_val = build_datasets(config, rank, world_size, logger)
    _set_num_classes(config, data_num_classes(config, dataset_train, dataset_val), logger)
    return (dataset_train, dataset_val) + build_loaders(config, dataset_train, dataset_val, rank, world_size)

"""Datasets: images from a source through a per-image transform, and synthetic images.

Augmentation randomness is reseeded for every sample from (SEED, epoch, index), so a
sample's augmentation is the same whatever the number of workers, ranks or restarts:
runs and resumed runs reproduce their batches.
"""
from __future__ import annotations

import logging
import multiprocessing
import random
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from utils import DataError

from .decode import DecodeError
from .sources import SampleTable, Source

_EPOCH, _CORRUPT = 0, 1


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2 ** 63)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    # the CPU generator only: torch.manual_seed also queues a CUDA seeding with a captured
    # traceback, which costs more than decoding the image
    torch.default_generator.manual_seed(seed)


class _MainProcessRngGuard:
    """In the main process (no loader workers) per-sample seeding must not disturb the
    training RNGs, so their states are saved and restored around a sample."""

    def __enter__(self):
        self.states = random.getstate(), np.random.get_state(), torch.get_rng_state()

    def __exit__(self, *exc):
        py, npy, th = self.states
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


class ImageDataset(Dataset):
    """(uint8 image (3, S, S), label) pairs from `source` through `transform` (with
    `targets`, SimMIM pre-training: (image, mask) pairs).

    An unreadable image is logged with its path, counted across all workers and replaced by
    the next readable sample; once more than `max_corrupt_fraction` of the split has failed,
    the next failure raises `DataError`.
    """

    def __init__(self, source: Source, transform: Callable[[bytes], torch.Tensor], *, seed: int = 0,
                 max_corrupt_fraction: float = 0.001, world_size: int = 1, logger_name: str = 'data',
                 targets: Callable[[int], object] | None = None):
        self.source = source
        self.transform = transform
        # a sample's second entry: its class label, or (SimMIM pre-training) what `targets`
        # draws for it after the image, under the same per-sample seed
        self.target_of = targets or source.label
        self.seed = seed
        # each rank counts what its own share meets
        self.max_corrupt = int(max_corrupt_fraction * len(source) / world_size)
        self.logger_name = logger_name
        # [epoch, corrupt count] and which samples were found unreadable, shared with the
        # forked loader workers so the count is global and each file is reported once
        self._state = multiprocessing.Array('q', [0, 0])
        self._unreadable = multiprocessing.RawArray('b', len(source))

    def __len__(self) -> int:
        return len(self.source)

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def samples(self) -> SampleTable:
        return self.source.samples

    @property
    def classes(self) -> list[str]:
        """Class names (folder names; label numbers as text for zip and list layouts)."""
        return self.source.classes or [str(i) for i in range(self.num_classes)]

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    @property
    def targets(self) -> list[int]:
        return self.source.samples.labels.tolist()

    @property
    def corrupt_count(self) -> int:
        return self._state[_CORRUPT]

    def set_epoch(self, epoch: int) -> None:
        self._state[_EPOCH] = epoch

    def __getitem__(self, index: int):
        if get_worker_info() is None:
            with _MainProcessRngGuard():
                return self._load(index)
        return self._load(index)

    def _load(self, index: int):
        _seed_all(_sample_seed(self.seed, self._state[_EPOCH], index))
        for _ in range(len(self)):
            if not self._unreadable[index]:
                try:
                    image = self.transform(self.source.read(index))
                    return image, self.target_of(index)
                except (DecodeError, OSError) as e:
                    self._record_corrupt(index, e)
            index = (index + 1) % len(self)
        raise DataError('no readable image in the dataset')

    def _record_corrupt(self, index: int, error: Exception) -> None:
        with self._state.get_lock():
            if not self._unreadable[index]:
                self._unreadable[index] = 1
                self._state[_CORRUPT] += 1
            count = self._state[_CORRUPT]
        where = self.source.describe(index)
        logging.getLogger(self.logger_name).warning(
            f'unreadable image {where} ({error}); replaced by the next sample ({count} so far)')
        if count > self.max_corrupt:
            raise DataError(f"{count} unreadable images (the last: '{where}') exceed "
                            f"DATA.MAX_CORRUPT_FRACTION of this rank's share of {len(self)} images; "
                            f"fix or remove them")


def collate_channels_last(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The loaders' collate: (image (3, S, S), label) samples -> (uint8 (B, 3, S, S), labels),
    the images stacked in channels-last memory, the layout the transforms write, so stacking
    is plain copies (into shared memory in a loader worker, as default_collate does). The
    device preprocessor makes the batch contiguous once it is on the device."""
    images, labels = default_collate([(image.permute(1, 2, 0), label) for image, label in samples])
    return images.permute(0, 3, 1, 2), labels


class SyntheticDataset(Dataset):
    """Random uint8 images and labels, the same for the same index, made on the fly."""

    def __init__(self, length: int, img_size: int, num_classes: int, seed: int = 0):
        self.length, self.img_size, self.num_classes, self.seed = length, img_size, num_classes, seed

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Synthetic images do not change between epochs."""

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(index)
        g = torch.Generator().manual_seed(_sample_seed(self.seed, 0, index))
        image = torch.randint(0, 256, (3, self.img_size, self.img_size), dtype=torch.uint8, generator=g)
        return image, index % self.num_classes

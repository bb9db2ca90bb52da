"""Samplers: a reshuffling distributed sampler for training and an unpadded shard for
validation, so that every validation image is scored exactly once on any number of ranks."""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


class TrainSampler(DistributedSampler):
    """torch's DistributedSampler (a fresh permutation of the whole split every epoch,
    seeded by SEED and the epoch, the same on every rank, dealt out rank by rank) that also
    tells the dataset the epoch, which seeds the augmentation of each sample."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=False)
        self._iterated = False  # iterated since the last set_epoch
        self._start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch `epoch`'s order, beginning at this rank's `start`-th sample (a run resumed
        in the middle of an epoch skips what it already trained on). len() stays the
        whole share."""
        super().set_epoch(epoch)
        self._iterated = False
        self._start = start
        if hasattr(self.dataset, 'set_epoch'):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        # A loop that never calls set_epoch still gets a new order (and new augmentations)
        # each pass; one that does call it gets exactly the epoch it names.
        if self._iterated:
            self.set_epoch(self.epoch + 1)
        self._iterated = True
        order = super().__iter__()
        return itertools.islice(order, self._start, None) if self._start else order


def shard_bounds(length: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share; shares differ in size by at most one."""
    return length * rank // world_size, length * (rank + 1) // world_size


class ShardSampler(Sampler[int]):
    """This rank's contiguous share of the indices, without padding or duplicates
    (torch's DistributedSampler pads the last ranks with repeated images, which changes the
    reported accuracy with the number of GPUs). Optionally shuffled within the share."""

    def __init__(self, length: int, rank: int, world_size: int, shuffle: bool = False, seed: int = 0):
        self.start, self.stop = shard_bounds(length, rank, world_size)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def __len__(self) -> int:
        return self.stop - self.start

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.start, self.stop))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter((self.start + torch.randperm(len(self), generator=g)).tolist())

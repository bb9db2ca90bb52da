"""The last steps of the official pipeline, run on the training device on whole batches:
uint8 -> float, ToTensor's /255, ImageNet normalization, and (training) random erasing
(`erasing.py`). Loader batches stay uint8 until here: a quarter of the bytes to copy."""
from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .erasing import BatchRandomErasing


class DevicePreprocessor:
    """`(uint8 images (B, 3, H, W), labels)` from a loader -> normalized float images and
    labels on `device`. Random erasing (AUG.REPROB) applies only with `is_train`."""

    def __init__(self, config, device: torch.device, is_train: bool):
        self.device = device
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1)
        self.erase = None
        if is_train and config.AUG.REPROB > 0:
            self.erase = BatchRandomErasing(config.AUG.REPROB, mode=config.AUG.REMODE, max_count=config.AUG.RECOUNT)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # loader batches are channels-last (datasets.collate_channels_last); the model takes
        # contiguous images, made here on the uint8 batch, the cheapest place
        images = images.to(self.device, non_blocking=True).contiguous()
        targets = targets.to(self.device, non_blocking=True)
        # the same three operations as ToTensor + Normalize, so the values match exactly
        images = images.float().div_(255).sub_(self.mean).div_(self.std)
        if self.erase is not None:
            images = self.erase(images)
        return images, targets

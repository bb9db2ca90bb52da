"""SimMIM pre-training inputs: the official augmentation and the random masks over patches.

The image side is the official `SimMIMTransform`: a random resized crop to DATA.IMG_SIZE with
scale (0.67, 1) and ratio (3/4, 4/3) (torchvision's draw, bilinear), a horizontal flip, then
normalization (on the device, as for classification). The mask is drawn after the image from
NumPy's generator, which the dataset reseeds per sample, so a sample's crop and mask repeat
for the same (SEED, epoch, index) whatever the workers and ranks.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torchvision import transforms

from config import model_arch

from .decode import ImageInput, decode_rgb, image_size
from .transforms import EvalTransform, _size_only, resize_uint8

CROP_SCALE = (0.67, 1.0)
CROP_RATIO = (3. / 4., 4. / 3.)


class MaskGenerator:
    """A (input_size / model_patch_size)-square 0/1 mask made of `mask_patch_size` squares,
    ceil(ratio x squares) of them set, drawn from NumPy's global generator (which the loader
    reseeds per sample), as the official pre-training draws it."""

    def __init__(self, input_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6):
        if input_size % mask_patch_size or mask_patch_size % model_patch_size:
            raise ValueError(f'the image size ({input_size}) must be a multiple of DATA.MASK_PATCH_SIZE '
                             f'({mask_patch_size}), and that a multiple of the model patch size ({model_patch_size})')
        self.squares_per_side = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.square_count = self.squares_per_side ** 2
        self.mask_count = int(math.ceil(self.square_count * mask_ratio))

    def __call__(self) -> np.ndarray:
        hidden = np.random.permutation(self.square_count)[:self.mask_count]
        mask = np.zeros(self.square_count, dtype=int)
        mask[hidden] = 1
        mask = mask.reshape(self.squares_per_side, self.squares_per_side)
        return mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)


def mask_generator(config) -> MaskGenerator:
    return MaskGenerator(config.DATA.IMG_SIZE, config.DATA.MASK_PATCH_SIZE, model_arch(config)[0].PATCH_SIZE,
                         config.DATA.MASK_RATIO)


class PretrainTransform:
    """bytes -> uint8 (3, S, S): the official SimMIM crop and flip (no other augmentation)."""

    def __init__(self, config):
        self.size = (config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)

    def __call__(self, data: ImageInput) -> torch.Tensor:
        width, height = image_size(data)
        box = transforms.RandomResizedCrop.get_params(_size_only(width, height), CROP_SCALE, CROP_RATIO)
        image = resize_uint8(decode_rgb(data), box, self.size, 'bilinear')
        return image.flip(-1) if bool(torch.rand(1) < 0.5) else image


def pretrain_transform(is_train: bool, config):
    """Training: the official SimMIM augmentation; validation (our reconstruction check):
    the classification test transform, so the same images every epoch."""
    return PretrainTransform(config) if is_train else EvalTransform(config)


def mask_targets(config):
    """The dataset's `targets` for pre-training: a fresh mask per sample instead of its label."""
    generate = mask_generator(config)
    return lambda index: torch.from_numpy(generate())

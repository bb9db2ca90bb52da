"""SimMIM's random masks: which model patches of an image are hidden from the encoder."""
from __future__ import annotations

import math

import numpy as np


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

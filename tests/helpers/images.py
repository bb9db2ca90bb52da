"""Image folders for the data tests: smooth random JPEGs of several sizes in class folders
whose names do not sort the way they are listed."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

CLASSES = ['b_cls', 'a_cls', 'C_cls']  # unsorted on purpose; 'C' sorts before 'a'
SIZES = [(37, 53), (300, 200), (64, 64), (129, 97), (250, 410)]


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random image (JPEG-friendly, like a photograph more than noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def write_split(root: str, split: str, per_class: int, seed: int) -> None:
    for c, name in enumerate(CLASSES):
        folder = os.path.join(root, split, name)
        os.makedirs(folder)
        for i in range(per_class):
            w, h = SIZES[(i + c) % len(SIZES)]
            photo(w, h, seed + 100 * c + i).save(os.path.join(folder, f'img_{i:03d}.jpg'), quality=90)


def write_photo_folder(root: str) -> str:
    """train/ (8 per class) and val/ (5 per class) of the three CLASSES."""
    write_split(root, 'train', per_class=8, seed=0)
    write_split(root, 'val', per_class=5, seed=1000)
    return root

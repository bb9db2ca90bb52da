"""Writes small demo datasets to disk once, as an ImageFolder tree of JPEG files, so the
README demo runs with no download and goes through the same folder pipeline as ImageNet.

The tree is written into a temporary sibling folder and renamed into place, so a crash
never leaves a half-written dataset and several processes (ranks of one run) preparing
it at once end with one complete copy.
"""
from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

from utils import write_folder_atomically

DIGITS_CLASSES = tuple(str(c) for c in range(10))  # folder names, also the labels' order
DIGITS_IMAGE_SIZE = 32  # the 8x8 scans upscaled 4x, big enough for a micro Swin's patches and windows
DIGITS_VAL_SHARE = 0.2
DIGITS_SEED = 0
DIGITS_JPEG_QUALITY = 95


def digits_val_mask(labels: np.ndarray) -> np.ndarray:
    """Which samples go to val: per class, in class order, a permutation from one generator
    seeded with DIGITS_SEED picks the first 20% (rounded). Stratified and fixed, so every
    machine and every rerun gets the same split."""
    rng = np.random.default_rng(DIGITS_SEED)
    val = np.zeros(len(labels), dtype=bool)
    for label in range(len(DIGITS_CLASSES)):
        members = rng.permutation(np.flatnonzero(labels == label))
        val[members[:round(DIGITS_VAL_SHARE * len(members))]] = True
    return val


def digits_image(scan: np.ndarray) -> Image.Image:
    """One 8x8 scan (values 0..16) as the RGB image written to disk; RGB so every decoder
    (PIL, simplejpeg) gives 3 channels without a conversion path of its own."""
    gray = np.rint(scan * (255 / 16)).astype(np.uint8)
    # Resizing a uint8 ('L') image clips the bicubic overshoot to 0..255.
    size = (DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE)
    return Image.fromarray(gray).resize(size, Image.Resampling.BICUBIC).convert('RGB')


def _write_digits(out: str) -> dict[str, int]:
    from sklearn.datasets import load_digits  # only needed on the one run that writes

    digits = load_digits()
    val = digits_val_mask(digits.target)
    for split in ('train', 'val'):
        for name in DIGITS_CLASSES:
            os.makedirs(os.path.join(out, split, name))
    for index, (scan, label) in enumerate(zip(digits.images, digits.target)):
        path = os.path.join(out, 'val' if val[index] else 'train', DIGITS_CLASSES[label], f'{index:04d}.jpg')
        digits_image(scan).save(path, 'JPEG', quality=DIGITS_JPEG_QUALITY)
    return {'train': int((~val).sum()), 'val': int(val.sum())}


_WRITERS = {'digits': _write_digits}


def prepare_dataset(name: str, root: str, logger: logging.Logger | None = None) -> bool:
    """Write dataset `name` to `root` unless `root` exists; True if this call wrote it.

    Returns False without touching anything when `root` exists, including when another
    process renamed its copy into place while this one was writing."""
    if name not in _WRITERS:
        raise ValueError(f"unknown dataset to prepare '{name}' (known: {', '.join(sorted(_WRITERS))})")
    if os.path.exists(root):
        return False
    counts = write_folder_atomically(root, _WRITERS[name])
    if counts is None:
        return False  # another process renamed its complete copy into place first
    if logger is not None:
        logger.info(f"prepared {name}: {counts['train']} train / {counts['val']} val images in "
                    f"{os.path.abspath(root)}")
    return True

"""Per-image transforms run in the loader workers: encoded bytes -> uint8 tensor (3, S, S).

They reproduce the official pipelines (timm's `create_transform` for training, resize +
center crop for testing) up to the uint8 image; converting to float, normalizing, random
erasing and mixup happen on the training device (`data/device_prep.py`), which keeps the
workers' work and the host-to-device copies 4x smaller.

Three pieces are replaced for speed; everything random comes from timm's own objects:
- decoding goes through `data/decode.py` (same pixels as PIL, faster; optionally at reduced
  scale, DATA.REDUCED_DECODE);
- bilinear/bicubic resampling uses torch's antialiased uint8 kernels instead of PIL's, about
  7x faster here and within 2 grey levels of PIL's output (mean difference < 0.01 level);
- RandAugment's shears and translations run a kernel of our own (`data/fast_warps.py`) that
  gives PIL's pixels exactly, about 4x faster.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from . import fast_warps
from .decode import JPEG_SCALES, ImageInput, decode_rgb, image_size

_TORCH_MODES = ('bilinear', 'bicubic')  # resampled by torch; the others by PIL


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    if bits_to_keep <= 0:  # Pillow < 13 gave black for 0 bits; Pillow 13 raises instead
        return img.point([0] * (256 * len(img.getbands())))
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def replace_ops(transform, replacements: dict) -> None:
    """Swap the functions of timm's augmentation ops (RandAugment's `ops`, AutoAugment's
    sub-policies, inside a Compose) by `replacements` {timm function: ours}."""
    ops = list(getattr(transform, 'ops', None) or [])
    for sub in getattr(transform, 'policy', None) or []:  # AutoAugment: lists of ops
        ops.extend(sub)
    for op in ops:
        op.aug_fn = replacements.get(op.aug_fn, op.aug_fn)
    for inner in getattr(transform, 'transforms', None) or []:  # Compose
        replace_ops(inner, replacements)


def allow_zero_bit_posterize(transform) -> None:
    """timm's RandAugment draws posterize with 0 bits now and then (magnitude 10; about
    0.1% of images with rand-m9-mstd0.5), which Pillow 13 rejects with a ValueError that
    would end the run. Give those ops the black image older Pillow produced."""
    replace_ops(transform, {auto_augment.posterize: _posterize})


def _mode_name(interpolation) -> str:
    """'bicubic' etc. from a torchvision InterpolationMode or a PIL filter (timm gives either)."""
    if isinstance(interpolation, InterpolationMode):
        return interpolation.value
    return Image.Resampling(interpolation).name.lower()


def resize_uint8(image: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int],
                 interpolation: str) -> torch.Tensor:
    """Crop `box` = (top, left, height, width) of an (H, W, 3) uint8 image and resize it to
    `size` = (height, width), antialiased as PIL does when shrinking. Returns a (3, height,
    width) tensor in channels-last memory (a view of (height, width, 3) pixels): torch's
    uint8 kernels resample that layout fastest, PIL takes it without a copy per plane and
    the loader's collate stacks it with plain copies (`datasets.collate_channels_last`)."""
    top, left, height, width = box
    pixels = torch.from_numpy(image)[top:top + height, left:left + width]
    if (height, width) == tuple(size):
        return _planar(pixels)
    if interpolation not in _TORCH_MODES:  # nearest, lanczos, ...: PIL, as the official pipeline
        crop = Image.fromarray(np.ascontiguousarray(image[top:top + height, left:left + width]))
        return _planar(np.array(crop.resize(size[::-1], str_to_pil_interp(interpolation))))
    crop = pixels.unsqueeze(0).permute(0, 3, 1, 2)  # (1, 3, h, w) with channels-last strides
    out = F.interpolate(crop, size=size, mode=interpolation, antialias=True, align_corners=False)
    return out[0]


def _planar(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W, 3) pixels -> (3, H, W) tensor, a channels-last view of them (no copy)."""
    return (torch.from_numpy(image) if isinstance(image, np.ndarray) else image).permute(2, 0, 1)


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())


def _reduction(crop_h: int, crop_w: int, out_h: int, out_w: int) -> int:
    """Largest DCT scale 1/r at which the crop still has at least the output's pixels."""
    for r in JPEG_SCALES:
        if crop_h // r >= out_h and crop_w // r >= out_w:
            return r
    return 1


def _scaled_box(box, reduce: int, shape) -> tuple[int, int, int, int]:
    """Map a crop box from full-resolution coordinates onto an image decoded at 1/reduce,
    rounding both edges so the box does not drift towards the top-left."""
    top, left, height, width = box
    t, lft = round(top / reduce), round(left / reduce)
    b = min(shape[0], max(t + 1, round((top + height) / reduce)))
    r = min(shape[1], max(lft + 1, round((left + width) / reduce)))
    return t, lft, b - t, r - lft


def _size_only(width: int, height: int) -> torch.Tensor:
    """Stands in for an image where timm only needs its size (crop sampling): no memory."""
    return torch.empty(1, 1, 1, dtype=torch.uint8).expand(1, height, width)


class TrainTransform:
    """bytes -> uint8 (3, S, S): RandomResizedCrop, flips, RandAugment or color jitter.

    The crop is sampled by timm's RandomResizedCropAndInterpolation on the full-size image
    (from the JPEG header, before decoding), so with DATA.REDUCED_DECODE the crop statistics
    are exactly those of the official pipeline; only the pixels inside a crop that is at
    least twice the output size come from a DCT-scaled decode.
    """

    def __init__(self, config):
        size = config.DATA.IMG_SIZE
        primary, secondary, _ = create_transform(
            size, is_training=True,
            color_jitter=config.AUG.COLOR_JITTER if config.AUG.COLOR_JITTER > 0 else None,
            auto_augment=config.AUG.AUTO_AUGMENT if config.AUG.AUTO_AUGMENT != 'none' else None,
            interpolation=config.DATA.INTERPOLATION, hflip=config.AUG.HFLIP, vflip=config.AUG.VFLIP,
            separate=True)
        crop = primary.transforms[0]
        assert isinstance(crop, RandomResizedCropAndInterpolation), crop
        # official: CIFAR-size inputs take a padded random crop instead of a resized one
        self.pad_crop = transforms.RandomCrop(size, padding=4, pad_if_needed=True) if size <= 32 else None
        self.crop = None if self.pad_crop else crop
        self.size = (size, size)
        self.hflip, self.vflip = config.AUG.HFLIP, config.AUG.VFLIP
        self.augment = secondary if secondary.transforms else None
        allow_zero_bit_posterize(secondary)
        replace_ops(secondary, fast_warps.REPLACEMENTS)  # PIL's pixels, faster
        fast_warps.compile_kernel()
        self.reduced_decode = config.DATA.REDUCED_DECODE

    def __call__(self, data: ImageInput) -> torch.Tensor:
        if self.pad_crop is not None:
            image = _planar(np.array(self.pad_crop(Image.fromarray(decode_rgb(data)))))
        else:
            width, height = image_size(data)
            box = self.crop.get_params(_size_only(width, height), self.crop.scale, self.crop.ratio)
            interpolation = self.crop.interpolation
            if isinstance(interpolation, (tuple, list)):
                interpolation = random.choice(interpolation)
            reduce = _reduction(box[2], box[3], *self.size) if self.reduced_decode else 1
            image = decode_rgb(data, reduce)
            if image.shape[:2] != (height, width):  # the scale the decoder actually chose
                box = _scaled_box(box, round(height / image.shape[0]), image.shape)
            image = resize_uint8(image, box, self.size, _mode_name(interpolation))
        # same draws as torchvision's RandomHorizontalFlip / RandomVerticalFlip
        hflip = self.hflip > 0 and bool(torch.rand(1) < self.hflip)
        vflip = self.vflip > 0 and bool(torch.rand(1) < self.vflip)
        if self.augment is None:
            return image.flip([d for d, on in ((-1, hflip), (-2, vflip)) if on]) if hflip or vflip else image
        pil = _to_pil(image)
        if hflip:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if vflip:
            pil = pil.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        return _planar(np.array(self.augment(pil)))


class EvalTransform:
    """bytes -> uint8 (3, S, S): the official test pipeline. With TEST.CROP, resize the
    shorter side to int(256 / 224 * S) and center-crop S; otherwise resize to S x S."""

    def __init__(self, config):
        self.size = config.DATA.IMG_SIZE
        self.resize_im = self.size > 32  # official: inputs of 32 px or less are not resized
        self.crop = config.TEST.CROP
        # the official test transform: bicubic, lanczos and hamming as named, others bilinear
        name = config.DATA.INTERPOLATION
        self.interpolation = name if name in ('bicubic', 'lanczos', 'hamming') else 'bilinear'
        self.reduced_decode = config.DATA.REDUCED_DECODE

    def _resized_shape(self, height: int, width: int) -> tuple[int, int]:
        if not self.crop:
            return self.size, self.size
        short = int(256 / 224 * self.size)
        # torchvision Resize(int): the shorter side becomes `short`, the other is truncated
        if width <= height:
            return int(short * height / width), short
        return short, int(short * width / height)

    def __call__(self, data: ImageInput) -> torch.Tensor:
        if not self.resize_im:  # used as they are when already S x S (CIFAR-style data)
            image = decode_rgb(data)
            if image.shape[:2] == (self.size, self.size):
                return _planar(image)
            return resize_uint8(image, (0, 0, *image.shape[:2]), (self.size, self.size), self.interpolation)
        width, height = image_size(data)
        out_h, out_w, top, left = self.geometry(height, width)
        reduce = _reduction(height, width, out_h, out_w) if self.reduced_decode else 1
        image = decode_rgb(data, reduce)
        image = resize_uint8(image, (0, 0, image.shape[0], image.shape[1]), (out_h, out_w), self.interpolation)
        if self.crop:
            image = image[:, top:top + self.size, left:left + self.size]
        return image

    def geometry(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(resized height, width, crop top, left) of an image of that size (the crop offsets
        torchvision's CenterCrop takes; 0, 0 without TEST.CROP)."""
        out_h, out_w = self._resized_shape(height, width)
        if not self.crop:
            return out_h, out_w, 0, 0
        return out_h, out_w, int(round((out_h - self.size) / 2.0)), int(round((out_w - self.size) / 2.0))


def build_transform(is_train: bool, config):
    """The per-image transform of a split: encoded bytes (or a PIL image) -> uint8 (3, S, S)."""
    return TrainTransform(config) if is_train else EvalTransform(config)

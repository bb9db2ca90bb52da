"""RandAugment's shear and translate ops, bit-exact with PIL and about 4x faster.

Pillow warps an image with bilinear or bicubic resampling through a generic per-pixel
filter: for every output pixel it maps the centre through the affine matrix, interpolates
2 x 2 or 4 x 4 neighbours in doubles and truncates. Shears and translations along one axis
move pixels along that axis only, so the interpolation across the other axis has a zero
fraction and returns the row (or column) itself; this kernel skips it and computes the same
doubles in the same order, giving PIL's pixels exactly (tests/unit/test_fast_warps.py), at
about a quarter of the work. Rotation uses both axes and stays with PIL.

The kernel is compiled by numba (cached on disk); without numba the ops stay timm's.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image
from timm.data import auto_augment

try:
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None


def _jit(fn):
    return numba.njit(cache=True, nogil=True)(fn) if numba is not None else fn


@_jit
def _cubic(v1, v2, v3, v4, d):
    """Pillow's transform cubic (a = -1), evaluated in its order."""
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


@_jit
def _row_samples(a0, a1, a2, y, width, ixs, dxs, inside):
    """Where each pixel of row y samples: xin = a0 (x + .5) + a1 (y + .5) + a2, computed as
    Pillow does; its integer part, fraction and whether it falls inside [0, width)."""
    for x in range(width):
        xin = a0 * (x + 0.5) + a1 * (y + 0.5) + a2
        inside[x] = not (xin < 0.0 or xin >= width)
        xin -= 0.5
        ix = int(math.floor(xin)) if xin < 0.0 else int(xin)
        ixs[x] = ix
        dxs[x] = xin - ix


@_jit
def _warp_rows(src, a0, a1, a2, bicubic, fill, out):
    """out[y, x] = src sampled on row y at xin (_row_samples), as Pillow's affine transform
    samples when the matrix keeps rows (yin = y + .5): neighbours clamped to the row, fill
    outside it, bicubic clipped to 0..255, both truncated. Each row is first copied to
    doubles with its edge repeated once on each side (the clamp)."""
    height, width, channels = src.shape
    ixs, dxs = np.empty(width, np.int64), np.empty(width, np.float64)
    inside = np.empty(width, np.bool_)
    row = np.empty((channels, width + 2), np.float64)
    for y in range(height):
        _row_samples(a0, a1, a2, y, width, ixs, dxs, inside)
        for b in range(channels):
            for x in range(width):
                row[b, x + 1] = src[y, x, b]
            row[b, 0], row[b, width + 1] = row[b, 1], row[b, width]
        for b in range(channels):
            values = row[b]
            for x in range(width):
                if not inside[x]:
                    out[y, x, b] = fill[b]
                    continue
                ix, d = ixs[x] + 1, dxs[x]  # + 1: the row's copy starts with the repeated edge
                if bicubic:
                    v = _cubic(values[max(ix - 1, 0)], values[ix], values[ix + 1], values[min(ix + 2, width + 1)], d)
                    out[y, x, b] = 0 if v <= 0.0 else (255 if v >= 255.0 else int(v))
                else:
                    p = values[ix]
                    out[y, x, b] = int(p + (values[ix + 1] - p) * d)


def warp_along_axis(img: Image.Image, a0: float, a1: float, a2: float, vertical: bool, resample,
                    fillcolor) -> Image.Image:
    """Pillow's `img.transform(size, AFFINE, m, resample, fillcolor=...)` for a matrix that
    moves pixels along one axis: m = (a0, a1, a2, 0, 1, 0), or (1, 0, 0, a1, a0, a2) with
    `vertical` (the same sampling on the transposed image)."""
    src = np.asarray(img)
    if vertical:
        src = src.transpose(1, 0, 2)
    out = np.empty_like(src)
    fill = np.asarray(fillcolor if fillcolor is not None else (0,) * src.shape[2], dtype=np.uint8)
    _warp_rows(src, float(a0), float(a1), float(a2), resample == Image.Resampling.BICUBIC, fill, out)
    return Image.fromarray(np.ascontiguousarray(out.transpose(1, 0, 2)) if vertical else out, img.mode)


def _fast(img: Image.Image, kwargs: dict) -> bool:
    """Draws the resample as timm does (its RNG use unchanged); True when the kernel applies."""
    auto_augment._check_args_tf(kwargs)
    return img.mode == 'RGB' and kwargs['resample'] in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


def shear_x(img, factor, **kwargs):
    if not _fast(img, kwargs):
        return img.transform(img.size, Image.AFFINE, (1, factor, 0, 0, 1, 0), **kwargs)
    return warp_along_axis(img, 1, factor, 0, False, kwargs['resample'], kwargs.get('fillcolor'))


def shear_y(img, factor, **kwargs):
    if not _fast(img, kwargs):
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, factor, 1, 0), **kwargs)
    return warp_along_axis(img, 1, factor, 0, True, kwargs['resample'], kwargs.get('fillcolor'))


def translate_x_rel(img, pct, **kwargs):
    pixels = pct * img.size[0]
    if not _fast(img, kwargs):
        return img.transform(img.size, Image.AFFINE, (1, 0, pixels, 0, 1, 0), **kwargs)
    return warp_along_axis(img, 1, 0, pixels, False, kwargs['resample'], kwargs.get('fillcolor'))


def translate_y_rel(img, pct, **kwargs):
    pixels = pct * img.size[1]
    if not _fast(img, kwargs):
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, pixels), **kwargs)
    return warp_along_axis(img, 1, 0, pixels, True, kwargs['resample'], kwargs.get('fillcolor'))


def translate_x_abs(img, pixels, **kwargs):
    if not _fast(img, kwargs):
        return img.transform(img.size, Image.AFFINE, (1, 0, pixels, 0, 1, 0), **kwargs)
    return warp_along_axis(img, 1, 0, pixels, False, kwargs['resample'], kwargs.get('fillcolor'))


def translate_y_abs(img, pixels, **kwargs):
    if not _fast(img, kwargs):
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, pixels), **kwargs)
    return warp_along_axis(img, 1, 0, pixels, True, kwargs['resample'], kwargs.get('fillcolor'))


# timm's op function -> ours (same arguments, same random draws, same pixels); without
# numba the kernel would be interpreted Python, so timm's ops stay
REPLACEMENTS = {} if numba is None else {
    auto_augment.shear_x: shear_x, auto_augment.shear_y: shear_y,
    auto_augment.translate_x_rel: translate_x_rel, auto_augment.translate_y_rel: translate_y_rel,
    auto_augment.translate_x_abs: translate_x_abs, auto_augment.translate_y_abs: translate_y_abs,
}


def compile_kernel() -> None:
    """Compile (or load from numba's cache) before loader workers fork, so each worker does
    not compile its own copy."""
    if numba is not None:
        img = Image.new('RGB', (4, 4))
        for bicubic in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC):
            warp_along_axis(img, 1, 0.5, 0.25, False, bicubic, (1, 2, 3))

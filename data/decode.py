"""Image decoding from encoded bytes to an RGB uint8 array (H, W, 3).

JPEGs go through simplejpeg (libjpeg-turbo, the same decoder and settings PIL uses, so the
pixels are identical, in about three quarters of PIL's time) and may be decoded at 1/2, 1/4
or 1/8 scale in the DCT domain; everything else, CMYK JPEGs (whose conversion PIL does its
own way) and any JPEG simplejpeg refuses go through PIL as in the official pipeline.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # optional: without it every image is decoded by PIL
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only where simplejpeg is absent
    simplejpeg = None

JPEG_SCALES = (8, 4, 2, 1)  # DCT scaling denominators libjpeg-turbo runs at SIMD speed


# what PIL raises for a file that is not a readable image (the bomb error: > 2x its pixel limit)
_PIL_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DecodeError(ValueError):
    """The bytes are not a readable image (truncated, corrupt or not an image at all)."""


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b'\xff\xd8\xff'


ImageInput = bytes | Image.Image | np.ndarray  # encoded bytes, or an already decoded image


def image_size(data: ImageInput) -> tuple[int, int]:
    """(width, height) from the header alone, without decoding the pixels."""
    if isinstance(data, Image.Image):
        return data.size
    if isinstance(data, np.ndarray):
        return data.shape[1], data.shape[0]
    if simplejpeg is not None and _is_jpeg(data):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return width, height
        except ValueError:
            pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except _PIL_ERRORS as e:
        raise DecodeError(f'not a readable image ({type(e).__name__}: {e})') from None


def decode_rgb(data: ImageInput, reduce: int = 1) -> np.ndarray:
    """Decode to RGB uint8 (H, W, 3). `reduce` (1, 2, 4 or 8) asks for a DCT-scaled JPEG
    decode whose size is ceil(size / reduce); other formats ignore it and come back full size.
    A PIL image or an (H, W, 3) uint8 array passes through (converted to RGB)."""
    if isinstance(data, Image.Image):
        return np.array(data.convert('RGB'))  # writable, as torch.from_numpy wants
    if isinstance(data, np.ndarray):
        return data
    if simplejpeg is not None and _is_jpeg(data):
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if colorspace != 'CMYK':  # PIL's CMYK -> RGB conversion differs from libjpeg's
                return simplejpeg.decode_jpeg(data, colorspace='RGB', min_height=-(-height // reduce),
                                              min_width=-(-width // reduce), min_factor=reduce)
        except ValueError:
            pass  # arithmetic coding or corrupt: PIL decides which
    return _decode_with_pil(data, reduce)


def _decode_with_pil(data: bytes, reduce: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # large is fine
            with Image.open(io.BytesIO(data)) as img:
                if reduce > 1 and img.format == 'JPEG':
                    img.draft('RGB', (-(-img.size[0] // reduce), -(-img.size[1] // reduce)))
                return np.array(img.convert('RGB'))  # writable, as torch.from_numpy wants
    except _PIL_ERRORS as e:
        raise DecodeError(f'not a readable image ({type(e).__name__}: {e})') from None

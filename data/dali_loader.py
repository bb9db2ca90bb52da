"""`DATA.LOADER dali`: images decoded and augmented by NVIDIA DALI, on the GPU where there
is one (`mixed` decoding, GPU ops) and on DALI's CPU backend otherwise.

The order of the samples is ours: the encoded bytes of each batch come from the run's
`Source` (folder, zip, 22k list, shards, HF) through an external source, in the order of
the same samplers as the torch loader (`TrainSampler`: a fresh permutation of the whole
split each epoch from SEED and the epoch, every rank the same number of full batches;
`ShardSampler`: each rank's contiguous, unpadded share of the validation split, the last
batch partial). Batches are uint8 (B, 3, S, S) images and int64 labels, as from the torch
loader, so `DevicePreprocessor` (normalization, random erasing) and mixup stay as they are.

What DALI cannot do as timm does is listed in docs/data.md ("GPU decoding with DALI").
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from utils import ConfigError, DataError

from .decode import image_size
from .sources import Source
from .transforms import EvalTransform

INSTALL_HINT = 'pip install nvidia-dali-cuda120==2.4.0 (see requirements.txt)'
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # timm's RandomResizedCrop defaults
# timm fills the pixels uncovered by RandAugment's affine ops with the ImageNet mean
# (124, 116, 104); DALI's rotate takes one value for all channels: their mean
FILL_GREY = round(sum(255 * m for m in (0.485, 0.456, 0.406)) / 3)
_TIMM_RAND_DEFAULTS = {'n': 2, 'mmax': 10.0, 'mstd': 0.0, 'p': 0.5, 'inc': 0}


def import_dali():
    """The `nvidia.dali` modules, or DataError with the install command (exit code 2)."""
    try:
        import nvidia.dali as dali
        from nvidia.dali import auto_aug, fn, types  # noqa: F401
    except ImportError as e:
        raise DataError(f'DATA.LOADER dali needs NVIDIA DALI, which is not importable ({e}); '
                        f'{INSTALL_HINT}, or use DATA.LOADER torch') from None
    return dali


def parse_rand_augment(spec: str) -> dict:
    """timm's `rand-m9-mstd0.5-inc1` -> {'n', 'm', 'mmax', 'mstd', 'p', 'inc'} with timm's
    defaults (2 ops, magnitude 0-10, probability 0.5 per op)."""
    parts = spec.split('-')
    if parts[0] != 'rand':
        raise ConfigError(f"AUG.AUTO_AUGMENT '{spec}' is not a RandAugment string ('rand-m9-mstd0.5-inc1'); "
                          f"DATA.LOADER dali supports RandAugment or 'none'")
    out = dict(_TIMM_RAND_DEFAULTS, m=None)
    for part in parts[1:]:
        key = ''.join(c for c in part if c.isalpha())
        value = part[len(key):]
        if key not in out or not value:
            raise ConfigError(f"AUG.AUTO_AUGMENT '{spec}': DATA.LOADER dali does not support '{part}' "
                              f"(it reads m, n, mstd, mmax, p and inc)")
        out[key] = float(value)
    if out['m'] is None:
        raise ConfigError(f"AUG.AUTO_AUGMENT '{spec}' has no magnitude (for example rand-m9)")
    out['n'], out['inc'] = int(out['n']), int(out['inc'])
    return out


def _posterize_mask(magnitude) -> np.ndarray:
    """timm's PosterizeIncreasing keeps 4 - int(4 * level) bits: with DALI's magnitude
    4 - 4 * level that is ceil(magnitude); 0 bits gives black, as our torch pipeline does."""
    bits = int(np.clip(np.ceil(float(magnitude) - 1e-6), 0, 8))
    return np.array((0xFF << (8 - bits)) & 0xFF, dtype=np.uint8)


def _rand_suite(increasing: bool):
    """timm's RandAugment op list in DALI's augmentations (timm's 15 ops; DALI's own suites
    lack invert and solarize_add and add identity)."""
    from nvidia.dali import fn
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import augmentation
    from nvidia.dali.auto_aug.rand_augment import get_rand_augment_non_monotonic_suite

    # DALI 2.4's own equalize and sharpness call deprecated fn.experimental aliases, whose
    # warning DALI forces past any filter: the same ops through the current names
    @augmentation
    def equalize(data, _):
        return fn.equalize(data)

    @augmentation(mag_range=(0, 0.9), randomly_negate=True, mag_to_param=a.sharpness_kernel, param_device='auto')
    def sharpness(data, kernel):
        return fn.filter(data, kernel)

    if not increasing:  # timm's non-increasing ('rand-m9') list: DALI's AutoAugment-range suite
        renamed = {'equalize': equalize,
                   'sharpness': sharpness.augmentation((0.1, 1.9), False, a.sharpness_kernel_shifted)}
        suite = [renamed.get(op.name, op) for op in
                 get_rand_augment_non_monotonic_suite(use_shape=True, max_translate_rel=0.45)
                 if op.name != 'identity']
        return suite + [a.invert, a.solarize_add.augmentation((0, 110))]
    return [
        a.auto_contrast, equalize, a.invert,
        a.rotate.augmentation((0, 30), True),
        a.posterize.augmentation((4, 0), False, _posterize_mask),
        a.solarize.augmentation((256, 0)),
        a.solarize_add.augmentation((0, 110)),
        a.color.augmentation((0, 0.9), True, a.shift_enhance_range),
        a.contrast.augmentation((0, 0.9), True, a.shift_enhance_range),
        a.brightness.augmentation((0, 0.9), True, a.shift_enhance_range),
        sharpness,
        a.shear_x.augmentation((0, 0.3), True),
        a.shear_y.augmentation((0, 0.3), True),
        a.translate_x.augmentation((0, 0.45), True),
        a.translate_y.augmentation((0, 0.45), True),
    ]


def _interp(types, name: str):
    return {'bicubic': types.INTERP_CUBIC, 'bilinear': types.INTERP_LINEAR, 'nearest': types.INTERP_NN,
            'lanczos': types.INTERP_LANCZOS3}[name]


class _Feed:
    """The external source's callback: the next batch of encoded bytes and labels (and, for
    validation, each image's resize and crop, computed from its header exactly as
    EvalTransform does). Raises StopIteration after the last batch."""

    def __init__(self, source: Source, batches: list[list[int]], eval_transform: EvalTransform | None):
        self.source, self.batches, self.eval_transform = source, iter(batches), eval_transform

    def __call__(self):
        indices = next(self.batches)
        encoded, labels, sizes, anchors = [], [], [], []
        for i in indices:
            data = self.source.read(i)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise DataError(f'DATA.LOADER dali needs encoded images; {self.source.describe(i)} is decoded')
            encoded.append(np.frombuffer(data, dtype=np.uint8))
            labels.append(np.array(self.source.label(i), dtype=np.int64))
            if self.eval_transform is not None:
                size, anchor = self._geometry(data)
                sizes.append(size)
                anchors.append(anchor)
        if self.eval_transform is None:
            return encoded, labels
        return encoded, labels, sizes, anchors

    def _geometry(self, data) -> tuple[np.ndarray, np.ndarray]:
        width, height = image_size(data)
        out_h, out_w, top, left = self.eval_transform.geometry(height, width)
        return np.array([out_h, out_w], dtype=np.float32), np.array([top, left], dtype=np.int32)


def _train_graph(config, fn, types, jpegs, decoder_device: str):
    size = config.DATA.IMG_SIZE
    images = fn.decoders.image_random_crop(
        jpegs, device=decoder_device, output_type=types.RGB, adjust_orientation=False,
        random_area=list(RRC_SCALE), random_aspect_ratio=list(RRC_RATIO), num_attempts=10)
    if config.DATA.INTERPOLATION == 'random':  # timm: bilinear or bicubic, drawn per image
        drawn = fn.random.uniform(values=[int(types.INTERP_LINEAR), int(types.INTERP_CUBIC)], dtype=types.INT32)
        interp = fn.cast(drawn, dtype=types.DALIDataType.INTERP_TYPE)
    else:
        interp = _interp(types, config.DATA.INTERPOLATION)
    images = fn.resize(images, size=[size, size], interp_type=interp, antialias=True)
    aug = config.AUG
    if aug.HFLIP > 0 or aug.VFLIP > 0:
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=aug.HFLIP),
                         vertical=fn.random.coin_flip(probability=aug.VFLIP))
    if aug.AUTO_AUGMENT != 'none':
        images = _rand_augment(images, parse_rand_augment(aug.AUTO_AUGMENT), fn, types)
    elif aug.COLOR_JITTER > 0:  # timm: brightness, contrast and saturation, hue 0
        cj = aug.COLOR_JITTER
        def factor():
            return fn.random.uniform(range=[max(0.0, 1 - cj), 1 + cj])
        images = fn.color_twist(images, brightness=factor(), contrast=factor(), saturation=factor())
    return images


def _rand_augment(images, params: dict, fn, types):
    from nvidia.dali.auto_aug.rand_augment import apply_rand_augment
    suite = _rand_suite(bool(params['inc']))
    bins = int(round(params['mmax'])) + 1  # magnitude bins 0..mmax: bin m is timm's level m / mmax
    m = int(round(min(max(params['m'], 0), params['mmax'])))
    kwargs = dict(n=1, m=m, num_magnitude_bins=bins, shape=images.shape()[:2], fill_value=FILL_GREY,
                  interp_type=types.INTERP_LINEAR)  # DALI's warps do nearest or linear only
    for _ in range(params['n']):  # timm: each of the n ops is applied with probability p
        if params['p'] >= 1:
            images = apply_rand_augment(suite, images, **kwargs)
        elif fn.random.coin_flip(probability=params['p'], dtype=types.BOOL):
            images = apply_rand_augment(suite, images, **kwargs)
    return images


def _val_graph(config, fn, types, jpegs, sizes, anchors, decoder_device: str):
    size = config.DATA.IMG_SIZE
    name = config.DATA.INTERPOLATION  # the official test interpolation, as EvalTransform
    interp = _interp(types, name if name in ('bicubic', 'lanczos') else 'bilinear')
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB, adjust_orientation=False)
    images = fn.resize(images, size=sizes, interp_type=interp, antialias=True)
    return fn.slice(images, start=anchors, shape=[size, size], axes=[0, 1])


class DaliLoader:
    """What the engine uses of a torch DataLoader: len() (batches per epoch), iteration over
    (uint8 images (B, 3, S, S), int64 labels), and `sampler.set_epoch(epoch, start)`.

    Each pass builds a fresh pipeline seeded by (SEED, epoch, rank): an epoch's
    augmentations do not depend on what ran before it, and a pass abandoned halfway leaves
    no queued batches behind.
    """

    def __init__(self, config, dataset, sampler, is_train: bool, rank: int):
        self.dali = import_dali()
        self.config, self.dataset, self.sampler = config, dataset, sampler
        self.source: Source = dataset.source if hasattr(dataset, 'source') else dataset
        self.is_train, self.rank = is_train, rank
        self.batch_size = config.DATA.BATCH_SIZE
        self.drop_last = is_train
        self.on_gpu = torch.cuda.is_available()
        self.eval_transform = None if is_train else EvalTransform(config)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _batches(self) -> tuple[list[list[int]], int]:
        indices = list(iter(self.sampler))  # after set_epoch: that epoch from its start
        epoch = getattr(self.sampler, 'epoch', 0)
        b = self.batch_size
        stop = len(indices) - len(indices) % b if self.drop_last else len(indices)
        return [indices[i:i + b] for i in range(0, stop, b)], epoch

    def _pipeline(self, feed: _Feed, epoch: int):
        fn, types = self.dali.fn, self.dali.types
        config, is_train = self.config, self.is_train
        decoder_device = 'mixed' if self.on_gpu else 'cpu'
        seed = ((config.SEED * 1_000_003 + epoch) * 1009 + self.rank * 2 + int(is_train)) % (2 ** 31 - 1)

        @self.dali.pipeline_def(enable_conditionals=is_train)
        def graph():
            if is_train:
                jpegs, labels = fn.external_source(source=feed, num_outputs=2, batch=True)
                images = _train_graph(config, fn, types, jpegs, decoder_device)
            else:
                jpegs, labels, sizes, anchors = fn.external_source(source=feed, num_outputs=4, batch=True)
                images = _val_graph(config, fn, types, jpegs, sizes, anchors, decoder_device)
            return fn.transpose(images, perm=[2, 0, 1]), labels

        pipe = graph(batch_size=self.batch_size, num_threads=max(1, config.DATA.NUM_WORKERS),
                     device_id=torch.cuda.current_device() if self.on_gpu else None, seed=seed,
                     prefetch_queue_depth=2)
        pipe.build()
        return pipe

    def _to_torch(self, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
        targets = torch.from_numpy(labels.as_array().reshape(-1).astype(np.int64))
        if not self.on_gpu:
            return torch.from_numpy(images.as_array()), targets
        from nvidia.dali.plugin.pytorch import feed_ndarray
        dense = images.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=torch.device('cuda', torch.cuda.current_device()))
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream())
        return out, targets

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches, epoch = self._batches()
        if not batches:
            return
        pipe = self._pipeline(_Feed(self.source, batches, self.eval_transform), epoch)
        try:
            for indices in batches:
                try:
                    images, labels = pipe.run()
                except RuntimeError as e:
                    raise DataError(f'DALI could not process a batch starting at '
                                    f'{self.source.describe(indices[0])}: {str(e).strip().splitlines()[0]}') from e
                yield self._to_torch(images, labels)
        finally:
            del pipe


def describe() -> str:
    """The log line's name of this loader (DataError when DALI is not importable)."""
    device = f'GPU (mixed decoding, cuda:{torch.cuda.current_device()})' if torch.cuda.is_available() else 'CPU'
    return f'NVIDIA DALI {import_dali().__version__} on the {device}'

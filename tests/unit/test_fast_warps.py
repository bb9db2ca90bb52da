"""RandAugment's shears and translations through data/fast_warps.py: the same pixels as
timm's PIL ops, bit for bit, on real photographs (scikit-learn's two) and edge cases, for
both resamplings, with the same random draws, and whole RandAugment outputs unchanged."""
import random

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.data import auto_augment, rand_augment_transform

from data import fast_warps
from data.transforms import allow_zero_bit_posterize, replace_ops
from helpers.images import photo

FILL = (124, 116, 104)  # timm's ImageNet mean fill
OPS = [(auto_augment.shear_x, fast_warps.shear_x, 0.3), (auto_augment.shear_y, fast_warps.shear_y, 0.3),
       (auto_augment.translate_x_rel, fast_warps.translate_x_rel, 0.45),
       (auto_augment.translate_y_rel, fast_warps.translate_y_rel, 0.45),
       (auto_augment.translate_x_abs, fast_warps.translate_x_abs, 100.0),
       (auto_augment.translate_y_abs, fast_warps.translate_y_abs, 100.0)]


def _images():
    for name in ('china.jpg', 'flower.jpg'):
        full = Image.fromarray(load_sample_image(name))
        yield full.resize((224, 224), Image.BICUBIC)
        yield full.crop((100, 50, 297, 201))  # odd sizes, straight from the photograph
    yield photo(31, 17, seed=3)


def test_kernel_is_compiled():
    assert fast_warps.numba is not None  # otherwise the ops silently stay PIL's


@pytest.mark.parametrize('theirs,ours,limit', OPS, ids=[o[0].__name__ for o in OPS])
@pytest.mark.parametrize('resample', [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC])
def test_each_op_gives_pils_pixels_exactly(theirs, ours, limit, resample):
    rng = np.random.default_rng(0)
    magnitudes = list(rng.uniform(-limit, limit, 12)) + [0.0, limit, -limit, 0.5 * limit, 1e-9]
    for img in _images():
        for magnitude in magnitudes:
            expected = theirs(img, magnitude, resample=resample, fillcolor=FILL)
            got = ours(img, magnitude, resample=resample, fillcolor=FILL)
            assert got.mode == expected.mode and got.size == expected.size
            diff = np.asarray(got, dtype=int) - np.asarray(expected, dtype=int)
            assert not diff.any(), (img.size, magnitude, int(np.abs(diff).max()), int((diff != 0).sum()))


def test_the_resample_draw_and_the_fallbacks_are_timms():
    img = photo(64, 48, seed=1)
    for seed in range(20):  # a list of resamplings: one random.choice, as timm draws it
        random.seed(seed)
        expected = auto_augment.shear_x(img, 0.2, resample=[Image.BILINEAR, Image.BICUBIC], fillcolor=FILL)
        after = random.random()
        random.seed(seed)
        got = fast_warps.shear_x(img, 0.2, resample=[Image.BILINEAR, Image.BICUBIC], fillcolor=FILL)
        assert random.random() == after and np.array_equal(np.asarray(got), np.asarray(expected))
    gray = img.convert('L')  # other modes and resamplings go to PIL
    for image, resample in ((gray, Image.BICUBIC), (img, Image.NEAREST)):
        assert np.array_equal(np.asarray(fast_warps.translate_y_rel(image, 0.3, resample=resample, fillcolor=0)),
                              np.asarray(auto_augment.translate_y_rel(image, 0.3, resample=resample, fillcolor=0)))


@pytest.mark.parametrize('interpolation', ['bicubic', 'random'])
def test_rand_augment_outputs_are_unchanged(interpolation):
    hparams = {'translate_const': 100, 'img_mean': FILL}
    if interpolation != 'random':
        hparams['interpolation'] = Image.BICUBIC
    timm_ra = rand_augment_transform('rand-m9-mstd0.5-inc1', hparams)
    ours = rand_augment_transform('rand-m9-mstd0.5-inc1', hparams)
    for transform in (timm_ra, ours):
        allow_zero_bit_posterize(transform)  # Pillow 13 refuses timm's 0-bit posterize
    replace_ops(ours, fast_warps.REPLACEMENTS)
    assert {op.aug_fn for op in ours.ops} >= {fast_warps.shear_x, fast_warps.translate_y_rel}
    images = list(_images())
    for seed in range(200):
        img = images[seed % len(images)]
        outputs = []
        for transform in (timm_ra, ours):
            random.seed(seed)
            np.random.seed(seed)
            outputs.append(np.asarray(transform(img)))
        assert np.array_equal(*outputs), seed


def test_without_numba_the_ops_stay_timms(monkeypatch):
    import importlib
    import sys
    monkeypatch.setitem(sys.modules, 'numba', None)  # `import numba` raises ImportError
    try:
        reloaded = importlib.reload(fast_warps)
        assert reloaded.numba is None and reloaded.REPLACEMENTS == {}
    finally:
        monkeypatch.undo()
        importlib.reload(fast_warps)
    assert fast_warps.REPLACEMENTS

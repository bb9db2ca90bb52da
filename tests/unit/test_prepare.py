"""The digits demo dataset: layout, split, pixels, determinism, atomic writing,
checked on the real written tree (about 0.4 s per write)."""
import logging
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from data import prepare
from data.prepare import DIGITS_CLASSES, digits_val_mask, prepare_dataset
from data.sources import FolderSource

N_DIGITS = 1797


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _files(root):
    """{'split/class/name': bytes} of every file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _split_index(root, split):
    """{sample index: class folder} of one split."""
    return {int(name[:-4]): cls for cls in os.listdir(os.path.join(root, split))
            for name in os.listdir(os.path.join(root, split, cls))}


@pytest.fixture(scope='module')
def digits():
    return load_digits()


@pytest.fixture(scope='module')
def written(tmp_path_factory):
    """One tree written under parents that do not exist yet, and what the call logged."""
    root = str(tmp_path_factory.mktemp('prep') / 'new' / 'parent' / 'digits')
    logger = logging.getLogger('test_prepare')
    logger.setLevel(logging.INFO)
    handler = _Records()
    logger.addHandler(handler)
    try:
        assert prepare_dataset('digits', root, logger) is True
    finally:
        logger.removeHandler(handler)
    return root, handler.messages


def test_layout_and_labels(written, digits):
    root, messages = written
    assert sorted(os.listdir(os.path.dirname(root))) == ['digits']  # no .tmp-* sibling left
    assert sorted(os.listdir(root)) == ['train', 'val']
    for split in ('train', 'val'):
        assert sorted(os.listdir(os.path.join(root, split))) == list(DIGITS_CLASSES)
    files = _files(root)
    assert len(files) == N_DIGITS
    assert all(len(os.path.basename(p)) == len('0000.jpg') and p.endswith('.jpg') for p in files)
    train, val = _split_index(root, 'train'), _split_index(root, 'val')
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(range(N_DIGITS))
    for index, cls in {**train, **val}.items():
        assert cls == str(digits.target[index])
    assert messages == [f'prepared digits: {len(train)} train / {len(val)} val images in {root}']


def test_split_is_stratified_and_fixed(written, digits):
    root, _ = written
    val = _split_index(root, 'val')
    assert (len(val), N_DIGITS - len(val)) == (359, 1438)
    for label in range(10):
        in_class = int((digits.target == label).sum())
        in_val = sum(cls == str(label) for cls in val.values())
        assert abs(in_val / in_class - 0.2) <= 0.01
    mask = digits_val_mask(digits.target)
    assert set(np.flatnonzero(mask)) == set(val)
    np.testing.assert_array_equal(digits_val_mask(digits.target), mask)


def test_images_match_their_scans(written, digits):
    root, _ = written
    own, other = [], []
    for split in ('train', 'val'):
        for index, cls in _split_index(root, split).items():
            with Image.open(os.path.join(root, split, cls, f'{index:04d}.jpg')) as im:
                assert (im.format, im.mode, im.size) == ('JPEG', 'RGB', (32, 32))
                pixels = np.asarray(im, dtype=np.float64)
            assert np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max() <= 2  # gray
            source = digits.images[index] * 255 / 16
            assert abs(pixels.mean() - source.mean()) < 4  # same brightness
            blocks = pixels.mean(axis=2).reshape(8, 4, 8, 4).mean(axis=(1, 3)).ravel()
            own.append(np.corrcoef(blocks, source.ravel())[0, 1])
            other.append(np.corrcoef(blocks, digits.images[(index + 1) % N_DIGITS].ravel())[0, 1])
    assert min(own) > 0.95  # each 4x4 block follows the source pixel it was upscaled from
    assert np.mean(other) < 0.7  # while another digit's scan does not


def test_second_write_is_byte_identical(written, tmp_path):
    root, _ = written
    again = str(tmp_path / 'digits')
    assert prepare_dataset('digits', again) is True
    assert _files(again) == _files(root)


def test_existing_root_is_left_alone(tmp_path):
    root = tmp_path / 'digits'
    (root / 'mine').mkdir(parents=True)
    (root / 'mine' / 'keep.txt').write_text('user data')
    assert prepare_dataset('digits', str(root)) is False
    assert _files(root) == {os.path.join('mine', 'keep.txt'): b'user data'}
    assert os.listdir(tmp_path) == ['digits']
    (tmp_path / 'file').write_text('x')
    assert prepare_dataset('digits', str(tmp_path / 'file')) is False
    assert (tmp_path / 'file').read_text() == 'x'


def test_losing_the_race_keeps_the_winners_copy(tmp_path, monkeypatch):
    root = tmp_path / 'digits'
    real_rename = os.rename

    def other_process_first(src, dst):
        os.makedirs(os.path.join(dst, 'train'))  # the winner's complete tree, in short
        real_rename(src, dst)

    monkeypatch.setattr(prepare.os, 'rename', other_process_first)
    assert prepare_dataset('digits', str(root)) is False
    assert os.listdir(tmp_path) == ['digits']  # temp folder removed
    assert os.listdir(root) == ['train'] and not os.listdir(root / 'train')


def test_failed_write_leaves_no_root(tmp_path, monkeypatch):
    real_save = Image.Image.save
    saved = []

    def disk_full_after_100(self, *args, **kwargs):
        if len(saved) == 100:
            raise OSError(28, 'No space left on device')
        saved.append(1)
        real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, 'save', disk_full_after_100)
    with pytest.raises(OSError, match='No space'):
        prepare_dataset('digits', str(tmp_path / 'digits'))
    assert os.listdir(tmp_path) == []


def test_unknown_dataset_raises_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset to prepare 'mnist'"):
        prepare_dataset('mnist', str(tmp_path / 'new' / 'mnist'))
    assert os.listdir(tmp_path) == []


def test_folder_source_reads_train_split(written, digits):
    root, _ = written
    source = FolderSource(os.path.join(root, 'train'))
    assert source.classes == list(DIGITS_CLASSES)
    assert len(source) == 1438
    for i in range(0, len(source), 97):
        path, label = source.samples[i]
        assert label == digits.target[int(os.path.basename(path)[:4])]



"""DATA.DATASET hf: DatasetDicts saved with save_to_disk and the Hub's parquet layout, built
with the datasets library from the three-colour JPEG folder; samples, classes, sharding,
pickling into loader workers and the one-line errors."""
import json
import os
import pickle
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from torch.utils.data import DataLoader

from data import DataError, build_loader
from data.build import build_dataset
from data.decode import DecodeError, decode_rgb
from data.hf_source import HFSource
from data.samplers import ShardSampler
from data.sources import FolderSource
from helpers.configs import data_config
from helpers.runs import N_VAL

CLASSES = ['class0', 'class1', 'class2']


def _split(folder, *, embed=True, class_label=True, labels=None) -> Dataset:
    """A split of the folder: JPEG bytes with their relative path (as imagenet-1k stores
    them), or only the absolute path (`embed=False`)."""
    src = FolderSource(folder)
    if embed:
        images = [{'bytes': open(p, 'rb').read(), 'path': os.path.relpath(p, folder)} for p, _ in src.samples]
    else:
        images = [{'bytes': None, 'path': p} for p, _ in src.samples]
    label = ClassLabel(names=CLASSES) if class_label else Value('int64')
    labels = [lab for _, lab in src.samples] if labels is None else labels
    return Dataset.from_dict({'image': images, 'label': labels},
                             features=Features({'image': Image(), 'label': label}))


def _save(dd, path) -> str:
    dd.save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope='module')
def saved(data_root, tmp_path_factory):
    dd = DatasetDict(train=_split(os.path.join(data_root, 'train')),
                     validation=_split(os.path.join(data_root, 'val')))
    return _save(dd, tmp_path_factory.mktemp('hf') / 'saved')


@pytest.fixture(scope='module')
def parquet(data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp('hf') / 'parquet'
    for split, folder in (('train', 'train'), ('validation', 'val')):
        _split(os.path.join(data_root, folder)).to_parquet(str(root / 'data' / f'{split}-00000-of-00001.parquet'))
    return str(root)


@pytest.fixture(autouse=True)
def _arrow_cache(tmp_path_factory, monkeypatch):
    """Parquet conversions go to a temporary cache, never the user's."""
    import datasets
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', str(tmp_path_factory.getbasetemp() / 'hf_cache'))


def _pixels(source, indices=None) -> list:
    indices = range(len(source)) if indices is None else indices
    return sorted((source.label(i), decode_rgb(source.read(i)).tobytes()) for i in indices)


def _config(root, **overrides):
    return data_config(root, **{'DATA.DATASET': 'hf', 'DATA.IMG_SIZE': 32, **overrides})


# --- samples and classes -----------------------------------------------------------------

@pytest.mark.parametrize('layout', ['saved', 'parquet'])
def test_samples_equal_the_source_folder(layout, data_root, request):
    root = request.getfixturevalue(layout)
    for split, folder in (('train', 'train'), ('val', 'val')):
        source = HFSource(root, split)
        expected = FolderSource(os.path.join(data_root, folder))
        assert len(source) == len(expected)
        assert _pixels(source) == _pixels(expected)
        assert source.classes == CLASSES and source.num_classes == 3
        assert source.samples.labels.dtype == np.int64


def test_parquet_is_converted_into_the_arrow_cache_not_the_data_folder(parquet, tmp_path_factory):
    source = HFSource(parquet, 'val')
    cache = str(tmp_path_factory.getbasetemp() / 'hf_cache')
    assert source._files and all(f.startswith(cache) and f.endswith('.arrow') for f in source._files)
    assert sorted(os.listdir(os.path.join(parquet, 'data'))) == \
        ['train-00000-of-00001.parquet', 'validation-00000-of-00001.parquet']
    assert 'validation-00000-of-00001.parquet row 0' in source.describe(0)


def test_parquet_files_directly_in_the_folder(parquet, tmp_path):
    for name in os.listdir(os.path.join(parquet, 'data')):
        shutil.copy(os.path.join(parquet, 'data', name), tmp_path / name)
    assert _pixels(HFSource(str(tmp_path), 'train')) == _pixels(HFSource(parquet, 'train'))


def test_val_split_name(data_root, tmp_path):
    root = _save(DatasetDict(train=_split(os.path.join(data_root, 'train')),
                             val=_split(os.path.join(data_root, 'val'))), tmp_path / 'd')
    source = HFSource(root, 'val')
    assert _pixels(source) == _pixels(FolderSource(os.path.join(data_root, 'val')))
    assert source.describe(0).startswith(os.path.join(root, 'val') + '[0]')


def _path_parquet(folder, root, split='validation') -> str:
    """Parquet of images stored only as paths (save_to_disk and to_parquet embed the bytes)."""
    src = FolderSource(folder)
    image = pa.struct([('bytes', pa.binary()), ('path', pa.string())])
    table = pa.table({'image': pa.array([{'bytes': None, 'path': p} for p, _ in src.samples], image),
                      'label': pa.array(src.samples.labels)})
    os.makedirs(os.path.join(root, 'data'), exist_ok=True)
    pq.write_table(table, os.path.join(root, 'data', f'{split}-00000-of-00001.parquet'))
    return str(root)


def test_images_stored_as_paths(data_root, tmp_path):
    folder = os.path.join(data_root, 'val')
    source = HFSource(_path_parquet(folder, tmp_path), 'val')
    assert _pixels(source) == _pixels(FolderSource(folder))
    assert source.classes is None and source.num_classes == 3
    assert folder in source.describe(0)


def test_int_labels_without_class_label_count_max_plus_one(data_root, tmp_path):
    folder = os.path.join(data_root, 'val')
    n = len(FolderSource(folder))
    labels = [0] * (n - 1) + [4]
    root = _save(DatasetDict(train=_split(folder, class_label=False),
                             validation=_split(folder, class_label=False, labels=labels)), tmp_path / 'd')
    val = HFSource(root, 'val')
    assert val.classes is None and val.num_classes == 5 and val.label(n - 1) == 4
    assert HFSource(root, 'train').num_classes == 3
    config = _config(root, **{'MODEL.NUM_CLASSES': 1000})  # the run's count: over the splits, not the YAML's
    build_loader(config, rank=0, world_size=1)
    assert config.MODEL.NUM_CLASSES == 5


@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_validation_shards_count_every_image_once(saved, world_size):
    source = HFSource(saved, 'val')
    assert len(source) == 3 * N_VAL
    seen = [i for rank in range(world_size) for i in ShardSampler(len(source), rank, world_size)]
    assert sorted(seen) == list(range(len(source)))


# --- processes ---------------------------------------------------------------------------

@pytest.mark.parametrize('layout', ['saved', 'parquet'])
def test_source_pickles_small_and_reads_the_same(layout, request):
    source = HFSource(request.getfixturevalue(layout), 'train')
    data = pickle.dumps(source)
    assert len(data) < 20_000  # file names and labels, not the images
    copy = pickle.loads(data)
    assert copy._chunks is None
    assert [copy.read(i) for i in range(len(copy))] == [source.read(i) for i in range(len(source))]
    assert copy.classes == source.classes and copy.describe(3) == source.describe(3)


@pytest.mark.parametrize('layout', ['saved', 'parquet'])
def test_loader_with_two_workers(layout, request):
    dataset = build_dataset(_config(request.getfixturevalue(layout)), False)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, sampler=ShardSampler(len(dataset), 0, 1))
    images, labels = zip(*loader)
    assert torch.cat(images).shape == (3 * N_VAL, 3, 32, 32)
    assert sorted(torch.cat(labels).tolist()) == sorted(dataset.targets)
    assert dataset.num_classes == 3 and dataset.classes == CLASSES and dataset.corrupt_count == 0


def test_missing_image_file_is_an_oserror_at_read_time(data_root, tmp_path):
    folder = tmp_path / 'imgs'
    shutil.copytree(os.path.join(data_root, 'val'), folder)
    source = HFSource(_path_parquet(str(folder), tmp_path / 'p'), 'val')
    os.remove(source._row(0)['path'])
    with pytest.raises(OSError):
        source.read(0)
    assert decode_rgb(source.read(1)).shape == (32, 32, 3)


def test_row_without_image_is_a_decode_error(tmp_path):
    features = Features({'image': Image(), 'label': Value('int64')})
    ds = Dataset.from_dict({'image': [None], 'label': [0]}, features=features)
    source = HFSource(_save(DatasetDict(train=ds, validation=ds), tmp_path / 'd'), 'val')
    with pytest.raises(DecodeError):
        source.read(0)


# --- bad input ---------------------------------------------------------------------------

def _error(root, split='val') -> str:
    with pytest.raises(DataError) as info:
        HFSource(str(root), split)
    message = str(info.value)
    assert '\n' not in message
    return message


def test_folder_that_is_no_dataset(tmp_path):
    (tmp_path / 'train').mkdir()
    message = _error(tmp_path)
    assert str(tmp_path) in message and 'save_to_disk' in message and 'parquet' in message


def test_missing_split(data_root, tmp_path, parquet):
    root = _save(DatasetDict(train=_split(os.path.join(data_root, 'val'))), tmp_path / 'd')
    assert root in _error(root) and 'validation' in _error(root)
    only_val = tmp_path / 'p' / 'data'
    only_val.mkdir(parents=True)
    shutil.copy(os.path.join(parquet, 'data', 'validation-00000-of-00001.parquet'), only_val)
    message = _error(tmp_path / 'p', 'train')
    assert str(tmp_path / 'p') in message and 'train' in message


def test_missing_column(data_root, tmp_path):
    ds = _split(os.path.join(data_root, 'val')).rename_column('image', 'img')
    root = _save(DatasetDict(train=ds, validation=ds), tmp_path / 'd')
    message = _error(root)
    assert os.path.join(root, 'validation') in message and "'image'" in message


def test_parquet_without_the_expected_columns_names_the_file(data_root, tmp_path):
    ds = _split(os.path.join(data_root, 'val')).rename_column('label', 'target')
    path = str(tmp_path / 'data' / 'validation-00000-of-00001.parquet')
    ds.to_parquet(path)
    message = _error(tmp_path)
    assert path in message and "'label'" in message


def test_unreadable_parquet_file_is_named(tmp_path):
    path = tmp_path / 'data' / 'validation-00000-of-00001.parquet'
    path.parent.mkdir()
    path.write_bytes(b'not parquet')
    assert str(path) in _error(tmp_path)


def test_negative_label(data_root, tmp_path):
    folder = os.path.join(data_root, 'val')
    labels = [-1] * len(FolderSource(folder))
    ds = _split(folder, class_label=False, labels=labels)
    root = _save(DatasetDict(train=ds, validation=ds), tmp_path / 'd')
    message = _error(root)
    assert os.path.join(root, 'validation') + '[0]' in message and 'negative' in message
    path = str(tmp_path / 'p' / 'data' / 'validation-00000-of-00001.parquet')
    ds.to_parquet(path)
    message = _error(tmp_path / 'p')
    assert f'{path} row 0' in message and 'negative' in message


def test_label_outside_the_class_label(data_root, tmp_path):
    ds = _split(os.path.join(data_root, 'val'), class_label=False)
    root = _save(DatasetDict(train=ds, validation=ds), tmp_path / 'd')
    info_path = os.path.join(root, 'validation', 'dataset_info.json')
    with open(info_path) as f:
        info = json.load(f)
    info['features']['label'] = {'names': ['a', 'b'], '_type': 'ClassLabel'}  # labels go up to 2
    with open(info_path, 'w') as f:
        json.dump(info, f)
    message = _error(root)
    assert os.path.join(root, 'validation') in message and 'ClassLabel of 2 classes' in message


def test_missing_library_says_pip_install(saved, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, 'datasets', None)
    assert 'pip install datasets' in _error(saved)


def test_parquet_shards_that_do_not_fit_together(tmp_path):
    image = pa.struct([('bytes', pa.binary()), ('path', pa.string())])
    (tmp_path / 'data').mkdir()
    pq.write_table(pa.table({'image': pa.array([{'bytes': b'x', 'path': None}], image), 'label': [0]}),
                   tmp_path / 'data' / 'validation-00000-of-00002.parquet')
    pq.write_table(pa.table({'image': pa.array([b'y']), 'label': [1]}),
                   tmp_path / 'data' / 'validation-00001-of-00002.parquet')
    assert str(tmp_path / 'data' / 'validation-*.parquet') in _error(tmp_path)

"""WebDataset shards (DATA.DATASET wds): tools/make_shards.py from a folder and a zip
layout, the shard index (ustar, pax and GNU long names), the same samples as the folder
through the whole pipeline, exact validation and equal epochs over ranks, loader workers,
and every bad input as one DataError line."""
import io
import logging
import os
import tarfile
import zipfile

import pytest
import torch
from torch.utils.data import DataLoader

from data import DataError, build_loader
from data.build import build_dataset
from data.samplers import ShardSampler, TrainSampler
from data.shards import ShardSource, shard_paths
from data.sources import FolderSource
from helpers.configs import data_config
from helpers.images import CLASSES, write_photo_folder
from tools.make_shards import main as make_shards_main


def _config(root, **overrides):
    return data_config(root, **{'DATA.DATASET': 'wds', **overrides})


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return write_photo_folder(str(tmp_path_factory.mktemp('imagenet')))


@pytest.fixture(scope='module')
def shard_root(data_root, tmp_path_factory):
    out = os.path.join(str(tmp_path_factory.mktemp('wds')), 'shards')
    assert make_shards_main([data_root, out, '--maxcount', '5']) == 0
    return out


def _source(root, split) -> ShardSource:
    return ShardSource(shard_paths(root, split), root)


def _write_tar(path, members, fmt=tarfile.PAX_FORMAT):
    with tarfile.open(path, 'w', format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _jpeg(data_root) -> bytes:
    source = FolderSource(os.path.join(data_root, 'val'))
    return source.read(0)


# --- the tool and the index ------------------------------------------------------------

@pytest.mark.parametrize('split', ['train', 'val'])
def test_shards_hold_the_folders_images_labels_and_order(data_root, shard_root, split):
    folder = FolderSource(os.path.join(data_root, split))
    shards = _source(shard_root, split)
    assert len(shards.paths) == -(-len(folder) // 5)  # --maxcount 5
    assert shards.classes == folder.classes == sorted(CLASSES) and shards.num_classes == len(CLASSES)
    assert [shards.label(i) for i in range(len(shards))] == [folder.label(i) for i in range(len(folder))]
    assert all(shards.read(i) == folder.read(i) for i in range(len(folder)))


def test_shards_from_a_zip_layout(data_root, tmp_path):
    folder = FolderSource(os.path.join(data_root, 'train'))
    with zipfile.ZipFile(tmp_path / 'train.zip', 'w') as zf, open(tmp_path / 'train_map.txt', 'w') as mf:
        for i, (path, label) in enumerate(folder.samples):
            zf.write(path, f'img{i}.jpg')
            mf.write(f'img{i}.jpg\t{label}\n')
    out = str(tmp_path / 'wds')
    assert make_shards_main([str(tmp_path), out, '--zip', '--splits', 'train']) == 0
    shards = _source(out, 'train')
    assert shards.classes is None and shards.num_classes == len(CLASSES)  # a map numbers classes only
    assert sorted((shards.label(i), shards.read(i)) for i in range(len(shards))) == \
        sorted((folder.label(i), folder.read(i)) for i in range(len(folder)))
    with tarfile.open(shards.paths[0]) as tf:
        assert tf.extractfile('00000000.fname').read() == b'img0.jpg'


@pytest.mark.parametrize('fmt', [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_index_reads_long_names_in_every_tar_format(data_root, tmp_path, fmt):
    jpeg = _jpeg(data_root)
    deep = 'd' * 60 + '/' + 'e' * 60  # a 121-character path: pax / GNU long name / ustar prefix
    long_key = f'{deep}/sample' if fmt == tarfile.USTAR_FORMAT else deep + '/' + 'k' * 120
    _write_tar(tmp_path / 'train-0.tar', [(f'{long_key}.jpg', jpeg), (f'{long_key}.cls', b'2'),
                                          ('short.cls', b'1'), ('short.png', b'x')], fmt)
    source = _source(str(tmp_path), 'train')
    assert list(source.samples) == [(long_key, 2), ('short', 1)]
    assert source.read(0) == jpeg and source.read(1) == b'x'


# --- through the pipeline ---------------------------------------------------------------

@pytest.mark.parametrize('is_train', [True, False])
def test_shards_give_the_folders_augmented_samples(data_root, shard_root, is_train):
    """Same order and per-sample seeds: the transformed images equal the folder's."""
    folder = build_dataset(_config(data_root, **{'DATA.DATASET': 'imagenet'}), is_train)
    shards = build_dataset(_config(shard_root), is_train)
    assert len(shards) == len(folder)
    for index in (0, 3, len(folder) - 1):
        (image, label), (other, other_label) = folder[index], shards[index]
        assert label == other_label and torch.equal(image, other)


@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_validation_counts_each_image_once_and_epochs_are_equal(shard_root, world_size):
    config = _config(shard_root)
    seen = []
    lengths = set()
    for rank in range(world_size):
        _, val, train_loader, loader_val, _ = build_loader(config.clone(), rank=rank, world_size=world_size,
                                                           logger=logging.getLogger('wds'))
        assert isinstance(loader_val.sampler, ShardSampler) and isinstance(train_loader.sampler, TrainSampler)
        seen += list(loader_val.sampler)
        lengths.add(len(train_loader))
    assert sorted(seen) == list(range(len(val)))
    assert len(lengths) == 1


def test_loader_workers_read_the_shards(shard_root):
    dataset = build_dataset(_config(shard_root), False)
    loader = DataLoader(dataset, batch_size=4, num_workers=2)
    labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == [dataset.source.label(i) for i in range(len(dataset))]


def test_a_corrupt_image_in_a_shard_is_counted_and_replaced(data_root, tmp_path, caplog):
    jpeg = _jpeg(data_root)
    members = []
    for i in range(8):
        members += [(f'{i:03d}.jpg', jpeg if i != 3 else b'\xff\xd8\xff not a jpeg'), (f'{i:03d}.cls', b'0')]
    _write_tar(tmp_path / 'val-0.tar', members)
    config = _config(str(tmp_path), **{'EVAL_MODE': True, 'DATA.MAX_CORRUPT_FRACTION': 0.2})
    _, val, _, loader_val, _ = build_loader(config, rank=0, world_size=1, logger=logging.getLogger('wds-corrupt'))
    with caplog.at_level(logging.WARNING, logger='wds-corrupt'):
        assert sum(len(x) for x, _ in loader_val) == 8
    assert val.corrupt_count == 1
    assert f"{tmp_path / 'val-0.tar'}:003" in ' '.join(r.getMessage() for r in caplog.records)


# --- bad input ----------------------------------------------------------------------------

def _bad(tmp_path, members, name='train-0.tar'):
    _write_tar(tmp_path / name, members)
    with pytest.raises(DataError) as info:
        _source(str(tmp_path), 'train')
    assert '\n' not in str(info.value)
    return str(info.value)


def test_no_shards_names_the_pattern(tmp_path):
    with pytest.raises(DataError, match=r'train-\*\.tar'):
        _source(str(tmp_path), 'train')


def test_sample_without_image_or_label(tmp_path):
    assert "'a' has no image" in _bad(tmp_path, [('a.cls', b'1'), ('a.txt', b'caption')])
    assert "'b' has no class index" in _bad(tmp_path, [('b.jpg', b'\xff\xd8\xff')])


def test_label_not_an_index_or_outside_the_classes(tmp_path):
    assert 'not a class index' in _bad(tmp_path, [('a.jpg', b'x'), ('a.cls', b'dog')])
    assert 'negative class index' in _bad(tmp_path, [('a.jpg', b'x'), ('a.cls', b'-1')])
    (tmp_path / 'classes.txt').write_text('cat\ndog\n')
    message = _bad(tmp_path, [('a.jpg', b'x'), ('a.cls', b'1'), ('b.jpg', b'x'), ('b.cls', b'2')])
    assert 'train-0.tar:b' in message and 'outside the 2 classes' in message


def test_truncated_unreadable_and_compressed_shards(data_root, tmp_path):
    _write_tar(tmp_path / 'train-0.tar', [('a.jpg', _jpeg(data_root)), ('a.cls', b'0')])
    whole = (tmp_path / 'train-0.tar').read_bytes()
    for cut in (700, 1100):  # inside the image's data / inside the next header
        (tmp_path / 'train-0.tar').write_bytes(whole[:cut])
        with pytest.raises(DataError, match='train-0.tar.* truncated'):
            _source(str(tmp_path), 'train')
    (tmp_path / 'train-0.tar').write_bytes(b'not a tar file at all' * 40)
    with pytest.raises(DataError, match='not a readable tar file'):
        _source(str(tmp_path), 'train')
    with tarfile.open(tmp_path / 'train-0.tar', 'w:gz') as tf:
        tf.add(os.path.join(data_root, 'val'), arcname='x')
    with pytest.raises(DataError, match='uncompressed'):
        _source(str(tmp_path), 'train')
    (tmp_path / 'train-0.tar').write_bytes(b'')
    with pytest.raises(DataError, match='empty'):
        _source(str(tmp_path), 'train')


def test_make_shards_bad_input_is_one_line_exit_2(data_root, tmp_path, capsys):
    assert make_shards_main([str(tmp_path / 'missing'), str(tmp_path / 'out')]) == 2
    assert "'" + str(tmp_path / 'missing' / 'train') + "'" in capsys.readouterr().err
    os.makedirs(tmp_path / 'exists')
    assert make_shards_main([data_root, str(tmp_path / 'exists')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'exists' in err[0]
    assert not [p for p in os.listdir(tmp_path) if '.tmp-' in p]  # nothing half-written left


# --- shards by pattern and URL -----------------------------------------------------------

def test_brace_patterns_and_pipe_urls_give_the_same_samples(shard_root, tmp_path):
    """DATA.WDS_TRAIN / WDS_VAL as local brace patterns and as `pipe:` URLs (copied once
    into DATA.WDS_CACHE, then reused); no DATA_PATH needed."""
    local = _source(shard_root, 'train')
    last = len(local.paths) - 1
    pattern = os.path.join(shard_root, f'train-{{000000..{last:06d}}}.tar')
    cache = tmp_path / 'cache'
    for spec in (pattern, f'pipe:cat {pattern}'):
        config = _config('', **{'DATA.WDS_TRAIN': spec, 'DATA.WDS_CACHE': str(cache)})
        dataset = build_dataset(config, True)
        assert [dataset.source.read(i) for i in range(len(local))] == [local.read(i) for i in range(len(local))]
        assert list(dataset.source.samples) == list(local.samples)
    copies = sorted(os.listdir(cache))
    assert len(copies) == len(local.paths) and not [c for c in copies if '.tmp-' in c]
    stamps = [os.stat(cache / c).st_mtime_ns for c in copies]
    build_dataset(_config('', **{'DATA.WDS_TRAIN': f'pipe:cat {pattern}', 'DATA.WDS_CACHE': str(cache)}), True)
    assert [os.stat(cache / c).st_mtime_ns for c in copies] == stamps  # fetched once


def test_bad_patterns_and_urls_are_one_line(shard_root, tmp_path):
    cases = [(os.path.join(shard_root, 'train-{000000..000999}.tar'), 'does not exist'),
             ('pipe:exit 3', "cannot fetch shard 'pipe:exit 3'")]
    for spec, words in cases:
        config = _config('', **{'DATA.WDS_TRAIN': spec, 'DATA.WDS_CACHE': str(tmp_path / 'cache')})
        with pytest.raises(DataError, match=words) as info:
            build_dataset(config, True)
        assert '\n' not in str(info.value)
    assert not [c for c in os.listdir(tmp_path / 'cache') if c]  # nothing torn left behind


def test_class_count_without_classes_file_is_the_largest_label_plus_one(shard_root, tmp_path, caplog):
    for name in os.listdir(shard_root):
        if name.endswith('.tar'):
            os.symlink(os.path.join(shard_root, name), tmp_path / name)  # the shards, without classes.txt
    config = _config(str(tmp_path), **{'MODEL.NUM_CLASSES': 1000})
    with caplog.at_level(logging.INFO, logger='wds-classes'):
        build_loader(config, rank=0, world_size=1, logger=logging.getLogger('wds-classes'))
    assert config.MODEL.NUM_CLASSES == len(CLASSES)
    assert any('NUM_CLASSES set to 3' in r.getMessage() for r in caplog.records)

"""Indexes at scale, scaled down (benchmarks/bench_index.py is the full-size measurement): a
zip of 50,000 members read by forked loader workers must not cost each worker memory that
grows with the index (zipfile.ZipFile in each worker built a Python object per member:
~37 MB per worker here, hundreds of MB at ImageNet's 1.28M), and the NumPy map reader must
give exactly what the line-by-line one gives."""
import io
import os
import zipfile

import numpy as np
import psutil
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from data import DataError, DecodeError
from data.sources import ListSource, SampleTable, ZipSource, _read_map, _read_map_lines

ENTRIES = 50_000
CLASSES = 1000
WORKERS = 2
GROWTH_BOUND_MB = 12  # measured: ~1-2 MB per worker now; ~37 MB with a ZipFile per worker


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new('RGB', (8, 8), (120, 30, 200)).save(out, 'JPEG', quality=75)
    return out.getvalue()


def _member(i: int) -> str:
    return f'n{i % CLASSES:08d}/n{i % CLASSES:08d}_{i}.JPEG'


@pytest.fixture(scope='module')
def big_zip(tmp_path_factory):
    root = tmp_path_factory.mktemp('zip50k')
    jpeg = _jpeg()
    with zipfile.ZipFile(root / 'train.zip', 'w') as zf:
        for i in range(ENTRIES):
            zf.writestr(_member(i), jpeg)
    # listed in another order than the zip's, as a map may be
    (root / 'train_map.txt').write_text(''.join(f'{_member(i)}\t{i % CLASSES}\n' for i in reversed(range(ENTRIES))))
    return str(root / 'train.zip'), str(root / 'train_map.txt'), jpeg


def _uss() -> dict:
    return {'pid': os.getpid(), 'uss': psutil.Process().memory_full_info().uss}


class _Touch:
    """Items are lists of indices; each touches the entries' names, labels and bytes."""

    def __init__(self, source):
        self.source = source

    def __getitem__(self, indices):
        for i in indices:
            name, label = self.source.samples[i]
            assert len(self.source.read(i)) > 0 and label >= 0 and name
        return dict(_uss(), n=len(indices))


def test_zip_workers_memory_does_not_grow_with_the_index(big_zip):
    zip_path, map_path, jpeg = big_zip
    source = ZipSource(zip_path, map_path)
    assert len(source) == ENTRIES and source.num_classes == CLASSES
    assert source.samples[0] == (_member(ENTRIES - 1), (ENTRIES - 1) % CLASSES)
    assert source.read(0) == jpeg
    order = np.random.default_rng(0).permutation(ENTRIES).tolist()
    chunks = [order[s:s + 2500] for s in range(0, ENTRIES, 2500)]
    # the loader deals items round-robin: the first and last WORKERS (empty) reach every worker
    items = [[]] * WORKERS + chunks + [[]] * WORKERS
    loader = DataLoader(_Touch(source), batch_size=None, sampler=items, num_workers=WORKERS,
                        multiprocessing_context='fork')
    first, last, touched = {}, {}, {}
    for out in loader:
        first.setdefault(out['pid'], out['uss'])
        last[out['pid']] = out['uss']
        touched[out['pid']] = touched.get(out['pid'], 0) + out['n']
    assert len(first) == WORKERS and sum(touched.values()) == ENTRIES
    growth_mb = {pid: (last[pid] - first[pid]) / 2 ** 20 for pid in first}
    print(f'worker USS growth MB after touching {ENTRIES} entries: {growth_mb}')  # shown with -s
    assert max(growth_mb.values()) < GROWTH_BOUND_MB, growth_mb


def test_zip_reads_deflated_members_and_reports_damage(tmp_path):
    payloads = {f'c/{i}.jpg': os.urandom(50) + bytes(2000) for i in range(3)}
    with zipfile.ZipFile(tmp_path / 'train.zip', 'w', zipfile.ZIP_DEFLATED) as zf:
        for name, data in payloads.items():
            zf.writestr(name, data)
        zf.writestr('c/bz.jpg', b'bzip2 member', compress_type=zipfile.ZIP_BZIP2)
    (tmp_path / 'train_map.txt').write_text(''.join(f'{n}\t0\n' for n in payloads) + 'c/bz.jpg 1\n')
    source = ZipSource(str(tmp_path / 'train.zip'), str(tmp_path / 'train_map.txt'))
    assert [source.read(i) for i in range(3)] == list(payloads.values())
    assert source.read(3) == b'bzip2 member'  # other methods go through zipfile
    assert source.sizes.tolist() == [2050, 2050, 2050, 12]
    blob = bytearray((tmp_path / 'train.zip').read_bytes())
    with zipfile.ZipFile(tmp_path / 'train.zip') as zf:
        info = zf.getinfo('c/1.jpg')
    blob[info.header_offset + 30 + len('c/1.jpg') + 5] ^= 0xFF  # inside the deflate stream
    (tmp_path / 'train.zip').write_bytes(bytes(blob))
    with pytest.raises(DecodeError, match='damaged zip member'):
        source.read(1)
    assert source.read(0) == payloads['c/0.jpg']


def _write(path, text: str) -> str:
    with open(path, 'w', newline='') as f:
        f.write(text)
    return str(path)


@pytest.mark.parametrize('text', [
    'a/x.jpg\t3\nb/y.jpg 12\n\n  \nc/z.jpg\t0',            # tabs, spaces, blank lines, no final newline
    'a/x.jpg\t3\r\nb/y.jpg\t007\r\n',                     # CRLF, leading zeros
    'a dir/x.jpg\t3\nb/y.jpg\t4\n',                        # a name with a space (tab-separated)
    ' a/x.jpg \t 3 \nb/y.jpg\t4\n',                        # spaces around the fields
    'a/x\u00e9.jpg\t3\n',                                  # non-ASCII
])
def test_map_reader_matches_the_line_reader(tmp_path, text):
    path = _write(tmp_path / 'map.txt', text)
    assert _read_map(path) == SampleTable(_read_map_lines(path))


def test_map_reader_blocks_and_bad_lines(tmp_path, monkeypatch):
    import data.sources as sources
    monkeypatch.setattr(sources, '_MAP_BLOCK', 64)  # many blocks, lines across block edges
    lines = [f'n{i % 7:08d}/img_{i}.JPEG {i % 7}\n' for i in range(500)]
    path = _write(tmp_path / 'map.txt', ''.join(lines))
    table = _read_map(path)
    assert table == SampleTable(_read_map_lines(path)) and len(table) == 500
    assert table.labels.dtype == np.int64
    bad = _write(tmp_path / 'bad.txt', ''.join(lines[:300]) + 'no_label_here\n' + ''.join(lines[300:]))
    with pytest.raises(DataError, match=r'bad.txt:301: expected') as info:
        _read_map(bad)
    assert '\n' not in str(info.value)
    with pytest.raises(DataError, match='lists no images'):
        _read_map(_write(tmp_path / 'empty.txt', '\n\n'))


def test_list_source_keeps_full_paths(tmp_path):
    (tmp_path / 'imgs').mkdir()
    path = _write(tmp_path / 'list.txt', 'n1/a.JPEG 0\nn2/b.JPEG 21840\n')
    source = ListSource(str(tmp_path / 'imgs'), path)
    root = str(tmp_path / 'imgs')
    assert list(source.samples) == [(os.path.join(root, 'n1/a.JPEG'), 0), (os.path.join(root, 'n2/b.JPEG'), 21840)]
    assert source.num_classes == 21841
    absolute = _write(tmp_path / 'abs.txt', '/elsewhere/a.JPEG 0\nn2/b.JPEG 1\n')
    assert ListSource(root, absolute).samples[0] == ('/elsewhere/a.JPEG', 0)


@pytest.mark.parametrize('kind', ['stored', 'deflated', 'zip64', 'prefixed', 'comment', 'utf8'])
def test_central_directory_matches_zipfile(tmp_path, kind):
    from data.sources import _central_directory
    path = tmp_path / 'a.zip'
    if kind == 'prefixed':  # data before the archive, as in self-extracting zips
        path.write_bytes(b'#!/bin/sh\nexit 0\n' * 10)
    with zipfile.ZipFile(path, 'a' if kind == 'prefixed' else 'w',
                         zipfile.ZIP_DEFLATED if kind == 'deflated' else zipfile.ZIP_STORED) as zf:
        for i in range(5):
            name = f'd/\u00e9t\u00e9_{i}.jpg' if kind == 'utf8' else f'd/{i}.jpg'
            with zf.open(name, 'w', force_zip64=kind == 'zip64') as member:
                member.write(bytes([i]) * (100 + i))
        if kind == 'comment':
            zf.comment = b'an archive comment'
    names, table = _central_directory(str(path))
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        for info in infos:
            row = table[names[info.filename.encode()]]
            assert (row['offset'], row['csize'], row['size'], row['method'], row['crc']) == \
                (info.header_offset, info.compress_size, info.file_size, info.compress_type, info.CRC)
    (tmp_path / 'a_map.txt').write_text(''.join(f'{i.filename}\t0\n' for i in infos))
    source = ZipSource(str(path), str(tmp_path / 'a_map.txt'))
    assert [source.read(i) for i in range(5)] == [bytes([i]) * (100 + i) for i in range(5)]


def test_not_a_zip_is_one_line(tmp_path):
    (tmp_path / 'train.zip').write_bytes(b'not a zip at all' * 100)
    (tmp_path / 'train_map.txt').write_text('a.jpg\t0\n')
    with pytest.raises(DataError, match='is not a readable zip file') as info:
        ZipSource(str(tmp_path / 'train.zip'), str(tmp_path / 'train_map.txt'))
    assert '\n' not in str(info.value)

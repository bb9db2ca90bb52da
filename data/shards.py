"""WebDataset shards (`DATA.DATASET wds`): uncompressed tar files whose samples are groups
of members sharing a key (`<key>.jpg`, `<key>.cls`, ...), read by index.

The shards are indexed once at start (headers only: the tar headers are walked with seeks,
the image data is never read), and an image is then one positioned read from its shard.
So a shard dataset is a `Source` like a folder or a zip: the same samplers (a fresh
permutation of the whole split each epoch, every rank the same number of steps, every
validation image scored once at any world size), the same per-sample augmentation seeds
and an exact resume in the middle of an epoch, without a shuffle buffer.
"""
from __future__ import annotations

import glob
import multiprocessing
import os
import shutil
from array import array
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from utils import DataError, atomic_write

from .sources import ProcessFiles, SampleTable, Source

IMAGE_KEYS = ('jpg', 'jpeg', 'png', 'webp')  # the member extensions that hold the image
CLASSES_FILE = 'classes.txt'  # class names in label order, one per line (tools/make_shards.py)
_BLOCK = 512
_ZERO_BLOCK = b'\0' * _BLOCK
_WINDOW = 4096  # one page
_INDEX_PROCESSES = 16  # shards indexed at once, at most


class _Entry:
    """One sample while a shard is walked: where its image is and its label."""
    __slots__ = ('key', 'offset', 'size', 'label')

    def __init__(self, key: str):
        self.key, self.offset, self.size, self.label = key, -1, 0, None


def _octal(field: bytes, path: str, at: int) -> int:
    text = field.rstrip(b'\0 ').strip()
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes of 8 GB and more
        return int.from_bytes(field[1:], 'big')
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise DataError(f"'{path}' is not a readable tar file (bad header at byte {at})") from None


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ('<len> path=<value>\\n' records)."""
    pos = 0
    while pos < len(data):
        space = data.find(b' ', pos)
        if space < 0:
            break
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b'=')
        if key == b'path':
            return value.decode('utf-8', 'surrogateescape')
        pos += length
    return None


class _Window:
    """Reads of a file served from one cached page-sized window: consecutive small members'
    headers take one system call, a large member's header costs one page of I/O."""

    def __init__(self, fd: int):
        self.fd, self.start, self.data = fd, 0, b''

    def read(self, at: int, n: int) -> bytes:
        if not (self.start <= at and at + n <= self.start + len(self.data)):
            self.start, self.data = at, os.pread(self.fd, max(n, _WINDOW), at)
        return self.data[at - self.start:at - self.start + n]


def _members(path: str, window: _Window, file_size: int):
    """(name, data offset, size) of the regular files in a tar, from its headers alone."""
    at, long_name = 0, None
    while at + _BLOCK <= file_size:
        header = window.read(at, _BLOCK)
        if header == _ZERO_BLOCK:
            return  # end-of-archive marker
        if len(header) < _BLOCK or header[257:262] not in (b'ustar', b'\0\0\0\0\0'):
            raise DataError(f"'{path}' is not a readable tar file (bad header at byte {at}; "
                            f"shards must be uncompressed .tar)")
        size, kind = _octal(header[124:136], path, at), header[156:157]
        data_at = at + _BLOCK
        if data_at + size > file_size:
            raise DataError(f"'{path}' is truncated (a member at byte {at} ends past the end of the file)")
        if kind in (b'L', b'x'):  # GNU long name / pax header: applies to the next member
            data = window.read(data_at, size)
            long_name = data.rstrip(b'\0').decode('utf-8', 'surrogateescape') if kind == b'L' else _pax_path(data)
        elif kind in (b'0', b'\0', b'7'):
            name = long_name or _header_name(header)
            long_name = None
            yield name, data_at, size
        else:
            long_name = None  # directories, links and global headers carry no sample data
        at = data_at + -(-size // _BLOCK) * _BLOCK
    if at < file_size or file_size == 0:
        raise DataError(f"'{path}' is truncated (it ends inside a tar header)" if file_size
                        else f"'{path}' is empty")


def _header_name(header: bytes) -> str:
    name = header[0:100].rstrip(b'\0')
    prefix = header[345:500].rstrip(b'\0') if header[257:262] == b'ustar' else b''
    return (prefix + b'/' + name if prefix else name).decode('utf-8', 'surrogateescape')


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition('.')
    return os.path.join(folder, stem) if folder else stem, ext.lower()


def _label(text: bytes, path: str, key: str) -> int:
    try:
        label = int(text.strip())
    except ValueError:
        raise DataError(f"'{path}': sample '{key}' has a cls that is not a class index ({text[:20]!r})") from None
    if label < 0:
        raise DataError(f"'{path}': sample '{key}' has a negative class index {label}")
    return label


class ShardIndex:
    """One shard's samples as arrays (cheap to send back from an indexing process): keys
    (UTF-8, concatenated, with offsets), image offsets and sizes, labels."""

    def __init__(self):
        self.keys, self.key_ends = bytearray(), array('q')
        self.offsets, self.sizes, self.labels = array('q'), array('q'), array('q')

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, entry: _Entry) -> None:
        self.keys += entry.key.encode('utf-8', 'surrogateescape')
        self.key_ends.append(len(self.keys))
        self.offsets.append(entry.offset)
        self.sizes.append(entry.size)
        self.labels.append(entry.label)


def index_shard(path: str) -> ShardIndex:
    """Every sample of one shard, in tar order."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise DataError(f"cannot read shard '{path}' ({e.strerror})") from None
    index, entry = ShardIndex(), None
    try:
        window = _Window(fd)
        for name, offset, size in _members(path, window, os.fstat(fd).st_size):
            key, ext = _split_key(name)
            if entry is None or key != entry.key:
                _finish(entry, path, index)
                entry = _Entry(key)
            if ext in IMAGE_KEYS and entry.offset < 0:
                entry.offset, entry.size = offset, size
            elif ext == 'cls':
                entry.label = _label(window.read(offset, size), path, key)
        _finish(entry, path, index)
    finally:
        os.close(fd)
    if not len(index):
        raise DataError(f"shard '{path}' holds no samples")
    return index


def _finish(entry: _Entry | None, path: str, index: ShardIndex) -> None:
    if entry is None:
        return
    if entry.offset < 0:
        raise DataError(f"'{path}': sample '{entry.key}' has no image (expected one of "
                        f"{', '.join('.' + k for k in IMAGE_KEYS)})")
    if entry.label is None:
        raise DataError(f"'{path}': sample '{entry.key}' has no class index (.cls)")
    index.add(entry)


def index_shards(paths: list[str]) -> list[ShardIndex]:
    """The shards indexed in parallel processes (the header walk is Python: threads would
    share one core), as many as this process's share of the machine's cores."""
    procs = min(len(paths), _INDEX_PROCESSES, max(1, _usable_cores() // _local_processes()))
    if procs <= 1:
        return [index_shard(p) for p in paths]
    # fork: the children only parse files, and start at once (no re-import)
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context('fork')) as pool:
        return list(pool.map(index_shard, paths, chunksize=max(1, len(paths) // (4 * procs))))


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def _local_processes() -> int:
    """The run's processes on this node (torchrun sets LOCAL_WORLD_SIZE); each indexes."""
    return max(1, int(os.environ.get('LOCAL_WORLD_SIZE', '1') or 1))


def shard_paths(root: str, split: str) -> list[str]:
    """`<root>/<split>-*.tar` in name order (also `val` as `validation`)."""
    if not root:
        raise DataError(f'DATA.DATA_PATH is empty; pass --data-path DIR (a folder of {split}-*.tar shards) '
                        f'or set DATA.WDS_{split.upper()}')
    if not os.path.isdir(root):
        raise DataError(f"DATA.DATA_PATH '{root}' is not a directory of shards")
    names = (split, 'validation') if split == 'val' else (split,)
    for name in names:
        paths = sorted(glob.glob(os.path.join(glob.escape(root), f'{name}-*.tar')))
        if paths:
            return paths
    raise DataError(f"no shards '{os.path.join(root, split + '-*.tar')}' in DATA.DATA_PATH "
                    f"(write them with tools/make_shards.py)")


def is_url(spec: str) -> bool:
    return spec.startswith('pipe:') or '://' in spec


def expand_shards(pattern: str, cache: str) -> list[str]:
    """The local files of a brace pattern (`train-{000000..000146}.tar`): local paths as
    they are, URLs copied into `cache` once (fetch_shards)."""
    from braceexpand import braceexpand  # installed with webdataset
    specs = list(braceexpand(pattern))
    urls = [s for s in specs if is_url(s)]
    local = {s: s for s in specs if not is_url(s)}
    missing = [p for p in local if not os.path.isfile(p)]
    if missing:
        raise DataError(f"shard '{missing[0]}' of '{pattern}' does not exist")
    local.update(fetch_shards(urls, cache))
    return [local[s] for s in specs]


def fetch_shards(urls: list[str], cache: str) -> dict[str, str]:
    """{url: local copy} for shards opened with WebDataset's gopen. A copy is written under a
    temporary name and renamed into place, so a crash never leaves a torn shard and a copy
    that exists is complete; each process starts at a different shard (by pid) so the ranks
    of a node sharing `cache` mostly fetch different ones."""
    copies = {url: os.path.join(cache, _cache_name(url)) for url in urls}
    if urls:
        os.makedirs(cache, exist_ok=True)
    start = os.getpid() % max(len(urls), 1)
    for url in urls[start:] + urls[:start]:
        if not os.path.isfile(copies[url]):
            _fetch(url, copies[url])
    return copies


def _cache_name(url: str) -> str:
    import hashlib
    base = os.path.basename(url.split()[-1].rstrip('/')) or 'shard.tar'
    return f'{hashlib.sha1(url.encode()).hexdigest()[:16]}-{base}'


def _fetch(url: str, target: str) -> None:
    from webdataset.gopen import gopen

    def copy(out) -> None:
        with gopen(url, 'rb') as stream:
            shutil.copyfileobj(stream, out, 1 << 20)
    try:
        atomic_write(target, copy)
    except ValueError as e:  # OutputError: the command, the transfer or the disk failed; gopen's own errors
        raise DataError(f"cannot fetch shard '{url}' ({e})") from None


def split_shards(config, split: str) -> list[str]:
    """The shard files of `split`: DATA.WDS_TRAIN / DATA.WDS_VAL when set, else the
    `<split>-*.tar` files in DATA.DATA_PATH."""
    pattern = config.DATA.WDS_TRAIN if split == 'train' else config.DATA.WDS_VAL
    if not pattern:
        return shard_paths(config.DATA.DATA_PATH, split)
    cache = config.DATA.WDS_CACHE or os.path.join(os.path.expanduser('~'), '.cache', 'swin-shards')
    return expand_shards(pattern, cache)


def read_classes(root: str) -> list[str] | None:
    path = os.path.join(root, CLASSES_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        return [line.rstrip('\n') for line in f if line.strip()]


def _key_table(per_shard: list[ShardIndex]) -> SampleTable:
    """The samples' keys and labels of all shards in one SampleTable."""
    bases = np.cumsum([0] + [len(s.keys) for s in per_shard[:-1]])
    ends = np.concatenate([np.frombuffer(s.key_ends, dtype=np.int64) + b for s, b in zip(per_shard, bases)])
    names = np.frombuffer(b''.join(bytes(s.keys) for s in per_shard), dtype=np.uint8)
    labels = np.concatenate([np.frombuffer(s.labels, dtype=np.int64) for s in per_shard])
    return SampleTable.from_arrays(names, np.concatenate([[0], ends]), labels)


class ShardSource(Source):
    """The samples of the shard files `paths`, shard by shard in tar order. Labels are the
    samples' `cls`; class names come from `classes.txt` in `classes_root` when present."""

    def __init__(self, paths: list[str], classes_root: str = ''):
        self.paths = paths
        per_shard = index_shards(paths)
        self.shard = np.concatenate([np.full(len(s), i, dtype=np.int32) for i, s in enumerate(per_shard)])
        self.offsets = np.concatenate([np.frombuffer(s.offsets, dtype=np.int64) for s in per_shard])
        self.sizes = np.concatenate([np.frombuffer(s.sizes, dtype=np.int64) for s in per_shard])
        self.samples = _key_table(per_shard)
        self.classes = read_classes(classes_root) if classes_root else None
        self.num_classes = len(self.classes) if self.classes else int(self.samples.labels.max()) + 1
        if self.classes and self.samples.labels.max() >= len(self.classes):
            where = int(np.argmax(self.samples.labels))
            raise DataError(f"{self.describe(where)} has class index {self.samples.labels[where]}, outside the "
                            f"{len(self.classes)} classes of '{os.path.join(classes_root, CLASSES_FILE)}'")
        self._files = ProcessFiles()

    def read(self, index: int) -> bytes:
        return self._files.pread(self.paths[int(self.shard[index])], int(self.sizes[index]), int(self.offsets[index]))

    def describe(self, index: int) -> str:
        return f'{self.paths[int(self.shard[index])]}:{self.samples.name(index)}'

"""Where encoded images come from: an ImageFolder tree, a zip with a map file, the
ImageNet-22k list layout, or an in-memory cache of a zip.

A source lists `samples` as (name, label) pairs and returns the encoded bytes of one with
`read(index)`; decoding and augmentation happen in the dataset. Every layout problem found
while listing (missing folder, empty class, stray file, member missing from a zip) raises
`DataError` with one line naming the path. A sample that cannot be read later raises
`OSError` or `DecodeError`, which the dataset counts and replaces.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from utils import DataError

from .decode import DecodeError

# torchvision's list, so the same files count as images
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
_CACHE_THREADS = 8  # file reads release the GIL


class SampleTable(Sequence):
    """(name, label) pairs in two NumPy buffers instead of a list of tuples: forked loader
    workers touching Python objects would copy their pages (hundreds of MB per worker for
    ImageNet, GBs for 22k); plain arrays stay shared."""

    def __init__(self, pairs: Iterable[tuple[str, int]]):
        names, labels = [], []
        for name, label in pairs:
            names.append(name.encode('utf-8', 'surrogateescape'))
            labels.append(label)
        self._offsets = np.cumsum([0] + [len(n) for n in names], dtype=np.int64)
        self._names = np.frombuffer(b''.join(names), dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, index: int) -> str:
        raw = self._names[self._offsets[index]:self._offsets[index + 1]].tobytes()
        return raw.decode('utf-8', 'surrogateescape')

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        return self.name(index), int(self.labels[index])

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


class Source:
    samples: SampleTable
    num_classes: int
    classes: list[str] | None = None  # class names where the layout has them (folders)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> bytes:
        raise NotImplementedError

    def label(self, index: int) -> int:
        return int(self.samples.labels[index])

    def describe(self, index: int) -> str:
        """The sample's location, for messages."""
        return self.samples.name(index)


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"{what} '{path}' is not a directory" if os.path.exists(path)
                        else f"{what} '{path}' does not exist")


def _read_file(path: str) -> bytes:
    with open(path, 'rb') as f:  # OSError (missing, unreadable) is counted by the dataset
        return f.read()


def class_folders(root: str) -> list[str]:
    """Class names of an ImageFolder tree in label order (sorted folder names, hidden ones
    skipped), as torchvision numbers them; also names the classes of a trained model."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))


class FolderSource(Source):
    """`root/<class>/**/<image>`, classes and files in torchvision ImageFolder order (sorted
    names, sorted walk), so label indices match the official checkpoints."""

    def __init__(self, root: str):
        _require_dir(root, 'image folder')
        self.root = root
        self.classes = class_folders(root)
        if not self.classes:
            raise DataError(f"'{root}' has no class folders (expected {root}/<class>/<image>.jpg)")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.num_classes = len(self.classes)
        pairs = []
        for name in self.classes:
            start = len(pairs)
            for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
                for fname in sorted(files):
                    path = os.path.join(dirpath, fname)
                    if fname.startswith('.'):
                        continue  # .DS_Store and friends
                    if not fname.lower().endswith(IMG_EXTENSIONS):
                        raise DataError(f"'{path}' is not an image file (expected one of "
                                        f"{', '.join(IMG_EXTENSIONS)}); move it out of the dataset")
                    pairs.append((path, self.class_to_idx[name]))
            if len(pairs) == start:
                raise DataError(f"class folder '{os.path.join(root, name)}' has no images")
        self.samples = SampleTable(pairs)

    def read(self, index: int) -> bytes:
        return _read_file(self.samples.name(index))


def _read_map(map_path: str) -> list[tuple[str, int]]:
    """Lines of `<member path><tab or space><label>` (the official *_map.txt files)."""
    if not os.path.isfile(map_path):
        raise DataError(f"map file '{map_path}' does not exist")
    pairs = []
    with open(map_path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip('\n').rsplit('\t', 1) if '\t' in line else line.split()
            if len(parts) != 2 or not parts[1].strip().isdigit():
                raise DataError(f"{map_path}:{lineno}: expected '<path>\\t<label>' with a label >= 0, "
                                f"got {line.strip()!r}")
            pairs.append((parts[0].strip(), int(parts[1])))
    if not pairs:
        raise DataError(f"map file '{map_path}' lists no images")
    return pairs


class ZipSource(Source):
    """Official zip layout: `<split>.zip` holding the images and `<split>_map.txt` beside it.

    Members are read lazily; each process opens its own handle (a zipfile object is not
    safe to share across the fork into loader workers)."""

    def __init__(self, zip_path: str, map_path: str):
        if not os.path.isfile(zip_path):
            raise DataError(f"zip file '{zip_path}' does not exist")
        self.zip_path = zip_path
        pairs = _read_map(map_path)
        try:
            with zipfile.ZipFile(zip_path) as zf:
                sizes = {info.filename: info.file_size for info in zf.infolist()}
        except zipfile.BadZipFile as e:
            raise DataError(f"'{zip_path}' is not a readable zip file ({e})") from None
        for member, _ in pairs:
            if member not in sizes:
                raise DataError(f"'{member}' is listed in '{map_path}' but missing from '{zip_path}'")
        self.samples = SampleTable(pairs)
        self.sizes = np.array([sizes[member] for member, _ in pairs], dtype=np.int64)  # for the cache
        self.num_classes = int(self.samples.labels.max()) + 1
        self._handle: zipfile.ZipFile | None = None
        self._pid = -1

    def read(self, index: int) -> bytes:
        if self._pid != os.getpid():
            self._handle = zipfile.ZipFile(self.zip_path)
            self._pid = os.getpid()
        try:
            return self._handle.read(self.samples.name(index))
        except (zipfile.BadZipFile, zlib.error) as e:  # damaged member: bad CRC or deflate data
            raise DecodeError(f'damaged zip member ({e})') from None

    def describe(self, index: int) -> str:
        return f'{self.zip_path}@/{self.samples.name(index)}'

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_handle'], state['_pid'] = None, -1
        return state


class ListSource(Source):
    """The official ImageNet-22k layout: images under `root`, listed with their labels in a
    JSON file of [path, label] pairs (or a text file of `<path> <label>` lines)."""

    def __init__(self, root: str, list_path: str):
        _require_dir(root, 'DATA.DATA_PATH')
        if not os.path.isfile(list_path):
            raise DataError(f"image list '{list_path}' does not exist")
        with open(list_path) as f:
            head = f.read(1)
        if head == '[':
            with open(list_path) as f:
                try:
                    entries = json.load(f)
                    pairs = [(os.path.join(root, str(p)), int(label)) for p, label in entries]
                except (json.JSONDecodeError, ValueError, TypeError) as e:
                    raise DataError(f"image list '{list_path}' is not a JSON list of [path, label] ({e})") from None
        else:
            pairs = [(os.path.join(root, p), label) for p, label in _read_map(list_path)]
        if not pairs:
            raise DataError(f"image list '{list_path}' lists no images")
        if min(label for _, label in pairs) < 0:
            raise DataError(f"image list '{list_path}' has a negative label")
        self.samples = SampleTable(pairs)
        self.num_classes = int(self.samples.labels.max()) + 1

    def read(self, index: int) -> bytes:
        return _read_file(self.samples.name(index))


class CachedSource(Source):
    """Encoded bytes of the zip members `keep` (default: all) held in RAM; the rest are read
    from the zip. One flat byte array plus offsets, not a Python object per image: forked
    loader workers then share the pages instead of copying them as they touch reference
    counts. A member that cannot be read is left out of the cache, to be counted when read."""

    def __init__(self, source: ZipSource, keep: Iterable[int] | None = None):
        self.source = source
        self.samples = source.samples
        self.num_classes = source.num_classes
        indices = np.arange(len(source)) if keep is None else np.fromiter(keep, dtype=np.int64)
        sizes = source.sizes[indices]
        self._slot = np.full(len(source), -1, dtype=np.int64)
        self._slot[indices] = np.arange(len(indices))
        self._offsets = np.concatenate([[0], np.cumsum(sizes)])
        self._bytes = np.empty(int(self._offsets[-1]), dtype=np.uint8)

        def fill(slot: int) -> None:
            index = int(indices[slot])
            try:
                data = source.read(index)
            except (DecodeError, OSError):
                self._slot[index] = -1
                return
            self._bytes[self._offsets[slot]:self._offsets[slot + 1]] = np.frombuffer(data, dtype=np.uint8)

        with ThreadPoolExecutor(max_workers=_CACHE_THREADS) as pool:
            list(pool.map(fill, range(len(indices))))

    @property
    def cached(self) -> int:
        return int((self._slot >= 0).sum())

    def read(self, index: int) -> bytes:
        slot = self._slot[index]
        if slot < 0:
            return self.source.read(index)
        return self._bytes[self._offsets[slot]:self._offsets[slot + 1]].tobytes()

    def describe(self, index: int) -> str:
        return self.source.describe(index)

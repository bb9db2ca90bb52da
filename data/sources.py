"""Where encoded images come from: an ImageFolder tree, a zip with a map file, the
ImageNet-22k list layout, or an in-memory cache of any of them.

A source lists `samples` as (name, label) pairs and returns the encoded bytes of one with
`read(index)`; decoding and augmentation happen in the dataset. Every layout problem found
while listing (missing folder, empty class, stray file, member missing from a zip) raises
`DataError` with one line naming the path.
"""
from __future__ import annotations

import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional

import numpy as np

# torchvision's list, so the same files count as images
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


class DataError(ValueError):
    """A problem with the user's data, reported as one line naming the file."""

    def __init__(self, message: str):
        # A DataLoader re-raises a worker's exception as this type with the worker's whole
        # traceback as its message; keep only the original line.
        if message.startswith('Caught DataError'):
            message = message.rstrip().splitlines()[-1].split('DataError: ', 1)[-1]
        super().__init__(message)


class Source:
    samples: list[tuple[str, int]]
    num_classes: int

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> bytes:
        raise NotImplementedError

    def nbytes(self, index: int) -> int:
        """Encoded size of one sample, to size a cache before reading it."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """The sample's location, for messages."""
        return self.samples[index][0]


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"{what} '{path}' is not a directory" if os.path.exists(path)
                        else f"{what} '{path}' does not exist")


class FolderSource(Source):
    """`root/<class>/**/<image>`, classes and files in torchvision ImageFolder order (sorted
    names, sorted walk), so label indices match the official checkpoints."""

    def __init__(self, root: str):
        _require_dir(root, 'image folder')
        self.root = root
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
        if not self.classes:
            raise DataError(f"'{root}' has no class folders (expected {root}/<class>/<image>.jpg)")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.num_classes = len(self.classes)
        self.samples = []
        for name in self.classes:
            start = len(self.samples)
            for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
                for fname in sorted(files):
                    path = os.path.join(dirpath, fname)
                    if fname.startswith('.'):
                        continue  # .DS_Store and friends
                    if not fname.lower().endswith(IMG_EXTENSIONS):
                        raise DataError(f"'{path}' is not an image file (expected one of "
                                        f"{', '.join(IMG_EXTENSIONS)}); move it out of the dataset")
                    self.samples.append((path, self.class_to_idx[name]))
            if len(self.samples) == start:
                raise DataError(f"class folder '{os.path.join(root, name)}' has no images")

    def read(self, index: int) -> bytes:
        with open(self.samples[index][0], 'rb') as f:
            return f.read()

    def nbytes(self, index: int) -> int:
        return os.path.getsize(self.samples[index][0])


def _read_map(map_path: str) -> list[tuple[str, int]]:
    """Lines of `<member path><tab or space><label>` (the official *_map.txt files)."""
    if not os.path.isfile(map_path):
        raise DataError(f"map file '{map_path}' does not exist")
    samples = []
    with open(map_path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip('\n').rsplit('\t', 1) if '\t' in line else line.split()
            if len(parts) != 2 or not parts[1].strip().lstrip('-').isdigit():
                raise DataError(f"{map_path}:{lineno}: expected '<path>\\t<label>', got {line.strip()!r}")
            samples.append((parts[0].strip(), int(parts[1])))
    if not samples:
        raise DataError(f"map file '{map_path}' lists no images")
    return samples


def _num_classes(samples: Iterable[tuple[str, int]], where: str) -> int:
    labels = [label for _, label in samples]
    if min(labels) < 0:
        raise DataError(f"'{where}' has a negative label {min(labels)}")
    return max(labels) + 1


class ZipSource(Source):
    """Official zip layout: `<split>.zip` holding the images and `<split>_map.txt` beside it.

    Members are read lazily; each process opens its own handle (a zipfile object is not
    safe to share across the fork into loader workers)."""

    def __init__(self, zip_path: str, map_path: str):
        if not os.path.isfile(zip_path):
            raise DataError(f"zip file '{zip_path}' does not exist")
        self.zip_path = zip_path
        self.samples = _read_map(map_path)
        try:
            with zipfile.ZipFile(zip_path) as zf:
                infos = {info.filename: info for info in zf.infolist()}
        except zipfile.BadZipFile as e:
            raise DataError(f"'{zip_path}' is not a readable zip file ({e})") from None
        for member, _ in self.samples:
            if member not in infos:
                raise DataError(f"'{member}' is listed in '{map_path}' but missing from '{zip_path}'")
        self._sizes = [infos[member].file_size for member, _ in self.samples]
        self.num_classes = _num_classes(self.samples, map_path)
        self._handle: Optional[zipfile.ZipFile] = None
        self._pid = -1

    def read(self, index: int) -> bytes:
        if self._pid != os.getpid():
            self._handle = zipfile.ZipFile(self.zip_path)
            self._pid = os.getpid()
        return self._handle.read(self.samples[index][0])

    def nbytes(self, index: int) -> int:
        return self._sizes[index]

    def describe(self, index: int) -> str:
        return f'{self.zip_path}@/{self.samples[index][0]}'

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
                except json.JSONDecodeError as e:
                    raise DataError(f"image list '{list_path}' is not valid JSON ({e})") from None
            self.samples = [(os.path.join(root, str(p)), int(label)) for p, label in entries]
        else:
            self.samples = [(os.path.join(root, p), label) for p, label in _read_map(list_path)]
        if not self.samples:
            raise DataError(f"image list '{list_path}' lists no images")
        self.num_classes = _num_classes(self.samples, list_path)

    def read(self, index: int) -> bytes:
        path = self.samples[index][0]
        try:
            with open(path, 'rb') as f:
                return f.read()
        except FileNotFoundError:
            raise DataError(f"'{path}' is listed but does not exist") from None

    def nbytes(self, index: int) -> int:
        return os.path.getsize(self.samples[index][0])


class CachedSource(Source):
    """Encoded bytes of `keep` (default: all samples) held in RAM; the rest are read from
    the wrapped source. One flat byte array plus offsets, not a Python object per image:
    forked loader workers then share the pages instead of copying them as they touch
    reference counts."""

    def __init__(self, source: Source, keep: Optional[Iterable[int]] = None, threads: int = 8):
        self.source = source
        self.samples = source.samples
        self.num_classes = source.num_classes
        indices = np.arange(len(source)) if keep is None else np.fromiter(keep, dtype=np.int64)
        sizes = np.array([source.nbytes(int(i)) for i in indices], dtype=np.int64)
        self._slot = np.full(len(source), -1, dtype=np.int64)
        self._slot[indices] = np.arange(len(indices))
        self._offsets = np.concatenate([[0], np.cumsum(sizes)])
        self._bytes = np.empty(int(self._offsets[-1]), dtype=np.uint8)

        def fill(slot: int) -> None:
            data = source.read(int(indices[slot]))
            self._bytes[self._offsets[slot]:self._offsets[slot + 1]] = np.frombuffer(data, dtype=np.uint8)

        with ThreadPoolExecutor(max_workers=threads) as pool:  # file reads release the GIL
            list(pool.map(fill, range(len(indices))))

    @property
    def cached(self) -> int:
        return int((self._slot >= 0).sum())

    def read(self, index: int) -> bytes:
        slot = self._slot[index]
        if slot < 0:
            return self.source.read(index)
        return self._bytes[self._offsets[slot]:self._offsets[slot + 1]].tobytes()

    def nbytes(self, index: int) -> int:
        return self.source.nbytes(index)

    def describe(self, index: int) -> str:
        return self.source.describe(index)

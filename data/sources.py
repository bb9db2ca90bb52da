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
import struct
import threading
import zipfile
import zlib
from array import array
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
    ImageNet, GBs for 22k); plain arrays stay shared. Names may share a `prefix` (a list's
    root folder), kept once instead of in every entry."""

    def __init__(self, pairs: Iterable[tuple[str, int]], prefix: str = ''):
        # one growing buffer, not a list of per-name bytes objects (the peak at 14M entries)
        names, offsets, labels = bytearray(), array('q', [0]), array('q')
        for name, label in pairs:
            names += name.encode('utf-8', 'surrogateescape')
            offsets.append(len(names))
            labels.append(label)
        self._set(np.frombuffer(names, dtype=np.uint8), np.frombuffer(offsets, dtype=np.int64),
                  np.frombuffer(labels, dtype=np.int64), prefix)

    @classmethod
    def from_arrays(cls, names: np.ndarray, offsets: np.ndarray, labels: np.ndarray,
                    prefix: str = '') -> SampleTable:
        """Entry i is prefix + names[offsets[i]:offsets[i + 1]] (UTF-8) with labels[i]."""
        table = cls.__new__(cls)
        table._set(names, offsets, labels, prefix)
        return table

    def _set(self, names, offsets, labels, prefix: str) -> None:
        self._names, self._offsets, self.labels, self._prefix = names, offsets, labels, prefix

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, index: int) -> str:
        raw = self._names[self._offsets[index]:self._offsets[index + 1]].tobytes()
        return self._prefix + raw.decode('utf-8', 'surrogateescape')

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


def _read_map_lines(map_path: str) -> list[tuple[str, int]]:
    """Lines of `<member path><tab or space><label>` (the official *_map.txt files), line by
    line: the general reader, and the one that names a bad line."""
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
    return pairs


_MAP_BLOCK = 1 << 24  # bytes parsed at a time: bounds the parser's temporary arrays (~10x this)
_MAX_LABEL_DIGITS = 18  # fits int64


def _parse_map_block(buf: np.ndarray, relative: bool):
    """(name bytes, name lengths, labels) of a block of whole lines, or None unless every line
    is plain: empty, or `<name><one tab or space><digits>` with a printable-ASCII name (no
    spaces; relative when asked), an optional '\\r' before the '\\n'. Plain lines mean the
    same to `_read_map_lines`, which reads everything else."""
    ends = np.flatnonzero(buf == 10)
    starts = np.empty_like(ends)
    starts[0], starts[1:] = 0, ends[:-1] + 1
    stops = ends.copy()
    cr = (stops > starts) & (buf[np.maximum(stops - 1, 0)] == 13)
    stops[cr] -= 1
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]
    if not len(starts):
        return np.empty(0, np.uint8), np.empty(0, np.int64), np.empty(0, np.int64)
    unprintable = (buf < 0x21) | (buf > 0x7E)
    # the last tab or space before each line's end is its separator
    pos = np.where((buf == 9) | (buf == 32), np.arange(len(buf), dtype=np.int32), np.int32(-1))
    np.maximum.accumulate(pos, out=pos)
    seps = pos[stops - 1].astype(np.int64)
    del pos
    if (seps <= starts).any():  # no separator, or an empty name
        return None
    # the only unprintable bytes: newlines, their '\r', one separator per line
    if int(np.count_nonzero(unprintable)) != len(ends) + int(cr.sum()) + len(seps):
        return None
    digits = np.zeros(len(buf) + 1, dtype=np.int32)
    np.cumsum((buf >= 48) & (buf <= 57), out=digits[1:])
    n_digits = stops - seps - 1
    if ((n_digits < 1) | (n_digits > _MAX_LABEL_DIGITS) | (digits[stops] - digits[seps + 1] != n_digits)).any():
        return None
    if relative and (buf[starts] == ord('/')).any():
        return None
    labels = np.zeros(len(starts), dtype=np.int64)
    for k in range(int(n_digits.max())):
        has = n_digits > k
        labels += np.where(has, buf[np.where(has, stops - 1 - k, 0)].astype(np.int64) - 48, 0) * 10 ** k
    marks = np.zeros(len(buf) + 1, dtype=np.int8)
    marks[starts] = 1
    marks[seps] = -1
    in_name = np.cumsum(marks[:-1], dtype=np.int8).view(bool)
    return buf[in_name], seps - starts, labels


def _parse_map_fast(map_path: str, relative: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(names, offsets, labels) of a map file of plain lines, in blocks with NumPy (a Python
    loop and a tuple per line take minutes and GBs at 14M lines); None if a line is not plain."""
    names, lengths, labels = [], [], []
    rest = b''
    with open(map_path, 'rb') as f:
        while True:
            block = f.read(_MAP_BLOCK)
            data = rest + block
            cut = len(data) if not block else data.rfind(b'\n') + 1
            if not block and data and not data.endswith(b'\n'):
                data += b'\n'
                cut = len(data)
            rest = data[cut:]
            if cut:
                parsed = _parse_map_block(np.frombuffer(data, dtype=np.uint8, count=cut), relative)
                if parsed is None:
                    return None
                for out, part in zip((names, lengths, labels), parsed):
                    out.append(part)
            if not block:
                break
    if not labels:
        return np.empty(0, np.uint8), np.zeros(1, np.int64), np.empty(0, np.int64)
    offsets = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return np.concatenate(names), offsets, np.concatenate(labels)


def _read_map(map_path: str, prefix: str = '') -> SampleTable:
    """The (member path, label) entries of a `<split>_map.txt` (`<path><tab or space><label>`
    lines), each path after `prefix` (os.path.join(prefix, path) when prefix is given)."""
    if not os.path.isfile(map_path):
        raise DataError(f"map file '{map_path}' does not exist")
    parsed = _parse_map_fast(map_path, relative=bool(prefix))
    if parsed is not None:
        table = SampleTable.from_arrays(*parsed, prefix=os.path.join(prefix, '') if prefix else '')
    else:
        pairs = _read_map_lines(map_path)
        table = SampleTable((os.path.join(prefix, p), label) for p, label in pairs) if prefix \
            else SampleTable(pairs)
    if not len(table):
        raise DataError(f"map file '{map_path}' lists no images")
    return table


_LOCAL_HEADER = struct.Struct('<4s22xHH')  # signature ... name length, extra length: 30 bytes
_CENTRAL = struct.Struct('<4s4xHH4xLLLHHH8xL')  # flags, method, crc, sizes, lengths, header offset: 46 bytes
_END = struct.Struct('<4sHHHHLLH')  # end of central directory: 22 bytes
_END64 = struct.Struct('<4sQHHLLQQQQ')  # zip64 end record: 56 bytes
_LOCATOR64 = struct.Struct('<4sLQL')  # zip64 end record locator: 20 bytes
_ENCRYPTED, _UTF8, _MAX32 = 0x1, 0x800, 0xFFFFFFFF


def _end_record(f, size: int) -> tuple[int, int, int, int]:
    """(entries, directory size, directory start, bytes before the archive) from the end
    records, as zipfile reads them."""
    tail_len = min(size, _END.size + 65535)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(b'PK\x05\x06')
    # the last signature whose comment length reaches the end (a comment may hold the bytes)
    while at >= 0 and (len(tail) - at < _END.size or at + _END.size + _END.unpack_from(tail, at)[-1] != len(tail)):
        at = tail.rfind(b'PK\x05\x06', 0, at)
    if at < 0:
        raise zipfile.BadZipFile('File is not a zip file')
    _, disk, disk_dir, _, count, dir_size, dir_offset, _ = _END.unpack_from(tail, at)
    location = size - tail_len + at
    if location >= _LOCATOR64.size + _END64.size:
        f.seek(location - _LOCATOR64.size)
        locator = f.read(_LOCATOR64.size)
        if locator[:4] == b'PK\x06\x07':
            if _LOCATOR64.unpack(locator)[3] != 1:
                raise zipfile.BadZipFile('zipfiles that span multiple disks are not supported')
            f.seek(location - _LOCATOR64.size - _END64.size)
            record = f.read(_END64.size)
            if record[:4] != b'PK\x06\x06':
                raise zipfile.BadZipFile('Corrupt zip64 end of central directory record')
            _, _, _, _, disk, disk_dir, _, count, dir_size, dir_offset = _END64.unpack(record)
            location -= _LOCATOR64.size + _END64.size
    if disk or disk_dir:
        raise zipfile.BadZipFile('zipfiles that span multiple disks are not supported')
    concat = location - dir_size - dir_offset  # bytes before the archive (self-extracting zips)
    if concat < 0:
        raise zipfile.BadZipFile('Bad offset for central directory')
    return count, dir_size, dir_offset + concat, concat


def _zip64_sizes(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """The 64-bit values that the ZIP64 extra field holds for the fields at 0xFFFFFFFF."""
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack_from('<HH', extra, at)
        if tag == 1:
            values = list(struct.unpack_from(f'<{length // 8}Q', extra, at + 4))
            try:
                if usize == _MAX32:
                    usize = values.pop(0)
                if csize == _MAX32:
                    csize = values.pop(0)
                if offset == _MAX32:
                    offset = values.pop(0)
            except IndexError:
                raise zipfile.BadZipFile('Corrupt extra field 0001 (zip64)') from None
            break
        at += 4 + length
    return usize, csize, offset


def _central_directory(zip_path: str) -> tuple[dict[bytes, int], np.ndarray]:
    """({member name as UTF-8: entry}, entries as a structured array of header offset, sizes,
    method, flags, CRC). One pass of struct over the directory: zipfile.ZipFile makes a
    ZipInfo per member and decodes most names with a Python codec (cp437), ~30 s for 1.28M."""
    size = os.path.getsize(zip_path)
    with open(zip_path, 'rb') as f:
        count, dir_size, dir_start, concat = _end_record(f, size)
        f.seek(dir_start)
        directory = f.read(dir_size)
    if len(directory) != dir_size:
        raise zipfile.BadZipFile('Truncated central directory')
    table = np.zeros(count, dtype=[('offset', np.int64), ('csize', np.int64), ('size', np.int64),
                                   ('method', np.int16), ('flags', np.int32), ('crc', np.uint32)])
    rows, names = [], {}
    at, unpack, step = 0, _CENTRAL.unpack_from, _CENTRAL.size
    for entry in range(count):
        if at + step > dir_size:
            raise zipfile.BadZipFile('Truncated central directory')
        magic, flags, method, crc, csize, usize, name_len, extra_len, comment_len, offset = unpack(directory, at)
        if magic != b'PK\x01\x02':
            raise zipfile.BadZipFile('Bad magic number for central directory')
        name = directory[at + step:at + step + name_len]
        if _MAX32 in (csize, usize, offset):
            extra = directory[at + step + name_len:at + step + name_len + extra_len]
            usize, csize, offset = _zip64_sizes(extra, usize, csize, offset)
        if not flags & _UTF8 or b'\0' in name or os.sep != '/':
            name = _zipinfo_name(name, flags)
        names[name] = entry  # the last of equal names wins, as in zipfile
        rows.append((offset + concat, csize, usize, method, flags, crc))
        at += step + name_len + extra_len + comment_len
    table[:] = rows
    return names, table


def _zipinfo_name(raw: bytes, flags: int) -> bytes:
    """A member's name as zipfile.ZipInfo.filename has it, in UTF-8."""
    if not flags & _UTF8 and raw.isascii() and b'\0' not in raw and os.sep == '/':
        return raw  # cp437 is ASCII below 0x80
    name = raw.decode('utf-8' if flags & _UTF8 else 'cp437').split('\0', 1)[0]
    if os.sep != '/':
        name = name.replace(os.sep, '/')
    return name.encode('utf-8', 'surrogateescape')


class ProcessFiles:
    """Read-only descriptors of files, opened on first use in each process (the parent's are
    not used across the fork into loader workers) and read with positioned reads, which are
    thread-safe (CachedSource reads in threads). Pickles empty."""

    def __init__(self):
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _fd(self, path: str) -> int:
        if self._pid != os.getpid():  # forked
            self._fds, self._pid, self._lock = {}, os.getpid(), threading.Lock()
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, 'O_BINARY', 0))
        return fd

    def pread(self, path: str, size: int, offset: int) -> bytes:
        fd = self._fd(path)
        if hasattr(os, 'pread'):
            return os.pread(fd, size, offset)
        with self._lock:  # no pread (Windows): seek and read under the lock
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, size)

    def __del__(self):
        if getattr(self, '_pid', None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class ZipSource(Source):
    """Official zip layout: `<split>.zip` holding the images and `<split>_map.txt` beside it.

    The central directory is parsed once, in the constructor, into NumPy arrays per sample
    (local header offset, compressed size, method, CRC): forked loader workers share them
    and read members with os.pread, instead of each opening a zipfile.ZipFile, which
    parses the whole directory into a Python object per member (tens of seconds and
    hundreds of MB per worker for ImageNet's 1.28M). zipfile itself serves only members
    stored with other methods (bzip2, lzma) or encrypted."""

    def __init__(self, zip_path: str, map_path: str):
        if not os.path.isfile(zip_path):
            raise DataError(f"zip file '{zip_path}' does not exist")
        self.zip_path = zip_path
        self.samples = _read_map(map_path)
        try:
            where, table = _central_directory(zip_path)
        except (zipfile.BadZipFile, struct.error) as e:
            raise DataError(f"'{zip_path}' is not a readable zip file ({e})") from None
        blob, bounds = self.samples._names.tobytes(), self.samples._offsets.tolist()
        entry = []
        for i in range(len(self.samples)):
            found = where.get(blob[bounds[i]:bounds[i + 1]])
            if found is None:
                raise DataError(f"'{self.samples.name(i)}' is listed in '{map_path}' but missing from '{zip_path}'")
            entry.append(found)
        del where, blob, bounds
        table = table[np.asarray(entry, dtype=np.int64)]
        self.sizes = np.ascontiguousarray(table['size'])  # for the cache
        self._offset, self._csize = np.ascontiguousarray(table['offset']), np.ascontiguousarray(table['csize'])
        self._method, self._flags = np.ascontiguousarray(table['method']), np.ascontiguousarray(table['flags'])
        self._crc = np.ascontiguousarray(table['crc'])
        self.num_classes = int(self.samples.labels.max()) + 1
        self._files = ProcessFiles()
        self._handle: tuple[int, zipfile.ZipFile] | None = None  # (pid, handle) for zipfile's own reads

    def _pread(self, size: int, offset: int) -> bytes:
        return self._files.pread(self.zip_path, size, offset)

    def _zipfile_read(self, index: int) -> bytes:
        if self._handle is None or self._handle[0] != os.getpid():  # a handle is per process
            self._handle = (os.getpid(), zipfile.ZipFile(self.zip_path))
        return self._handle[1].read(self.samples.name(index))

    def read(self, index: int) -> bytes:
        method, flags = int(self._method[index]), int(self._flags[index])
        try:
            if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or flags & _ENCRYPTED:
                return self._zipfile_read(index)
            return self._read_member(index, method, flags)
        except (zipfile.BadZipFile, zlib.error) as e:  # damaged member: bad CRC or deflate data
            raise DecodeError(f'damaged zip member ({e})') from None

    def _read_member(self, index: int, method: int, flags: int) -> bytes:
        """The checks zipfile makes: header signature, name, length, CRC-32."""
        offset, csize = int(self._offset[index]), int(self._csize[index])
        header = self._pread(_LOCAL_HEADER.size, offset)
        if len(header) != _LOCAL_HEADER.size:
            raise zipfile.BadZipFile('Truncated file header')
        magic, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        if magic != b'PK\x03\x04':
            raise zipfile.BadZipFile('Bad magic number for file header')
        start = offset + _LOCAL_HEADER.size
        data = self._pread(name_len + extra_len + csize, start)
        name = self.samples.name(index)
        raw_name = _zipinfo_name(data[:name_len], flags).decode('utf-8', 'surrogateescape')
        if raw_name != name:
            raise zipfile.BadZipFile(f'File name in directory {name!r} and header {raw_name!r} differ.')
        data = data[name_len + extra_len:]
        if len(data) != csize:
            raise zipfile.BadZipFile(f'Truncated member {name!r}')
        if method == zipfile.ZIP_DEFLATED:
            data = zlib.decompress(data, -15, max(int(self.sizes[index]), 1))
        if len(data) != self.sizes[index] or zlib.crc32(data) != self._crc[index]:
            raise zipfile.BadZipFile(f'Bad CRC-32 for file {name!r}')
        return data

    def describe(self, index: int) -> str:
        return f'{self.zip_path}@/{self.samples.name(index)}'

    def __getstate__(self):
        return dict(self.__dict__, _handle=None)


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
            if not pairs:
                raise DataError(f"image list '{list_path}' lists no images")
            self.samples = SampleTable(pairs)
        else:
            self.samples = _read_map(list_path, prefix=root)
        if self.samples.labels.min() < 0:
            raise DataError(f"image list '{list_path}' has a negative label")
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

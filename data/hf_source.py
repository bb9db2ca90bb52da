"""`DATA.DATASET hf`: images from a Hugging Face `datasets` dataset, memory-mapped.

Two layouts of `--data-path DIR`:
- a `DatasetDict` written by `save_to_disk` (`DIR/dataset_dict.json`, `DIR/<split>/*.arrow`);
- the Hub's parquet layout of `imagenet-1k`: `DIR/data/<split>-*.parquet` (or
  `DIR/<split>-*.parquet`), converted once by the library into Arrow files under
  `$HF_DATASETS_CACHE` (default `~/.cache/huggingface/datasets`) and reused from there.

Our 'train' split is `train`; our 'val' split is `validation` (the imagenet-1k name) or `val`.
Columns: `image` (the library's `Image` feature: a struct of encoded `bytes` and a `path`)
and `label` (a `ClassLabel`, or plain integers).

The source keeps no Python object per image: labels are one NumPy array and the images are
read straight from the memory-mapped Arrow files (encoded bytes, never decoded here), so
forked loader workers share the pages. A pickled source carries only the file names and
maps them again in the process that unpickles it.
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from utils import DataError

from .decode import DecodeError
from .sources import SampleTable, Source

SPLIT_NAMES = {'train': ('train',), 'val': ('validation', 'val')}
COLUMNS = ('image', 'label')


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError('DATA.DATASET hf needs the Hugging Face datasets library: '
                        'pip install datasets') from None
    return datasets


class _RowNames(SampleTable):
    """Labels as a NumPy array and names made from the row number on demand: no string per
    image is built (1.28M of them for ImageNet) when the rows have no names of their own."""

    def __init__(self, prefix: str, labels: np.ndarray):
        self.prefix = prefix
        self.labels = labels

    def name(self, index: int) -> str:
        return f'{self.prefix}[{index}]'


def _find_parquet(root: str, names: tuple[str, ...]) -> tuple[str, list[str]] | None:
    """(split name, sorted files) of the first split name with parquet files, or None."""
    for name in names:
        for folder in (os.path.join(root, 'data'), root):
            files = sorted(glob.glob(os.path.join(glob.escape(folder), f'{name}-*.parquet')))
            if files:
                return name, files
    return None


def _check_parquet(path: str) -> int:
    """The file's row count; DataError when it is not parquet or lacks a column."""
    try:
        meta = pq.ParquetFile(path).metadata
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"'{path}' is not a readable parquet file ({e})") from None
    _check_columns(schema, path)
    return meta.num_rows


def _check_columns(schema: pa.Schema, where: str) -> None:
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise DataError(f"'{where}' has no column {' or '.join(repr(c) for c in missing)} "
                        f"(its columns: {', '.join(schema.names) or 'none'}; expected 'image' and 'label')")
    image = schema.field('image').type
    if not (pa.types.is_binary(image) or pa.types.is_large_binary(image)
            or (pa.types.is_struct(image) and image.get_field_index('bytes') >= 0)):
        raise DataError(f"column 'image' of '{where}' is {image}, not an image "
                        f"(expected the datasets Image feature: a struct of bytes and path)")
    if not pa.types.is_integer(schema.field('label').type):
        raise DataError(f"column 'label' of '{where}' is {schema.field('label').type}, not integer "
                        f"class indices (expected a ClassLabel or int column)")


def _open_images(files: list[str]) -> tuple[list[pa.Array], np.ndarray]:
    """The `image` column's chunks across the Arrow files, memory-mapped (no copy), and the
    first row of each chunk."""
    chunks = []
    for path in files:
        with pa.memory_map(path) as source:  # the buffers keep the mapping alive
            chunks += pa.ipc.open_stream(source).read_all().column('image').chunks
    starts = np.cumsum([0] + [len(c) for c in chunks], dtype=np.int64)
    return chunks, starts


class HFSource(Source):
    """Split `split` ('train' or 'val') of the Hugging Face dataset at `root`."""

    def __init__(self, root: str, split: str):
        self.root = root
        datasets = _import_datasets()
        # (parquet file, its first row) of each file, for messages; empty for a saved dict
        self._parquet: list[tuple[str, int]] = []
        if os.path.isfile(os.path.join(root, 'dataset_dict.json')):
            ds, self.where = self._load_saved(datasets, root, split)
        else:
            ds, self.where, self._parquet = self._load_parquet(datasets, root, split)
        # the Arrow files behind the split: the saved ones, or the cache converted from parquet
        self._files = [f['filename'] for f in ds.cache_files]
        self.samples = _RowNames(self.where, self._labels(ds))
        self._setup_classes(ds.features['label'])
        self._chunks, self._starts = _open_images(self._files)
        if self._starts[-1] != len(self.samples):  # an indices mapping over the files: never saved
            raise DataError(f"'{self.where}' maps its rows through an indices file; save it again "
                            f"with save_to_disk")

    # --- layouts ------------------------------------------------------------------------

    @staticmethod
    def _load_saved(datasets, root: str, split: str):
        with open(os.path.join(root, 'dataset_dict.json')) as f:
            try:
                splits = json.load(f)['splits']
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"'{os.path.join(root, 'dataset_dict.json')}' is not a DatasetDict "
                                f"index ({e}); write the dataset with save_to_disk") from None
        name = next((n for n in SPLIT_NAMES[split] if n in splits), None)
        if name is None:
            raise DataError(f"the DatasetDict '{root}' has no split {' or '.join(SPLIT_NAMES[split])} "
                            f"(its splits: {', '.join(splits) or 'none'})")
        path = os.path.join(root, name)
        try:
            ds = datasets.Dataset.load_from_disk(path)
        except (FileNotFoundError, ValueError, pa.ArrowException, json.JSONDecodeError) as e:
            raise DataError(f"split '{path}' cannot be loaded ({type(e).__name__}: {e})") from None
        _check_columns(ds.data.schema, path)
        return ds, path

    @staticmethod
    def _load_parquet(datasets, root: str, split: str):
        found = _find_parquet(root, SPLIT_NAMES[split])
        if found is None:
            if _find_parquet(root, ('*',)) is None:
                raise DataError(f"'{root}' is neither a DatasetDict saved with save_to_disk (no "
                                f"dataset_dict.json) nor a parquet layout (no data/train-*.parquet)")
            raise DataError(f"'{root}' has no parquet files of split {' or '.join(SPLIT_NAMES[split])} "
                            f"(expected {root}/data/{SPLIT_NAMES[split][0]}-*.parquet)")
        name, files = found
        counts = [_check_parquet(f) for f in files]
        cache = datasets.config.HF_DATASETS_CACHE
        try:  # converted once into Arrow files under the cache; later runs map those
            ds = datasets.Dataset.from_parquet(files, cache_dir=str(cache), columns=list(COLUMNS))
        except PermissionError as e:
            raise DataError(f"cannot write the Arrow cache of '{files[0]}' under '{cache}' ({e}); "
                            f"set HF_DATASETS_CACHE to a writable folder") from None
        except datasets.exceptions.DatasetsError as e:  # e.g. shards whose columns differ
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"the parquet files '{os.path.dirname(files[0])}/{name}-*.parquet' cannot be "
                            f"read together ({first})") from None
        starts = np.cumsum([0] + counts[:-1]).tolist()
        return ds, os.path.dirname(files[0]), list(zip(files, starts))

    # --- labels and classes -------------------------------------------------------------

    def _labels(self, ds) -> np.ndarray:
        column = ds.data.column('label')
        if len(column) == 0:
            raise DataError(f"split '{self.where}' has no rows")
        if column.null_count:
            raise DataError(f"split '{self.where}' has {column.null_count} rows without a label")
        labels = np.asarray(column.to_numpy(), dtype=np.int64)
        if labels.min() < 0:
            bad = int(np.argmax(labels < 0))
            raise DataError(f"{self._locate(bad)} has a negative label ({labels[bad]}); "
                            f"unlabelled splits (such as imagenet-1k's test) cannot be trained or scored")
        return labels

    def _setup_classes(self, feature) -> None:
        labels = self.samples.labels
        names = getattr(feature, 'names', None)
        if names is None:
            self.classes, self.num_classes = None, int(labels.max()) + 1
            return
        self.classes, self.num_classes = list(names), len(names)
        if labels.max() >= self.num_classes:
            bad = int(np.argmax(labels >= self.num_classes))
            raise DataError(f"{self._locate(bad)} has label {labels[bad]}, outside the ClassLabel of "
                            f"{self.num_classes} classes")

    # --- reading ------------------------------------------------------------------------

    def _row(self, index: int):
        if self._chunks is None:  # unpickled in another process: map the files again
            self._chunks, self._starts = _open_images(self._files)
        k = int(np.searchsorted(self._starts, index, side='right')) - 1
        return self._chunks[k][index - int(self._starts[k])].as_py()

    def read(self, index: int) -> bytes:
        value = self._row(index)
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if value is None or (value.get('bytes') is None and not value.get('path')):
            raise DecodeError('the row has no image (neither bytes nor a path)')
        if value['bytes'] is not None:
            return value['bytes']
        path = value['path']
        if not os.path.isabs(path) and os.path.exists(os.path.join(self.where, path)):
            path = os.path.join(self.where, path)
        with open(path, 'rb') as f:  # OSError (missing, unreadable) is counted by the dataset
            return f.read()

    def _locate(self, index: int) -> str:
        """`<parquet file> row <r>`, or `<split folder>[<index>]` for a saved dict."""
        if self._parquet:
            file, start = next((f, s) for f, s in reversed(self._parquet) if s <= index)
            return f'{file} row {index - start}'
        return f'{self.where}[{index}]'

    def describe(self, index: int) -> str:
        where = self._locate(index)
        try:
            value = self._row(index)
            path = value.get('path') if isinstance(value, dict) else None
        except (pa.ArrowException, IndexError):
            path = None
        return f'{where} ({path})' if path else where

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_chunks'], state['_starts'] = None, None
        return state

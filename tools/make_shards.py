"""Write WebDataset shards (`DATA.DATASET wds`) from an ImageFolder or zip layout:

    python tools/make_shards.py /data/imagenet /data/imagenet-wds            # train/ and val/ folders
    python tools/make_shards.py /data/imagenet /data/imagenet-wds --zip      # train.zip + train_map.txt, ...

Each split becomes `<split>-000000.tar`, `<split>-000001.tar`, ... written with WebDataset's
ShardWriter. A sample holds the original encoded image (`jpg`, `png` or `webp`; other formats
are stored as lossless PNG), its class index (`cls`, decimal text, the label the folder or
map gives) and its original file name (`fname`). Samples keep the source's order; the
training loader shuffles. A folder layout's class names go to `classes.txt`. The shards are
written into a temporary folder beside OUT_DIR, renamed into place when complete.
"""
from __future__ import annotations

import argparse
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image

from data.shards import CLASSES_FILE
from data.sources import FolderSource, Source, ZipSource
from utils import DataError, write_folder_atomically

KEPT_FORMATS = {'.jpg': 'jpg', '.jpeg': 'jpg', '.png': 'png', '.webp': 'webp'}


def _parse(argv):
    parser = argparse.ArgumentParser(description='Write WebDataset tar shards from an ImageFolder or zip layout.')
    parser.add_argument('data_path', metavar='DATA_PATH', help='dataset root with train/ and val/ (or the zips)')
    parser.add_argument('out_dir', metavar='OUT_DIR', help='folder to create for the shards (must not exist)')
    parser.add_argument('--zip', action='store_true', help='read <split>.zip + <split>_map.txt (DATA.ZIP_MODE)')
    parser.add_argument('--splits', nargs='+', default=['train', 'val'], help='splits to write (default: train val)')
    parser.add_argument('--maxcount', type=int, default=10000, help='samples per shard at most (default 10000)')
    parser.add_argument('--maxsize', type=float, default=1e9, help='bytes per shard at most (default 1e9)')
    return parser.parse_args(argv)


def open_split(data_path: str, split: str, zipped: bool) -> Source:
    if zipped:
        return ZipSource(os.path.join(data_path, f'{split}.zip'), os.path.join(data_path, f'{split}_map.txt'))
    return FolderSource(os.path.join(data_path, split))


def sample(source: Source, index: int) -> dict:
    """The WebDataset sample of one source image."""
    name = source.samples.name(index)
    if isinstance(source, FolderSource):  # the path under the split folder, as in the map files
        name = os.path.relpath(name, source.root)
    data = source.read(index)
    kind = KEPT_FORMATS.get(os.path.splitext(name)[1].lower())
    if kind is None:  # bmp, tiff, ppm...: the pixels as PNG
        with Image.open(io.BytesIO(data)) as img:
            out = io.BytesIO()
            img.save(out, format='PNG')
        data, kind = out.getvalue(), 'png'
    return {'__key__': f'{index:08d}', kind: data, 'cls': str(source.label(index)), 'fname': name}


def write_split(source: Source, pattern: str, maxcount: int, maxsize: float) -> int:
    """Write every sample of `source` to shards named by `pattern`; the shard count."""
    import webdataset as wds  # imported here: only this tool writes shards
    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0) as writer:
        for index in range(len(source)):
            writer.write(sample(source, index))
        return writer.shard  # the number of the next shard: one is open from the start


def make_shards(data_path: str, out_dir: str, splits, zipped: bool, maxcount: int, maxsize: float) -> dict:
    """Write the shards of `splits` into a new `out_dir`; {split: (images, shards)}."""
    sources = {split: open_split(data_path, split, zipped) for split in splits}
    names = {split: s.classes for split, s in sources.items() if s.classes}
    if len({tuple(c) for c in names.values()}) > 1:
        raise DataError(f"the class folders of {' and '.join(names)} in '{data_path}' differ; labels would not match")

    def fill(folder: str) -> dict:
        written = {}
        for split, source in sources.items():
            shards = write_split(source, os.path.join(folder, f'{split}-%06d.tar'), maxcount, maxsize)
            written[split] = (len(source), shards)
        classes = next((s.classes for s in sources.values() if s.classes), None)
        if classes:
            with open(os.path.join(folder, CLASSES_FILE), 'w', encoding='utf-8') as f:
                f.write(''.join(name + '\n' for name in classes))
        return written
    written = write_folder_atomically(out_dir, fill)
    if written is None:
        raise DataError(f"'{out_dir}' was created by another process while the shards were written")
    return written


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if os.path.exists(args.out_dir):
        print(f"error: '{args.out_dir}' exists; pass a new folder for the shards", file=sys.stderr)
        return 2
    if args.maxcount < 1 or args.maxsize < 1:
        print('error: --maxcount and --maxsize must be positive', file=sys.stderr)
        return 2
    try:
        written = make_shards(args.data_path, args.out_dir, args.splits, args.zip, args.maxcount, args.maxsize)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write '{args.out_dir}' ({e.strerror})", file=sys.stderr)
        return 2
    for split, (images, shards) in written.items():
        print(f'{split}: {images} images in {shards} shards')
    return 0


if __name__ == '__main__':
    sys.exit(main())

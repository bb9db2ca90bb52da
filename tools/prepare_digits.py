"""Write scikit-learn's handwritten digits (1,797 real 8x8 scans, bundled, no download)
as the ImageFolder tree of JPEGs the README demo trains on:

    python tools/prepare_digits.py data/digits

main.py writes the same tree on first use when DATA.PREPARE is 'digits'; this tool is for
preparing it ahead of time or somewhere else.
"""
from __future__ import annotations

import argparse
import os
import sys

# Run as a script from any directory: the repo root holds the `data` package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.prepare import prepare_dataset


def _count_images(root: str) -> dict[str, int]:
    return {split: sum(len(files) for _, _, files in os.walk(os.path.join(root, split)))
            for split in ('train', 'val')}


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when the tree is there afterwards, 2 on a user mistake (one line)."""
    parser = argparse.ArgumentParser(description='Write the scikit-learn digits as a '
                                     'train/val ImageFolder tree of 32x32 JPEGs.')
    parser.add_argument('out_dir', metavar='OUT_DIR', help='folder to create (must not exist yet)')
    args = parser.parse_args(argv)
    out = args.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        print(f"error: '{out}' exists and is not a directory; pass a new folder", file=sys.stderr)
        return 2
    try:
        wrote = prepare_dataset('digits', out)
    except OSError as e:
        where = f"{e.strerror}: '{e.filename}'" if e.filename else str(e)
        print(f"error: cannot create '{out}' ({where}); OUT_DIR must be a new folder under a "
              f"writable directory", file=sys.stderr)
        return 2
    if not wrote:
        print(f"'{out}' already exists; left as it is")
        return 0
    counts = _count_images(out)
    print(f"wrote {counts['train'] + counts['val']} images ({counts['train']} train / "
          f"{counts['val']} val) to '{out}'")
    return 0


if __name__ == '__main__':
    sys.exit(main())

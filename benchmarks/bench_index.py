"""Indexes at ImageNet scale: time to the first training batch and the memory of the main
process and of each loader worker, for the zip, folder, WebDataset shard and ImageNet-22k list
layouts.

Generates, once (reused while the counts are the same), under --root:

- zip/: the official zip layout, `train.zip` (--entries tiny identical JPEGs, stored) with
  `train_map.txt` (`<member>\\t<label>` lines), and a one-image-per-class val split;
- folder/: an ImageFolder tree `train/<class>/<image>.JPEG` of --classes classes, every file
  a hard link to its class's tiny JPEG (fast to make, small on disk; one file per class keeps
  under the file system's link limit), and the same small val split;
- wds/: WebDataset shards `train-%06d.tar` of 10,000 samples (jpg, cls, fname), written with
  WebDataset's ShardWriter as tools/make_shards.py does, and the same small val split;
- list/: the ImageNet-22k layout's `ILSVRC2011fall_whole_map_train.txt` of --list-entries
  `<path> <label>` lines over 21,841 classes, no images.

Each layout is measured in a fresh process (so peak memory is its own):

- first batch: seconds from start to `next(iter(loader_train))` through `data.build_loader`
  (the index is built here) with --workers forked workers, as a training run does
  (DATA.CACHE_MODE from --cache-mode, 'no' by default: the cache is another subject);
- a full pass over the index: a loader with --workers workers over a dataset whose items are
  chunks of the training sampler's order; every worker touches each index it gets (name,
  label, and for the zip, folder and shard layouts the bytes of the image through `source.read`,
  without decoding). Each worker reports its memory (psutil `memory_full_info`: USS, the
  pages only it holds; PSS, its share of all it maps) on its first, empty item and after its
  last chunk; growth = USS after - USS before. The list layout has no images: its workers
  touch names and labels only, and there is no first batch.

    python benchmarks/bench_index.py                               # 1.28M zip + folder, 14.2M list
    python benchmarks/bench_index.py --entries 200000 --list-entries 2000000
    python benchmarks/bench_index.py --layouts zip --workers 4
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cli import Parser, fail

LAYOUTS = ('zip', 'folder', 'list', 'wds')
SHARD_SAMPLES = 10_000  # samples per WebDataset shard (128 shards at 1.28M)
LIST_CLASSES = 21841
MARKER = '.bench_index.json'
GOAL_FIRST_BATCH_S = 60.0  # zip layout, 1.28M entries
GOAL_WORKER_GROWTH_MB = 50.0
MB = 2 ** 20



# ----------------------------------------------------------------------------- generation

def tiny_jpeg() -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.new('RGB', (8, 8), (120, 30, 200)).save(out, 'JPEG', quality=75)
    return out.getvalue()


def member_name(label: int, i: int) -> str:
    """An official-looking name: n<wnid>/n<wnid>_<i>.JPEG."""
    return f'n{label:08d}/n{label:08d}_{i}.JPEG'


def _labels(entries: int, classes: int) -> range:
    return range(entries)  # entry i has label i % classes (classes interleaved, as a shuffled map)


def write_zip_split(root: str, split: str, entries: int, classes: int, jpeg: bytes) -> None:
    with zipfile.ZipFile(os.path.join(root, f'{split}.zip'), 'w', zipfile.ZIP_STORED) as zf, \
            open(os.path.join(root, f'{split}_map.txt'), 'w') as mf:
        lines = []
        for i in _labels(entries, classes):
            name = member_name(i % classes, i)
            zf.writestr(name, jpeg)
            lines.append(f'{name}\t{i % classes}\n')
            if len(lines) == 65536:
                mf.write(''.join(lines))
                lines = []
        mf.write(''.join(lines))


def write_folder_split(root: str, split: str, entries: int, classes: int, jpeg: bytes) -> None:
    top = os.path.join(root, split)
    for c in range(classes):
        os.makedirs(os.path.join(top, f'n{c:08d}'))
    for i in _labels(entries, classes):
        path = os.path.join(top, f'n{i % classes:08d}', f'n{i % classes:08d}_{i}.JPEG')
        if i < classes:
            with open(path, 'wb') as f:
                f.write(jpeg)
        else:
            os.link(os.path.join(top, f'n{i % classes:08d}', f'n{i % classes:08d}_{i % classes}.JPEG'), path)


def write_shards(root: str, split: str, entries: int, classes: int, jpeg: bytes) -> None:
    """`<split>-%06d.tar` shards as tools/make_shards.py writes them (jpg, cls, fname)."""
    import webdataset as wds
    with wds.ShardWriter(os.path.join(root, f'{split}-%06d.tar'), maxcount=SHARD_SAMPLES, verbose=0) as writer:
        for i in _labels(entries, classes):
            writer.write({'__key__': f'{i:08d}', 'jpg': jpeg, 'cls': str(i % classes),
                          'fname': member_name(i % classes, i)})


def write_list(root: str, split: str, entries: int) -> None:
    with open(os.path.join(root, f'ILSVRC2011fall_whole_map_{split}.txt'), 'w') as f:
        step = 1 << 18
        for start in range(0, entries, step):
            f.write(''.join(f'{member_name(i % LIST_CLASSES, i)} {i % LIST_CLASSES}\n'
                            for i in range(start, min(entries, start + step))))


def prepare(root: str, layout: str, entries: int, classes: int) -> str:
    """Make root/<layout> unless a complete one with the same counts is there; what was done."""
    folder = os.path.join(root, layout)
    marker = os.path.join(folder, MARKER)
    wanted = {'entries': entries, 'classes': classes, 'complete': True}
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == wanted:
                return 'reused'
    if os.path.exists(folder) and not os.path.isfile(marker):
        fail(f"'{folder}' exists and was not made by this script; give another --root")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    with open(marker, 'w') as f:
        json.dump(dict(wanted, complete=False), f)
    tic = time.perf_counter()
    jpeg = tiny_jpeg()
    if layout == 'zip':
        write_zip_split(folder, 'train', entries, classes, jpeg)
        write_zip_split(folder, 'val', classes, classes, jpeg)
    elif layout == 'folder':
        write_folder_split(folder, 'train', entries, classes, jpeg)
        write_folder_split(folder, 'val', classes, classes, jpeg)
    elif layout == 'wds':
        write_shards(folder, 'train', entries, classes, jpeg)
        write_shards(folder, 'val', classes, classes, jpeg)
    else:
        os.makedirs(os.path.join(folder, 'images'))  # DATA_PATH must exist; the list names no real files
        write_list(folder, 'train', entries)
        write_list(folder, 'val', LIST_CLASSES)
    with open(marker, 'w') as f:
        json.dump(wanted, f)
    return f'made in {time.perf_counter() - tic:.0f} s'


# ----------------------------------------------------------------------------- measurement
# (runs in a fresh child process per layout)

def memory() -> dict:
    import psutil
    info = psutil.Process().memory_full_info()
    return {'pid': os.getpid(), 'uss': info.uss, 'pss': info.pss, 'rss': info.rss}


class TouchChunks:
    """Items are lists of indices; an item touches each index's entry (name, label, and the
    image bytes when `read`) and returns this process's memory. Empty items only report."""

    def __init__(self, source, read: bool):
        self.source, self.read = source, read

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, indices: list[int]) -> dict:
        nbytes = 0
        for i in indices:
            name, label = self.source.samples[i]
            nbytes += len(name) + label
            if self.read:
                nbytes += len(self.source.read(i))
        return dict(memory(), n=len(indices), bytes=nbytes)


def touch_pass(source, order: list[int], workers: int, read: bool, chunk: int) -> list[dict]:
    """Per worker: memory before (its first item, empty) and after touching its share of `order`.
    The loader deals items to workers round-robin, so the first and last `workers` items
    (empty) reach every worker once."""
    from torch.utils.data import DataLoader
    chunks = [order[s:s + chunk] for s in range(0, len(order), chunk)]
    items = [[]] * workers + chunks + [[]] * workers
    loader = DataLoader(TouchChunks(source, read), batch_size=None, sampler=items, num_workers=workers,
                        multiprocessing_context='fork', prefetch_factor=2)
    first, last, touched = {}, {}, {}
    for out in loader:
        first.setdefault(out['pid'], out)
        last[out['pid']] = out
        touched[out['pid']] = touched.get(out['pid'], 0) + out['n']
    return [{'pid': pid, 'touched': touched[pid], 'uss_before': first[pid]['uss'], 'uss': last[pid]['uss'],
             'pss': last[pid]['pss'], 'rss': last[pid]['rss']} for pid in first]


def config_for(layout: str, root: str, workers: int, batch: int, cache_mode: str):
    import config as config_module
    cfg = config_module.default_config()
    cfg.DATA.DATA_PATH = root
    cfg.DATA.BATCH_SIZE = batch
    cfg.DATA.NUM_WORKERS = workers
    cfg.DATA.PIN_MEMORY = False
    cfg.DATA.CACHE_MODE = cache_mode
    cfg.DATA.ZIP_MODE = layout == 'zip'
    if layout in ('list', 'wds'):
        cfg.DATA.DATASET = 'imagenet22k' if layout == 'list' else 'wds'
    cfg.freeze()
    return cfg


def measure(layout: str, root: str, args) -> dict:
    tic = time.perf_counter()
    import logging

    import torch  # noqa: F401  (the import is part of a run's start)

    from data import build_datasets, build_loaders
    from data.build import _set_num_classes, data_num_classes
    cfg = config_for(layout, root, args.workers, args.batch_size, args.cache_mode)
    logger = logging.getLogger('bench_index')
    base = memory()
    import_s = time.perf_counter() - tic
    train, val = build_datasets(cfg, 0, 1, logger)
    index_s = time.perf_counter() - tic - import_s
    after_index = memory()
    peak_index = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    _set_num_classes(cfg, data_num_classes(cfg, train, val), logger)
    first_batch_s = None
    loader_train, _, _ = build_loaders(cfg, train, val, 0, 1)
    if layout != 'list':  # the list layout has no images to batch
        images, _ = next(iter(loader_train))
        first_batch_s = time.perf_counter() - tic
        assert images.shape[0] == args.batch_size
        loader_train._iterator._shutdown_workers()  # persistent workers: stop them before the pass
    order = list(loader_train.sampler)
    del loader_train
    tic = time.perf_counter()
    workers = touch_pass(train.source, order, args.workers, layout != 'list', args.chunk)
    pass_s = time.perf_counter() - tic
    assert sum(w['touched'] for w in workers) == len(train)
    return {'layout': layout, 'entries': len(train), 'import_s': import_s, 'index_s': index_s,
            'first_batch_s': first_batch_s,
            'pass_s': pass_s, 'main_before_index': base, 'main_after_index': after_index,
            'main_after_pass': memory(), 'main_peak_rss_index': peak_index,
            'workers': workers}


# ----------------------------------------------------------------------------- report

def print_table(results: list[dict], workers: int, footer: bool = True) -> None:
    head = (f"{'layout':7s} {'entries':>10s} {'import s':>8s} {'index s':>8s} {'1st batch s':>11s} {'pass s':>7s} "
            f"{'main USS MB':>11s} {'main peak MB':>12s} {'worker USS growth MB (max)':>26s} "
            f"{'worker USS MB':>13s} {'worker PSS MB':>13s}")
    print(head)
    print('-' * len(head))
    for r in results:
        ws = r['workers']
        growth = max((w['uss'] - w['uss_before']) / MB for w in ws)
        uss = max(w['uss'] for w in ws) / MB
        pss = max(w['pss'] for w in ws) / MB
        first = f"{r['first_batch_s']:.1f}" if r['first_batch_s'] is not None else '-'
        print(f"{r['layout']:7s} {r['entries']:10d} {r['import_s']:8.1f} {r['index_s']:8.1f} {first:>11s} "
              f"{r['pass_s']:7.1f} "
              f"{r['main_after_index']['uss'] / MB:11.0f} {r['main_peak_rss_index'] / MB:12.0f} "
              f"{growth:26.1f} {uss:13.1f} {pss:13.1f}")
    if footer:
        print(f"(workers: {workers} per layout; worker columns are the largest over the workers; index s: "
              f"build_datasets (train + val); 1st batch s: from the start, imports included; main USS and\n"
              f" peak RSS: right after build_datasets, before the loaders and the pass's own index lists)")


def goals(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        growth = max((w['uss'] - w['uss_before']) / MB for w in r['workers'])
        ok = growth < GOAL_WORKER_GROWTH_MB
        lines.append(f"goal: {r['layout']} worker USS growth < {GOAL_WORKER_GROWTH_MB:.0f} MB: "
                     f"{'MET' if ok else 'NOT MET'} ({growth:.1f})")
        if r['layout'] == 'zip':
            ok = r['first_batch_s'] < GOAL_FIRST_BATCH_S
            lines.append(f"goal: zip first batch < {GOAL_FIRST_BATCH_S:.0f} s: {'MET' if ok else 'NOT MET'} "
                         f"({r['first_batch_s']:.1f} s for {r['entries']} entries)")
    return lines


def main() -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--root', default='bench_results/bench_index', help='where the layouts are made (reused)')
    p.add_argument('--layouts', default='zip,folder,list,wds', help='comma-separated: zip, folder, list, wds')
    p.add_argument('--entries', type=int, default=1_281_167, help='training entries of the zip and folder layouts')
    p.add_argument('--classes', type=int, default=1000, help='classes of the zip and folder layouts')
    p.add_argument('--list-entries', type=int, default=14_197_122, help='entries of the 22k list layout')
    p.add_argument('--workers', type=int, default=8)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--chunk', type=int, default=4096, help='indices per item of the full pass')
    p.add_argument('--cache-mode', default='no', choices=['no', 'part', 'full'], help='DATA.CACHE_MODE')
    p.add_argument('--json', default='bench_results/bench_index.json')
    p.add_argument('--measure', help=argparse.SUPPRESS)  # internal: measure one layout in this process
    args = p.parse_args()
    for name in ('entries', 'classes', 'list_entries', 'workers', 'batch_size', 'chunk'):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.measure:
        print(json.dumps(measure(args.measure, os.path.join(args.root, args.measure), args)))
        return
    layouts = [s.strip() for s in args.layouts.split(',') if s.strip()]
    for layout in layouts:
        if layout not in LAYOUTS:
            fail(f"unknown layout '{layout}' in --layouts (known: {', '.join(LAYOUTS)})")
    if args.entries < max(args.classes, args.batch_size):
        fail(f'--entries {args.entries} must be at least --classes and --batch-size')
    root = os.path.abspath(args.root)
    results = []
    for layout in layouts:
        entries = args.list_entries if layout == 'list' else args.entries
        done = prepare(root, layout, entries, args.classes)
        print(f'{layout}: {entries} entries, {done}', flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), '--measure', layout, '--root', root,
               '--workers', str(args.workers), '--batch-size', str(args.batch_size), '--chunk', str(args.chunk),
               '--cache-mode', args.cache_mode]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            fail(f'measuring {layout} failed (exit {out.returncode}; its error is above)')
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print_table(results[-1:], args.workers, footer=False)  # as it comes: a later layout may fail
    print()
    print_table(results, args.workers)
    lines = goals(results)
    for line in lines:
        print(line)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
        json.dump({'settings': {k: v for k, v in vars(args).items() if k != 'measure'}, 'results': results,
                   'goals': lines}, f, indent=1)
    print(f'wrote {args.json}')


if __name__ == '__main__':
    main()

"""Data-loading speed: the official Swin pipeline against ours, in images/s per worker core.

Both pipelines read the same ImageFolder tree of ImageNet-sized JPEGs (500x375 and
375x500, made once from the two photographs scikit-learn ships and cached on disk):

- baseline ("official"): torchvision ImageFolder + timm's create_transform (RandomResizedCrop,
  flip, RandAugment, ToTensor, Normalize, RandomErasing) for train, Resize(256) + CenterCrop(224)
  + ToTensor + Normalize for val; float batches leave the workers;
- ours: `data.build_loader(config)`, uint8 batches (decode, crop, flip, RandAugment done in the
  workers); optionally with DATA.REDUCED_DECODE (DCT-scaled JPEG decode). The rest (float,
  normalize, random erasing, mixup) is `data.DevicePreprocessor` + mixup on the training device;
  it is GPU work in real training, so it is not counted against the loader, but its CPU cost
  per batch is printed on a line of its own.

REDUCED_DECODE only decodes at reduced scale when the crop is at least twice the output on
both sides; at 500x375 that never happens (neither for train crops nor for val's resize to
256), so on the default images its row repeats plain ours and their difference is noise.
Point --images at larger photos to see its effect.

Two kinds of rows per split:
- loader, W workers: after --warmup-batches (2; they also cover the worker start) N batches are
  timed; the workers are shut down after each run so that no pipeline prefetches while the
  other is timed. images/s per core = images/s / W (the main process only consumes).
- per-core (no loader): `dataset[i]` called in this process with one torch thread, i.e. the
  per-image cost of one worker without the loader machinery.

Rounds alternate the order of the pipelines so slow phases of a noisy machine hit all of them;
the table reports medians over rounds and the median of the per-round ratios ours/baseline.
Writes every measurement to JSON.

    python benchmarks/bench_data.py                                # 3 rounds, 8 batches of 64, 1 worker
    python benchmarks/bench_data.py --workers 2 --rounds 5
    python benchmarks/bench_data.py --rounds 1 --batches 3 --train-images 128 --val-images 64
    python benchmarks/bench_data.py --images /data/imagenet-subset  # any train/ + val/ ImageFolder tree
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import PIL
import timm
import torchvision
from bench_cli import Parser, fail
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

import config as config_module
from data import DataError, DevicePreprocessor, build_loader
from data.transforms import allow_zero_bit_posterize
from utils import synchronize

SPLITS = ('train', 'val')
BASELINE, OURS, OURS_RD = 'baseline', 'ours', 'ours + REDUCED_DECODE'
LABELS = {BASELINE: 'baseline (official)', OURS: 'ours', OURS_RD: 'ours + REDUCED_DECODE'}
GOALS = {'train': 2.0, 'val': 1.5}  # ours / baseline images/s per core, loader rows
MARKER = '.bench_data_images.json'  # written into a cache folder this script made
PHOTOS = ('china.jpg', 'flower.jpg')
SHAPES = ((500, 375), (500, 375), (375, 500))  # (width, height): 2/3 landscape, 1/3 portrait
_PHOTOS: list[Image.Image] = []  # the two photos, loaded once (and inherited by forked writers)



# ----------------------------------------------------------------------------- images

def _count_images(root: str, split: str) -> int:
    """JPEGs under root/split/<class>/ (0 when the folder is missing)."""
    top = os.path.join(root, split)
    if not os.path.isdir(top):
        return 0
    return sum(1 for c in os.scandir(top) if c.is_dir()
               for f in os.scandir(c.path) if f.name.lower().endswith('.jpg'))


def _crop_box(rng: random.Random, width: int, height: int, aspect: float) -> tuple[int, int, int, int]:
    """A random box of the given aspect, 60-100% of the largest one that fits, anywhere in the photo."""
    full_w, full_h = (width, width / aspect) if width / height <= aspect else (height * aspect, height)
    scale = rng.uniform(0.6, 1.0)
    w, h = max(1, round(full_w * scale)), max(1, round(full_h * scale))
    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    return left, top, left + w, top + h


def _photos() -> list[Image.Image]:
    if not _PHOTOS:
        try:
            import sklearn.datasets
        except ImportError:
            fail('the benchmark images are made from scikit-learn\'s sample photos; pip install scikit-learn')
        folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), 'images')
        for name in PHOTOS:
            with Image.open(os.path.join(folder, name)) as img:
                _PHOTOS.append(img.convert('RGB'))
    return _PHOTOS


def _plan_images(root: str, counts: dict[str, int], classes: int) -> list[tuple]:
    """(photo, size, box, flip, path) of every image, drawn in one seeded order, so the images
    are the same however many processes write them."""
    photos = _photos()
    rng = random.Random(0)
    jobs = []
    for split in SPLITS:
        for i in range(counts[split]):
            p = rng.randrange(len(photos))  # what rng.choice(photos) draws
            size = rng.choice(SHAPES)
            box = _crop_box(rng, photos[p].width, photos[p].height, size[0] / size[1])
            flip = rng.random() < 0.5
            path = os.path.join(root, split, f'class_{i % classes:02d}', f'{split}_{i:05d}.jpg')
            jobs.append((p, size, box, flip, path))
    return jobs


def _write_image(job: tuple) -> None:
    p, size, box, flip, path = job
    img = _photos()[p].resize(size, Image.Resampling.BICUBIC, box=box)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img.save(path, quality=90)


def make_images(root: str, counts: dict[str, int], classes: int) -> None:
    """ImageFolder tree root/{train,val}/<class>/*.jpg of random crops of the two photos,
    written by one process per core when there are many (a few thousand take a minute alone)."""
    jobs = _plan_images(root, counts, classes)
    for split in SPLITS:
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f'class_{c:02d}'), exist_ok=True)
    processes = min(os.cpu_count() or 1, len(jobs) // 256)
    if processes < 2 or 'fork' not in multiprocessing.get_all_start_methods():
        for job in jobs:
            _write_image(job)
        return
    with multiprocessing.get_context('fork').Pool(processes) as pool:  # forked: the photos are loaded
        for _ in pool.imap_unordered(_write_image, jobs, chunksize=32):
            pass


def prepare_images(root: str, counts: dict[str, int], classes: int, batch_size: int) -> str:
    """Reuse, (re)make or accept the image folder; returns what was done, for the log."""
    if os.path.exists(root) and not os.path.isdir(root):
        fail(f"--images '{root}' is not a directory")
    marker = os.path.join(root, MARKER)
    wanted = {'counts': counts, 'classes': classes, 'complete': True}
    if os.path.isdir(root) and not os.path.isfile(marker) and os.listdir(root):
        # not made by this script: use it as it is if it looks like a dataset, never delete it
        if all(os.path.isdir(os.path.join(root, s)) for s in SPLITS):
            return 'used as given (not made by this script)'
        fail(f"--images '{root}' is neither an image cache made by this script nor a folder with "
             f"train/ and val/; give a new or empty folder")
    if classes > min(counts.values()):
        fail(f'--classes {classes} needs at least that many train and val images (every class folder '
             f'must hold an image)')
    if counts['train'] < batch_size:
        fail(f"--train-images {counts['train']} is fewer than one batch of --batch-size {batch_size}")
    if os.path.isfile(marker):
        try:
            with open(marker) as f:
                made = json.load(f)
        except (OSError, ValueError):
            made = None
        if made == wanted and all(_count_images(root, s) == counts[s] for s in SPLITS):
            return 'reused'
    try:
        os.makedirs(root, exist_ok=True)
        with open(marker, 'w') as f:  # first, so an interrupted run is recognized as ours
            json.dump(dict(wanted, complete=False), f)
        for split in SPLITS:
            shutil.rmtree(os.path.join(root, split), ignore_errors=True)
        tic = time.perf_counter()
        make_images(root, counts, classes)
        with open(marker, 'w') as f:
            json.dump(wanted, f)
    except OSError as e:
        fail(f"cannot write the benchmark images to '{root}': {e.strerror or e}")
    return f'made in {time.perf_counter() - tic:.1f} s'


# ----------------------------------------------------------------------------- pipelines

def baseline_transform(split: str):
    """The official Swin-T transforms (timm's create_transform / resize + center crop)."""
    if split == 'train':
        train = create_transform(224, is_training=True, color_jitter=0.4, auto_augment='rand-m9-mstd0.5-inc1',
                                 re_prob=0.25, re_mode='pixel', re_count=1, interpolation='bicubic')
        allow_zero_bit_posterize(train)  # the fix ours has too, or Pillow 13 stops the baseline
        return train
    return transforms.Compose([
        transforms.Resize(256, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def baseline_dataset(root: str, split: str) -> datasets.ImageFolder:
    return datasets.ImageFolder(os.path.join(root, split), transform=baseline_transform(split))


def baseline_loader(root: str, split: str, batch: int, workers: int) -> DataLoader:
    train = split == 'train'
    return DataLoader(baseline_dataset(root, split), batch_size=batch, shuffle=train, num_workers=workers,
                      drop_last=train, persistent_workers=True)


def our_config(root: str, batch: int, workers: int, reduced: bool):
    """The default config pointed at `root`, frozen."""
    cfg = config_module.default_config()
    cfg.DATA.DATA_PATH = root
    cfg.DATA.BATCH_SIZE = batch
    cfg.DATA.NUM_WORKERS = workers
    cfg.DATA.IMG_SIZE = 224
    cfg.DATA.REDUCED_DECODE = reduced
    cfg.DATA.PIN_MEMORY = False
    cfg.freeze()
    return cfg


def our_build(root: str, batch: int, workers: int, reduced: bool) -> tuple:
    """(config, dataset_train, dataset_val, loader_train, loader_val, mixup_fn)."""
    cfg = our_config(root, batch, workers, reduced)
    try:
        return (cfg,) + tuple(build_loader(cfg, rank=0, world_size=1))
    except DataError as e:
        fail(str(e))


# ----------------------------------------------------------------------------- timing

def time_loader(loader: DataLoader, warmup: int, batches: int) -> tuple[float, tuple | None]:
    """(seconds for `batches` batches after `warmup` ones, the last batch); epochs are chained
    when the split is shorter. The workers are shut down before returning, so none keeps
    prefetching while another pipeline is timed."""
    it = iter(loader)

    def next_batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(loader)  # persistent workers: the next epoch on the same workers
            return next(it)

    try:
        for _ in range(warmup):
            next_batch()
        tic = time.perf_counter()
        batch = None
        for _ in range(batches):
            batch = next_batch()
        return time.perf_counter() - tic, batch
    finally:
        # with persistent workers the loader keeps the iterator (and its workers) alive;
        # DataLoader has no public shutdown, so use the iterator's own one
        shutdown = getattr(it, '_shutdown_workers', None)
        if shutdown is not None:
            shutdown()
        loader._iterator = None


def time_items(dataset, indices: list[int]) -> float:
    """Seconds per `dataset[i]` call in this process (after 3 untimed calls)."""
    for i in indices[:3]:
        dataset[i]
    tic = time.perf_counter()
    for i in indices:
        dataset[i]
    return (time.perf_counter() - tic) / len(indices)


def loader_factory(variant: str, root: str, split: str, args) -> Callable[[], DataLoader]:
    if variant == BASELINE:
        return lambda: baseline_loader(root, split, args.batch_size, args.workers)
    reduced = variant == OURS_RD

    def make() -> DataLoader:
        _, _, _, loader_train, loader_val, _ = our_build(root, args.batch_size, args.workers, reduced)
        return loader_train if split == 'train' else loader_val
    return make


def item_datasets(args, root: str, variants: list[str]) -> dict[str, dict]:
    """{variant: {split: dataset}} for the per-core rows; checks the folder can be read."""
    items = {}
    for v in variants:
        if v == BASELINE:
            try:
                items[v] = {s: baseline_dataset(root, s) for s in SPLITS}
            except (OSError, RuntimeError) as e:  # torchvision: FileNotFoundError for an empty class
                fail(f"torchvision ImageFolder cannot read '{root}': {e}")
        else:
            _, train, val, _, _, _ = our_build(root, args.batch_size, args.workers, v == OURS_RD)
            items[v] = {'train': train, 'val': val}
        if len(items[v]['train']) < args.batch_size:
            fail(f"the training split of '{root}' has {len(items[v]['train'])} images, fewer than one batch "
                 f"of {args.batch_size}; lower --batch-size or raise --train-images")
    return items


def measure(args, root: str, variants: list[str], items: dict[str, dict]) -> tuple[list[dict], tuple | None]:
    """All rows (loader and per-core, each split and variant) over alternating rounds, and one
    uint8 training batch of ours for the device-step timing."""
    images = {(kind, split, v): [] for kind in ('loader', 'per-core') for split in SPLITS for v in variants}
    order_rng = random.Random(1)
    our_batch = None
    n_loader = args.batches * args.batch_size
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        print(f'round {r + 1}/{args.rounds}: {" / ".join(order)}', flush=True)
        for split in SPLITS:
            for v in order:
                seconds, batch = time_loader(loader_factory(v, root, split, args)(), args.warmup_batches,
                                             args.batches)
                if split == 'train' and v != BASELINE and (our_batch is None or v == OURS):
                    our_batch = batch  # for the device-step timing; plain decode preferred
                images[('loader', split, v)].append(n_loader / seconds)
                print(f'  loader    {split:5s} {LABELS[v]:22s} {n_loader / seconds:8.1f} img/s '
                      f'({args.workers} worker{"s" if args.workers > 1 else ""})', flush=True)
        for split in SPLITS:
            length = len(items[order[0]][split])
            indices = [order_rng.randrange(length) for _ in range(args.per_core_images)]
            for v in order:
                ips = 1.0 / time_items(items[v][split], indices)
                images[('per-core', split, v)].append(ips)
                print(f'  per-core  {split:5s} {LABELS[v]:22s} {ips:8.1f} img/s (no loader, 1 thread)', flush=True)
    rows = []
    for (kind, split, v), values in images.items():
        cores = args.workers if kind == 'loader' else 1
        base = images[(kind, split, BASELINE)] if BASELINE in variants else None
        ratios = [o / b for o, b in zip(values, base)] if base else None
        ips = statistics.median(values)
        rows.append({'kind': kind, 'split': split, 'pipeline': v, 'cores': cores,
                     'images_per_s': ips, 'images_per_s_per_core': ips / cores,
                     'ms_per_image_per_core': 1e3 * cores / ips,
                     'ratio_vs_baseline_median': statistics.median(ratios) if ratios else None,
                     'all_images_per_s': values, 'all_ratios': ratios})
    return rows, our_batch


def time_device_step(root: str, args, batch: tuple, device: torch.device, repeats: int = 5) -> dict:
    """Median time of DevicePreprocessor (float, normalize, random erasing) and mixup on one of
    our uint8 training batches on `device`: the work ours moves off the loader."""
    cfg, _, _, _, _, mixup_fn = our_build(root, args.batch_size, args.workers, False)
    prep = DevicePreprocessor(cfg, device, is_train=True)
    images, targets = batch
    if mixup_fn is not None and len(images) % 2:
        mixup_fn = None  # timm's mixup mixes pairs: an odd batch cannot be mixed

    prep_s, mix_s = [], []
    for i in range(repeats + 1):  # the first is a warm-up
        synchronize(device)
        tic = time.perf_counter()
        x, y = prep(images, targets)
        synchronize(device)
        mid = time.perf_counter()
        if mixup_fn is not None:
            mixup_fn(x, y)
        synchronize(device)
        if i:
            prep_s.append(mid - tic)
            mix_s.append(time.perf_counter() - mid)
    prep_t, mix_t = statistics.median(prep_s), statistics.median(mix_s) if mixup_fn else 0.0
    return {'device': str(device), 'batch': len(images), 'threads': torch.get_num_threads(),
            'prep_ms': prep_t * 1e3, 'mixup_ms': mix_t * 1e3 if mixup_fn else None,
            'images_per_s': len(images) / (prep_t + mix_t)}


# ----------------------------------------------------------------------------- report

def print_table(rows: list[dict], workers: int) -> None:
    head = (f"{'split':5s} {'pipeline':22s} {'mode':22s} {'img/s':>8s} {'img/s/core':>10s} "
            f"{'ms/img/core':>11s} {'vs baseline':>11s}")
    print(head)
    print('-' * len(head))
    for split in SPLITS:
        for kind in ('loader', 'per-core'):
            for r in rows:
                if r['split'] != split or r['kind'] != kind:
                    continue
                mode = (f"loader, {workers} worker{'s' if workers > 1 else ''}" if kind == 'loader'
                        else 'per-core (no loader)')
                ratio = r['ratio_vs_baseline_median']
                print(f"{split:5s} {LABELS[r['pipeline']]:22s} {mode:22s} {r['images_per_s']:8.1f} "
                      f"{r['images_per_s_per_core']:10.1f} {r['ms_per_image_per_core']:11.2f} "
                      f"{'' if r['pipeline'] == BASELINE or ratio is None else f'x{ratio:.2f}':>11s}")


def goals(rows: list[dict]) -> list[str]:
    """Loader rows: ours / baseline images/s per worker core against the goals."""
    lines = []
    for v in (OURS, OURS_RD):
        for split, target in GOALS.items():
            row = next((r for r in rows if (r['kind'], r['split'], r['pipeline']) == ('loader', split, v)), None)
            if row is None or row['ratio_vs_baseline_median'] is None:
                continue
            ratio = row['ratio_vs_baseline_median']
            note = '' if v == OURS else f'  [{LABELS[v]}]'
            lines.append(f"goal: {split} >= {target:.1f}x baseline per core: {'MET' if ratio >= target else 'NOT MET'} "
                         f"({ratio:.2f}){note}")
    return lines


def device_line(step: dict) -> str:
    mix = f", mixup {step['mixup_ms']:.1f} ms" if step['mixup_ms'] is not None else ''
    threads = f", {step['threads']} thread{'s' if step['threads'] > 1 else ''}" if step['device'] == 'cpu' else ''
    return (f"device step of ours (not counted above) on {step['device']}{threads}: "
            f"{step['prep_ms'] + (step['mixup_ms'] or 0):.1f} ms per batch of {step['batch']} "
            f"(float/normalize/erase {step['prep_ms']:.1f} ms{mix}) = {step['images_per_s']:.0f} img/s")


def main() -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', default='bench_results/bench_data_images',
                   help='image cache folder (made on first use), or any folder with train/ and val/ ImageFolder trees')
    p.add_argument('--train-images', type=int, default=512)
    p.add_argument('--val-images', type=int, default=256)
    p.add_argument('--classes', type=int, default=8)
    p.add_argument('--workers', type=int, default=1,
                   help='loader workers (each a core); the main process only consumes')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--batches', type=int, default=8, help='timed batches per loader run, after the warm-up ones')
    p.add_argument('--warmup-batches', type=int, default=2,
                   help='untimed batches first; with many workers use at least --workers, or the timed batches '
                        'include the first wave the workers made together')
    p.add_argument('--rounds', type=int, default=3, help='alternating rounds; the median is reported')
    p.add_argument('--per-core-images', type=int, default=200, help='dataset[i] calls timed per per-core run')
    p.add_argument('--reduced-decode', choices=['both', 'off', 'only'], default='off',
                   help="our variants: plain only (off, the default), plain and with DATA.REDUCED_DECODE (both), "
                        "reduced decode only (only)")
    p.add_argument('--no-baseline', action='store_true', help='time only our pipeline')
    p.add_argument('--json', default='bench_results/bench_data.json')
    args = p.parse_args()
    for name in ('train_images', 'val_images', 'classes', 'workers', 'batch_size', 'batches', 'rounds',
                 'per_core_images'):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup_batches < 0:
        fail(f'--warmup-batches must be >= 0, got {args.warmup_batches}')

    variants = ([] if args.no_baseline else [BASELINE]) + {
        'both': [OURS, OURS_RD], 'off': [OURS], 'only': [OURS_RD]}[args.reduced_decode]
    root = os.path.abspath(args.images)
    counts = {'train': args.train_images, 'val': args.val_images}
    done = prepare_images(root, counts, args.classes, args.batch_size)
    items = item_datasets(args, root, variants)
    counts = {s: len(items[variants[0]][s]) for s in SPLITS}
    torch.set_num_threads(1)  # per-core rows and the CPU device step: one core; workers set it themselves

    try:
        import simplejpeg
        simplejpeg_version = simplejpeg.__version__
    except ImportError:
        simplejpeg_version = None
    env = {'torch': torch.__version__, 'torchvision': torchvision.__version__, 'timm': timm.__version__,
           'PIL': PIL.__version__, 'simplejpeg': simplejpeg_version, 'python': platform.python_version(),
           'cpu_count': os.cpu_count(),
           'cpus_usable': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(),
           'cuda': torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           }
    settings = {'images': root, 'images_status': done, 'image_counts': counts, 'workers': args.workers,
                'batch_size': args.batch_size, 'batches': args.batches, 'warmup_batches': args.warmup_batches,
                'rounds': args.rounds, 'per_core_images': args.per_core_images, 'variants': variants}
    print(json.dumps({**env, **{k: v for k, v in settings.items() if k != 'variants'}}))

    rows, our_batch = measure(args, root, variants, items)
    steps = []
    if our_batch is not None:
        steps.append(time_device_step(root, args, our_batch, torch.device('cpu')))
        if torch.cuda.is_available():
            steps.append(time_device_step(root, args, our_batch, torch.device('cuda')))
    print()
    print_table(rows, args.workers)
    for step in steps:
        print(device_line(step))
    lines = goals(rows)
    for line in lines:
        print(line)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
        json.dump({'env': env, 'settings': settings, 'results': rows, 'device_step': steps, 'goals': lines},
                  f, indent=1)
    print(f'wrote {args.json}')


if __name__ == '__main__':
    main()

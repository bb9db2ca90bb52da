"""Training-step throughput: our engine against timm's recipe for the same Swin, in one process.

"Ours" is the project's real training step: `engine.loops.train_one_epoch` over the
`engine.trainer.Trainer` a run builds (optimizer, schedule, criterion, non-finite guard,
mixup, device preprocessing, step logger; metrics go to a temporary folder), from
the official config (mixup 0.8 / cutmix 1.0, label smoothing 0.1, random erasing 0.25,
TRAIN.CLIP_GRAD 5.0, AdamW). A loader-like iterable yields synthetic uint8 batches already
on the device, so the real device preprocessing runs; one timed run is one
`train_one_epoch` call of --steps micro-steps (it includes the engine's per-epoch work: a
device sync, the loss all-reduce, the skip-counter read). Compile modes set TRAIN.COMPILE, so
the Trainer compiles its training module as a run does; timm's model gets `torch.compile(model)`.

"timm" is what timm's `train.py` does per step with the same flags: the PrefetchLoader's
device normalization and RandomErasing, timm's Mixup with SoftTargetCrossEntropy, the
forward and loss under autocast (no loss scaling for bf16), backward, clip_grad_norm_ 5.0
(the Swin recipe's --clip-grad), the optimizer from
`timm.optim.create_optimizer_v2(model, 'adamw', lr, weight_decay)` (torch AdamW with its
default kernel, not fused), `zero_grad()`, the scheduler's `step_update`, and the
`loss.item()` train.py reads every step when not distributed. Its model gets our weights
(converted by timm's own filter).

Runs alternate ours, timm, timm, ours, ... round after round; the table reports medians
over rounds and the median of the per-round ratios (ours images/s / timm images/s, > 1:
ours is faster). MFU = images/s x 3 x 2 x model.flops() / peak FLOP/s (model.flops():
forward multiply-adds per image, official counting; backward = 2 x forward). Peak memory:
CUDA, torch.cuda.max_memory_allocated during setup + warmup minus what was allocated before
the model was built; CPU, growth of the resident set (/proc/self/statm) over setup + warmup,
models built in turn (ours first), so memory the allocator kept from the first may be reused
by the second. On CUDA each mode is measured again at each model's largest batch (doubling
from --batch-size until out of memory; --max-only: only there). The JSON is rewritten after
every row, so a run stopped by a time limit keeps the rows it finished.

--end-to-end DIR runs our loader (`data.build_loader`, --workers processes) and the full
step instead: images/s and the share of step time spent blocked in next(loader). DIR is an
ImageFolder (train/, val/); when missing it is made with bench_data.py's JPEG writer. The
wait is measured around the loader's own next() (a wrapper between the loader and the
engine), i.e. the log's 'data' time. On the CPU that time is lost to the step; on CUDA,
where the engine reads batch n+1 while the device still runs step n, it is host time that
can overlap device work, so a high share there says the host, not necessarily the GPU, waits.

    python benchmarks/bench_train.py                                    # Swin-T 224, eager fp32 + bf16
    python benchmarks/bench_train.py --modes eager_fp32,eager_bf16 --rounds 5 --steps 1 --warmup 2
    python benchmarks/bench_train.py --device cuda --modes eager_bf16,compile_bf16 --peak-tflops 990
    python benchmarks/bench_train.py --device cuda --arch base --modes compile_bf16 --max-only \
        --max-batch-from bench_results/base_eager.json                  # reuse an eager run's largest batch
    python benchmarks/bench_train.py --end-to-end /tmp/jpegs --img-size 64 --window 4 --workers 2
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm
from bench_model import ARCHS, DEFAULT_SIZES, timm_twin
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from config import get_config
from data import build_loader, build_mixup
from distributed.process_group import DistContext
from engine.amp import resolve_amp_dtype
from engine.loops import EpochResult, train_one_epoch, updates_per_epoch
from engine.trainer import Trainer
from models import build_model
from utils import synchronize

MODES = ('eager_fp32', 'eager_bf16', 'compile_fp32', 'compile_bf16')
DEFAULT_CFG = {'v1': 'configs/swin_tiny_patch4_window7_224.yaml', 'v2': 'configs/swinv2_tiny_patch4_window8_256.yaml'}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG = logging.getLogger('bench_train')
LOG.setLevel(logging.WARNING)  # the engine's per-epoch lines are not wanted here


# ----------------------------------------------------------------------------- helpers

def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or 'out of memory' in str(e).lower()


def rss_bytes() -> int:
    """Current resident set size (Linux /proc), else the peak (ru_maxrss)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == 'darwin' else rss * 1024


def cpu_name() -> str | None:
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), None)
    except OSError:
        return platform.processor() or None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


class MemoryProbe:
    """Memory a model's setup + warmup takes: CUDA peak allocated above the start, CPU RSS growth."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
            self.base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self.base = rss_bytes()

    def mib(self) -> float:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2 ** 20
        return (rss_bytes() - self.base) / 2 ** 20


def make_config(args, mode: str, batch: int, data_path: str | None = None, workers: int = 0):
    """The official config of the size asked for, through the project's own `get_config`."""
    kw = ARCHS[args.arch]
    section = 'MODEL.SWIN' if args.model == 'v1' else 'MODEL.SWINV2'
    opts = ['DATA.BATCH_SIZE', str(batch), 'DATA.IMG_SIZE', str(args.img_size),
            f'{section}.WINDOW_SIZE', str(args.window), f'{section}.EMBED_DIM', str(kw['embed_dim']),
            f'{section}.DEPTHS', str(kw['depths']), f'{section}.NUM_HEADS', str(kw['num_heads']),
            'MODEL.DROP_PATH_RATE', str(kw['drop_path_rate']), 'MODEL.NAME', f'bench_{args.model}_{args.arch}',
            'TRAIN.CLIP_GRAD', str(args.clip_grad), 'PRINT_FREQ', str(10 ** 9),
            'AMP_ENABLE', str(mode.endswith('bf16')), 'AMP_DTYPE', 'bf16',
            'OUTPUT', tempfile.gettempdir(), 'DATA.NUM_WORKERS', str(workers)]
    if mode.startswith('compile'):
        opts += ['TRAIN.COMPILE', 'True']
    if data_path is not None:
        opts += ['DATA.DATA_PATH', data_path, 'DATA.DATASET', 'imagenet', 'DATA.CACHE_MODE', 'no']
    return get_config(argparse.Namespace(cfg=os.path.join(ROOT, DEFAULT_CFG[args.model]), opts=opts))


def timm_model(args, ours: torch.nn.Module) -> torch.nn.Module:
    """timm's same-size model with our weights (as bench_model makes it)."""
    return timm_twin(ours, args.arch, args.img_size, args.window, args.model)


class SyntheticBatches:
    """A loader stand-in: `steps` uint8 batches (already on the device) and labels."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, steps: int):
        self.images, self.targets, self.steps = images, targets, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.images, self.targets


class TimedLoader:
    """Wraps a loader and adds up the seconds spent blocked in next() (the log's 'data' time)."""

    def __init__(self, loader):
        self.loader, self.wait = loader, 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            tic = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - tic
            yield batch


def synthetic_batch(config, device: torch.device, batch: int):
    gen = torch.Generator().manual_seed(0)
    size = config.DATA.IMG_SIZE
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen).to(device)
    targets = torch.randint(0, config.MODEL.NUM_CLASSES, (batch,), generator=gen).to(device)
    return images, targets


# ----------------------------------------------------------------------------- the two steps

class Ours:
    """The project's training step: engine.loops.train_one_epoch over an engine.trainer.Trainer."""

    def __init__(self, config, device: torch.device, mode: str, steps_per_epoch: int, model=None):
        self.config, self.device = config, device
        self.model = model if model is not None else build_model(config).to(device)
        self.flops = float(self.model.flops())
        amp_dtype, _ = resolve_amp_dtype(config, device)
        self.data = synthetic_batch(config, device, config.DATA.BATCH_SIZE)
        self.trainer = Trainer(config, DistContext(0, 1, 0, device), self.model,
                               SyntheticBatches(*self.data, steps_per_epoch), None, build_mixup(config), amp_dtype, LOG)
        self.epoch = 0

    def run(self, steps: int, loader=None) -> EpochResult:
        loader = loader if loader is not None else SyntheticBatches(*self.data, steps)
        t = self.trainer  # each run is one epoch from its start, as Trainer.fit runs them
        t.epoch, t.epoch_step = self.epoch, 0
        t.loss_sum.zero_()
        stats = train_one_epoch(t, loader, self.epoch)
        self.epoch = min(self.epoch + 1, self.config.TRAIN.EPOCHS - 1)
        if stats.stop:
            raise RuntimeError(f'our engine stopped: {stats.stop} {stats.message}')
        return stats


class Timm:
    """One step of timm's train.py with the Swin recipe's flags, on timm's model."""

    def __init__(self, config, device: torch.device, mode: str, model: torch.nn.Module, clip_grad: float):
        self.device, self.model, self.clip_grad = device, model.to(device), clip_grad
        self.fn = torch.compile(self.model) if mode.startswith('compile') else self.model
        self.amp_dtype = torch.bfloat16 if mode.endswith('bf16') else None
        self.optimizer = create_optimizer_v2(self.model, 'adamw', lr=config.TRAIN.BASE_LR,
                                             weight_decay=config.TRAIN.WEIGHT_DECAY)
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=10 ** 6, lr_min=config.TRAIN.MIN_LR,
                                           warmup_lr_init=config.TRAIN.WARMUP_LR, warmup_t=1000, t_in_epochs=False)
        aug = config.AUG
        self.mixup = Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, prob=aug.MIXUP_PROB,
                           switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                           label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)
        self.criterion = SoftTargetCrossEntropy() if self.mixup is not None else LabelSmoothingCrossEntropy(0.1)
        self.erase = RandomErasing(aug.REPROB, mode=aug.REMODE, max_count=aug.RECOUNT, num_splits=0, device=device)
        # timm's PrefetchLoader normalizes uint8 with mean and std scaled by 255
        self.mean = torch.tensor([x * 255 for x in IMAGENET_DEFAULT_MEAN], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([x * 255 for x in IMAGENET_DEFAULT_STD], device=device).view(1, 3, 1, 1)
        self.data = synthetic_batch(config, device, config.DATA.BATCH_SIZE)
        self.updates = 0
        self.model.train()

    def step(self) -> None:
        images, targets = self.data
        x = images.float().sub_(self.mean).div_(self.std)
        x = self.erase(x)
        x, y = self.mixup(x, targets)
        ctx = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with ctx:
            loss = self.criterion(self.fn(x), y)
        loss.backward()
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad()
        loss.item()  # train.py updates its loss meter every step when not distributed
        self.updates += 1
        self.scheduler.step_update(num_updates=self.updates)

    def run(self, steps: int, loader=None) -> None:
        for _ in range(steps):
            self.step()


def timed(device: torch.device, fn) -> float:
    synchronize(device)
    tic = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - tic


# ----------------------------------------------------------------------------- measurements

def build_pair(args, mode: str, device: torch.device, batch: dict) -> dict:
    """Our parts and timm's, each set up and warmed up in turn with its memory measured."""
    if mode.startswith('compile'):
        torch._dynamo.reset()  # earlier compiled models would use up the recompile limit
    built = {}
    probe = MemoryProbe(device)
    cfg = make_config(args, mode, batch['ours'])
    ours = Ours(cfg, device, mode, args.steps)
    tic = time.perf_counter()
    for _ in range(args.warmup):
        ours.run(1)
    synchronize(device)
    built['ours'] = {'impl': ours, 'warmup_s': time.perf_counter() - tic, 'mem_mib': probe.mib(),
                     'batch': batch['ours']}
    probe = MemoryProbe(device)
    cfg_t = make_config(args, mode, batch['timm'])
    theirs = Timm(cfg_t, device, mode, timm_model(args, ours.model), args.clip_grad)
    tic = time.perf_counter()
    theirs.run(args.warmup)
    synchronize(device)
    built['timm'] = {'impl': theirs, 'warmup_s': time.perf_counter() - tic, 'mem_mib': probe.mib(),
                     'batch': batch['timm']}
    built['flops'] = ours.flops
    return built


def peak_for(args, mode: str) -> float | None:
    """--peak-tflops-fp32 for the fp32 modes when given, else --peak-tflops."""
    if mode.endswith('fp32') and args.peak_tflops_fp32:
        return args.peak_tflops_fp32
    return args.peak_tflops


def mfu(img_per_s: float, flops: float, peak_tflops: float | None) -> float | None:
    if not peak_tflops:
        return None
    return img_per_s * 3 * 2 * flops / (peak_tflops * 1e12)


def measure_mode(args, mode: str, device: torch.device, batch: dict, label: str) -> dict:
    built = build_pair(args, mode, device, batch)
    times = {'ours': [], 'timm': []}
    for r in range(args.rounds):
        order = ('ours', 'timm') if r % 2 == 0 else ('timm', 'ours')
        for impl in order:
            runner = built[impl]['impl']
            times[impl].append(timed(device, lambda r=runner: r.run(args.steps)) / args.steps)
    ratios = [(batch['ours'] / o) / (batch['timm'] / t) for o, t in zip(times['ours'], times['timm'])]
    peak = peak_for(args, mode)
    row = {'device': str(device), 'mode': mode, 'batch_kind': label, 'flops_per_image_fwd_macs': built['flops'],
           'ratio_ours_over_timm_img_per_s': statistics.median(ratios), 'peak_tflops': peak,
           'memory_kind': 'cuda max_memory_allocated above start' if device.type == 'cuda'
           else 'CPU RSS growth over setup + warmup'}
    for impl in ('ours', 'timm'):
        step_s = statistics.median(times[impl])
        ips = built[impl]['batch'] / step_s
        row[impl] = {'batch': built[impl]['batch'], 'step_s': step_s, 'img_per_s': ips,
                     'min_step_s': min(times[impl]),  # the least disturbed run, for noisy machines
                     'mfu': mfu(ips, built['flops'], peak), 'peak_mem_mib': built[impl]['mem_mib'],
                     'warmup_s': built[impl]['warmup_s'], 'all_step_s': times[impl]}
    print(f"  {mode:12s} {label:5s} ours {row['ours']['img_per_s']:8.1f} img/s (b{batch['ours']})  "
          f"timm {row['timm']['img_per_s']:8.1f} img/s (b{batch['timm']})  "
          f"x{row['ratio_ours_over_timm_img_per_s']:.3f}", flush=True)
    del built
    free_memory(device)
    return row


def fits(args, impl: str, mode: str, device: torch.device, batch: int) -> bool:
    """Whether `impl` can run two training steps at `batch` on the device."""
    if mode.startswith('compile'):
        torch._dynamo.reset()
    ours = model = runner = None
    try:
        cfg = make_config(args, mode, batch)
        ours = Ours(cfg, device, mode, 1)
        if impl == 'timm':
            model = timm_model(args, ours.model)
            ours = None
            free_memory(device)
            runner = Timm(cfg, device, mode, model, args.clip_grad)
            runner.run(2)
        else:
            ours.run(1)
            ours.run(1)
        synchronize(device)
        return True
    except Exception as e:
        if not is_oom(e):
            raise
        return False
    finally:
        ours = model = runner = None
        free_memory(device)


def largest_batch(args, impl: str, mode: str, device: torch.device) -> int | None:
    batch, best = args.batch_size, None
    while batch <= args.max_batch:
        ok = fits(args, impl, mode, device, batch)
        print(f'    {impl} {mode} batch {batch}: {"fits" if ok else "out of memory"}', flush=True)
        if not ok:
            break
        best, batch = batch, batch * 2
    return best


def known_max_batches(path: str | None) -> dict[str, dict]:
    """{'bf16' | 'fp32': {'ours': N, 'timm': M}} from the largest-batch rows of an earlier run's JSON."""
    if not path:
        return {}
    with open(path) as f:
        rows = json.load(f)['results']
    return {r['mode'].split('_')[1]: {impl: r[impl]['batch'] for impl in ('ours', 'timm')}
            for r in rows if r['batch_kind'] == 'max'}


def max_batch_row(args, mode: str, device: torch.device, known: dict[str, dict]) -> dict | None:
    """The row at each model's largest batch: searched, or taken from `known` (same precision).
    With --reuse-max-batch the batch measured here is kept for the next mode of the same
    precision: each try of a search in a compiled mode compiles again (a minute or more)."""
    dtype = mode.split('_')[1]
    best = known.get(dtype) or {impl: largest_batch(args, impl, mode, device) for impl in ('ours', 'timm')}
    if None in best.values():
        print(f'  {mode}: --batch-size {args.batch_size} does not fit; no largest-batch row')
        return None
    for _ in range(3):  # both models stay resident while alternating: back off if that is too much
        try:
            row = measure_mode(args, mode, device, best, 'max')
        except Exception as e:
            if not is_oom(e):
                raise
            free_memory(device)
            best = {k: max(8, v * 3 // 4 // 8 * 8) for k, v in best.items()}
            print(f'  {mode}: out of memory with both models resident; retrying at {best}')
            continue
        if args.reuse_max_batch:
            known[dtype] = best
        return row
    return None


def end_to_end(args, mode: str, device: torch.device) -> dict:
    """Our real loader + our training step: images/s and the share of time blocked on data."""
    root = os.path.abspath(args.end_to_end)
    made = 'used as given'
    if not os.path.isdir(root):
        import bench_data  # imported here: it pulls in torchvision and scikit-learn's photos
        counts = {'train': args.e2e_images, 'val': max(args.e2e_classes, args.e2e_images // 4)}
        made = bench_data.prepare_images(root, counts, args.e2e_classes, args.batch_size)
    cfg = make_config(args, mode, args.batch_size, data_path=root, workers=args.workers)
    _, _, loader_train, _, _ = build_loader(cfg, rank=0, world_size=1, logger=LOG)
    ours = Ours(cfg, device, mode, len(loader_train))
    timed_loader = TimedLoader(loader_train)
    rows = []
    for epoch in range(args.e2e_warmup + args.rounds):
        loader_train.sampler.set_epoch(epoch)
        timed_loader.wait = 0.0
        seconds = timed(device, lambda: ours.run(0, loader=timed_loader))
        if epoch >= args.e2e_warmup:
            rows.append((seconds, timed_loader.wait))
    steps = updates_per_epoch(len(loader_train), cfg.TRAIN.ACCUMULATION_STEPS) * cfg.TRAIN.ACCUMULATION_STEPS
    epoch_s = statistics.median(s for s, _ in rows)
    ips = steps * cfg.DATA.BATCH_SIZE / epoch_s
    row = {'device': str(device), 'mode': mode, 'data_path': root, 'images': made, 'workers': args.workers,
           'batch': cfg.DATA.BATCH_SIZE, 'steps_per_epoch': steps, 'epoch_s': epoch_s, 'step_s': epoch_s / steps,
           'img_per_s': ips, 'data_wait_fraction': statistics.median(w / s for s, w in rows),
           'mfu': mfu(ips, ours.flops, peak_for(args, mode)), 'peak_tflops': peak_for(args, mode),
           'all_epochs_s_wait_s': rows,
           'flops_per_image_fwd_macs': ours.flops}
    print(f"  end-to-end {mode:12s} {ips:8.1f} img/s, step {row['step_s'] * 1e3:.1f} ms, "
          f"waiting for data {100 * row['data_wait_fraction']:.1f}% of the time", flush=True)
    return row


# ----------------------------------------------------------------------------- output

def fmt_mfu(x: float | None) -> str:
    return 'n/a' if x is None else f'{100 * x:.2f}%'


def print_table(results: list[dict]) -> None:
    head = (f"{'device':6s} {'mode':12s} {'batch':>9s} {'ours img/s':>10s} {'timm img/s':>10s} {'ours ms':>9s} "
            f"{'timm ms':>9s} {'ours/timm':>9s} {'ours MFU':>8s} {'timm MFU':>8s} {'ours MiB':>9s} {'timm MiB':>9s}")
    print(head)
    print('-' * len(head))
    for r in results:
        o, t = r['ours'], r['timm']
        b = f"{o['batch']}" if o['batch'] == t['batch'] else f"{o['batch']}/{t['batch']}"
        b = b + ('*' if r['batch_kind'] == 'max' else '')
        print(f"{r['device'].split(':')[0]:6s} {r['mode']:12s} {b:>9s} {o['img_per_s']:10.1f} {t['img_per_s']:10.1f} "
              f"{o['step_s'] * 1e3:9.1f} {t['step_s'] * 1e3:9.1f} {r['ratio_ours_over_timm_img_per_s']:9.3f} "
              f"{fmt_mfu(o['mfu']):>8s} {fmt_mfu(t['mfu']):>8s} {o['peak_mem_mib']:9.0f} {t['peak_mem_mib']:9.0f}")
    if any(r['batch_kind'] == 'max' for r in results):
        print('* largest batch that fits (ours/timm)')


def print_e2e(rows: list[dict]) -> None:
    head = (f"{'device':6s} {'mode':12s} {'batch':>5s} {'workers':>7s} {'img/s':>8s} {'step ms':>8s} "
            f"{'data wait':>9s} {'MFU':>7s}")
    print(head)
    print('-' * len(head))
    for r in rows:
        print(f"{r['device'].split(':')[0]:6s} {r['mode']:12s} {r['batch']:5d} {r['workers']:7d} {r['img_per_s']:8.1f} "
              f"{r['step_s'] * 1e3:8.1f} {100 * r['data_wait_fraction']:8.1f}% {fmt_mfu(r['mfu']):>7s}")


def write_json(path: str, payload: dict) -> None:
    """Written after every row, so a run stopped by a time limit keeps the rows it finished."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(payload, f, indent=1)
    os.replace(path + '.tmp', path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', choices=sorted(DEFAULT_SIZES), default='v1', help='Swin V1 or V2')
    p.add_argument('--arch', choices=sorted(ARCHS), default='tiny')
    p.add_argument('--img-size', type=int, default=None, help='default: 224 for v1, 256 for v2')
    p.add_argument('--window', type=int, default=None, help='default: 7 for v1, 8 for v2')
    p.add_argument('--device', choices=['cpu', 'cuda'], default=None, help='default: cuda when present')
    p.add_argument('--batch-size', type=int, default=None, help='default: 8 on CPU, 128 on CUDA')
    p.add_argument('--max-batch', type=int, default=8192, help='upper end of the CUDA largest-batch search')
    p.add_argument('--no-max-batch', action='store_true', help='skip the CUDA largest-batch rows')
    p.add_argument('--max-only', action='store_true', help='CUDA: only the largest-batch rows (none at --batch-size)')
    p.add_argument('--reuse-max-batch', action='store_true',
                   help='CUDA: search the largest batch once per precision and reuse it for the other modes '
                        '(a compiled mode compiles again at every try of the search)')
    p.add_argument('--max-batch-from', default=None, metavar='JSON',
                   help="CUDA: take each model's largest batch from an earlier run's JSON (its largest-batch row "
                        'of the same precision) instead of searching')
    p.add_argument('--modes', default=None, help=f'comma-separated from {", ".join(MODES)}; '
                                                 'default: eager_fp32,eager_bf16 (CPU), all four (CUDA)')
    p.add_argument('--rounds', type=int, default=5, help='alternating rounds; the median is reported')
    p.add_argument('--steps', type=int, default=2, help='training steps per timed run')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps first (compilation, memory growth)')
    p.add_argument('--clip-grad', type=float, default=5.0, help='gradient clipping for both (0: none)')
    p.add_argument('--peak-tflops', type=float, default=None,
                   help='peak FLOP/s of the device in TFLOP/s for MFU; default 990 on CUDA (H100 bf16 dense), '
                        'none on CPU (MFU n/a)')
    p.add_argument('--peak-tflops-fp32', type=float, default=None,
                   help='peak for the fp32 modes if it differs (e.g. 67 for H100 SXM fp32 without TF32); '
                        'default: --peak-tflops')
    p.add_argument('--end-to-end', default=None, metavar='DIR',
                   help='measure our real loader + step on this ImageFolder (made if missing) instead')
    p.add_argument('--workers', type=int, default=2, help='loader workers for --end-to-end')
    p.add_argument('--e2e-images', type=int, default=64, help='train images when --end-to-end makes DIR')
    p.add_argument('--e2e-classes', type=int, default=4, help='classes when --end-to-end makes DIR')
    p.add_argument('--e2e-warmup', type=int, default=1, help='untimed epochs first (worker start)')
    p.add_argument('--json', default='bench_results/bench_train.json')
    args = p.parse_args()

    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda but CUDA is not available')
    default_size, default_window = DEFAULT_SIZES[args.model]
    args.img_size = args.img_size or default_size
    args.window = args.window or default_window
    args.batch_size = args.batch_size or (128 if device.type == 'cuda' else 8)
    if args.peak_tflops is None and device.type == 'cuda':
        args.peak_tflops = 990.0
    default_modes = MODES if device.type == 'cuda' else ('eager_fp32', 'eager_bf16')
    args.modes = [m for m in (args.modes or ','.join(default_modes)).split(',') if m]
    for m in args.modes:
        if m not in MODES:
            p.error(f'unknown mode {m}; choose from {", ".join(MODES)}')

    env = {'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
           'device': str(device), 'cpu_threads': torch.get_num_threads(), 'cpu': cpu_name(),
           'cuda': torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
           'tf32_matmul': torch.backends.cuda.matmul.allow_tf32 if device.type == 'cuda' else None,
           'model': args.model, 'arch': args.arch, 'img_size': args.img_size, 'window': args.window,
           'batch': args.batch_size, 'rounds': args.rounds, 'steps': args.steps, 'warmup': args.warmup,
           'clip_grad': args.clip_grad, 'peak_tflops': args.peak_tflops, 'peak_tflops_fp32': args.peak_tflops_fp32,
           'end_to_end': args.end_to_end,
           'workers': args.workers if args.end_to_end else None}
    print(json.dumps(env), flush=True)

    results, e2e = [], []

    def save() -> None:
        write_json(args.json, {'env': env, 'results': results, 'end_to_end': e2e})

    if args.end_to_end:
        for mode in args.modes:
            e2e.append(end_to_end(args, mode, device))
            save()
    else:
        largest = device.type == 'cuda' and not args.no_max_batch
        if not (largest and args.max_only):
            for mode in args.modes:
                results.append(measure_mode(args, mode, device, {'ours': args.batch_size, 'timm': args.batch_size},
                                            'given'))
                save()
        if largest:
            known = known_max_batches(args.max_batch_from)
            for mode in args.modes:
                row = max_batch_row(args, mode, device, known)
                if row is not None:
                    results.append(row)
                    save()
    env['ru_maxrss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    if results:
        print_table(results)
        if not args.peak_tflops:
            print('MFU n/a: pass --peak-tflops (the device peak in TFLOP/s) to get it')
    if e2e:
        print_e2e(e2e)
    save()
    print(f'wrote {args.json}')


if __name__ == '__main__':
    main()

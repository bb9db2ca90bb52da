"""Model speed: our SwinTransformer (or SwinTransformerV2) against timm's same-size model, in one process.

For each device, mode (eager fp32, eager with bf16 autocast, torch.compile in fp32 and
bf16) and task (train step = forward + loss + backward + AdamW step; inference =
forward under inference_mode), both models get the same weights, batch and dtype. Runs
alternate between the two models, round after round, so slow phases of a noisy machine
hit both; the table reports the median per-step time and the median of the per-round
ratios. Writes every measurement to JSON.

    python benchmarks/bench_model.py                       # Swin-T, batch 8, CPU (+ CUDA if present)
    python benchmarks/bench_model.py --modes eager_fp32 --rounds 15
    python benchmarks/bench_model.py --device cuda --batch-size 128 --modes eager_bf16,compile_bf16
    python benchmarks/bench_model.py --model v2            # SwinV2-T, 256 px, window 8, against timm's swinv2
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm
from timm.models.swin_transformer import checkpoint_filter_fn
from timm.models.swin_transformer_v2 import checkpoint_filter_fn as checkpoint_filter_fn_v2

from models.swin_transformer import SwinTransformer
from models.swin_transformer_v2 import SwinTransformerV2
from utils import synchronize

ARCHS = {  # official architecture and training drop-path rate per size
    'tiny': dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], drop_path_rate=0.2),
    'small': dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], drop_path_rate=0.3),
    'base': dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], drop_path_rate=0.5),
    'large': dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], drop_path_rate=0.2),
}
DEFAULT_SIZES = {'v1': (224, 7), 'v2': (256, 8)}  # (image size, window) of the official T/S/B configs
MODES = ('eager_fp32', 'eager_bf16', 'compile_fp32', 'compile_bf16')
TASKS = ('train', 'infer')


def timm_twin(ours: torch.nn.Module, arch: str, img_size: int, window: int, model: str = 'v1') -> torch.nn.Module:
    """timm's same-size model holding `ours`' weights (converted by timm's own filter)."""
    kwargs = ARCHS[arch]
    if model == 'v2':
        # timm registers V2 sizes under a few names only; its constructor takes the architecture
        theirs = timm.create_model('swinv2_tiny_window8_256', pretrained=False, img_size=img_size,
                                   window_size=window, **{k: tuple(v) if isinstance(v, list) else v
                                                          for k, v in kwargs.items()})
        theirs.load_state_dict(checkpoint_filter_fn_v2(ours.state_dict(), theirs), strict=True)
        return theirs
    theirs = timm.create_model(f'swin_{arch}_patch4_window7_224', pretrained=False, img_size=img_size,
                               window_size=window, drop_path_rate=kwargs['drop_path_rate'])
    theirs.load_state_dict(checkpoint_filter_fn(ours.state_dict(), theirs), strict=True)
    return theirs


def build_pair(arch: str, img_size: int, window: int, device: torch.device, model: str = 'v1'):
    """Our model and timm's with identical weights."""
    cls = SwinTransformerV2 if model == 'v2' else SwinTransformer
    ours = cls(img_size=img_size, window_size=window, **ARCHS[arch])
    theirs = timm_twin(ours, arch, img_size, window, model)
    return {'ours': ours.to(device), 'timm': theirs.to(device)}


class Runner:
    """One (model, task, mode) case: a callable doing `steps` iterations."""

    def __init__(self, model, task, mode, device, batch, img_size):
        self.model, self.task, self.device = model, task, device
        self.dtype = torch.bfloat16 if mode.endswith('bf16') else None
        self.fn = torch.compile(model) if mode.startswith('compile') else model
        gen = torch.Generator(device='cpu').manual_seed(0)
        self.x = torch.randn(batch, 3, img_size, img_size, generator=gen).to(device)
        self.y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        if task == 'train':
            model.train()
            fused = {'fused': True} if device.type == 'cuda' else {}
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **fused)
        else:
            model.eval()

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self):
        if self.task == 'train':
            with self.autocast():
                loss = F.cross_entropy(self.fn(self.x), self.y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), self.autocast():
                self.fn(self.x)

    def timed(self, steps: int) -> float:
        """Seconds per step over `steps` steps."""
        synchronize(self.device)
        tic = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        return (time.perf_counter() - tic) / steps


def measure(args, device: torch.device, batch: int) -> list[dict]:
    results = []
    for task in args.tasks:
        for mode in args.modes:
            models = build_pair(args.arch, args.img_size, args.window, device, args.model)
            runners = {}
            for impl, model in models.items():
                if device.type == 'cuda':
                    torch.cuda.reset_peak_memory_stats(device)
                runner = Runner(model, task, mode, device, batch, args.img_size)
                tic = time.perf_counter()
                for _ in range(args.warmup):  # the first call compiles
                    runner.step()
                synchronize(device)
                runners[impl] = (runner, time.perf_counter() - tic)
            times = {impl: [] for impl in runners}
            for r in range(args.rounds):
                order = list(runners) if r % 2 == 0 else list(reversed(runners))
                for impl in order:
                    times[impl].append(runners[impl][0].timed(args.steps))
            ratios = [t / o for o, t in zip(times['ours'], times['timm'])]
            row = {'device': str(device), 'task': task, 'mode': mode, 'batch': batch,
                   'ours_s': statistics.median(times['ours']), 'timm_s': statistics.median(times['timm']),
                   'speedup_median_of_ratios': statistics.median(ratios),
                   'warmup_s': {impl: round(w, 2) for impl, (_, w) in runners.items()},
                   'all_times_s': times}
            if device.type == 'cuda':
                row['peak_mem_gib'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            results.append(row)
            print(f"  {task:5s} {mode:12s} ours {batch / row['ours_s']:8.1f} img/s  "
                  f"timm {batch / row['timm_s']:8.1f} img/s  x{row['speedup_median_of_ratios']:.3f}",
                  flush=True)
            del runners, models
    return results


def print_table(results: list[dict]) -> None:
    head = (f"{'device':7s} {'task':5s} {'mode':12s} {'batch':>5s} {'ours img/s':>11s} {'timm img/s':>11s} "
            f"{'ours ms':>9s} {'timm ms':>9s} {'ours/timm':>9s}")
    print(head)
    print('-' * len(head))
    for r in results:
        print(f"{r['device'].split(':')[0]:7s} {r['task']:5s} {r['mode']:12s} {r['batch']:5d} "
              f"{r['batch'] / r['ours_s']:11.1f} {r['batch'] / r['timm_s']:11.1f} "
              f"{r['ours_s'] * 1e3:9.1f} {r['timm_s'] * 1e3:9.1f} {r['speedup_median_of_ratios']:9.3f}")


def goals(results: list[dict]) -> list[str]:
    """The issue's CPU goals: eager fp32 train step against timm's, and our compiled train
    step against timm's eager one, at fp32 and at the same precision."""
    lines = []
    cpu = {(r['task'], r['mode']): r for r in results if r['device'].startswith('cpu')}
    base = cpu.get(('train', 'eager_fp32'))
    if base:
        lines.append(f"eager fp32 train step, ours vs timm: x{base['speedup_median_of_ratios']:.3f} (goal >= 1.10)")
    for mode, eager in (('compile_fp32', 'eager_fp32'), ('compile_bf16', 'eager_bf16')):
        compiled = cpu.get(('train', mode))
        if compiled is None:
            continue
        for ref_mode in sorted({eager, 'eager_fp32'}):
            ref = cpu.get(('train', ref_mode))
            if ref is not None:
                goal = '(goal >= 1.30)' if (mode, ref_mode) == ('compile_fp32', 'eager_fp32') else '(reference)'
                lines.append(f"{mode} ours train step vs timm {ref_mode}: x{ref['timm_s'] / compiled['ours_s']:.3f}"
                             f" {goal}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', choices=sorted(DEFAULT_SIZES), default='v1', help='Swin V1 or V2')
    p.add_argument('--arch', choices=sorted(ARCHS), default='tiny')
    p.add_argument('--img-size', type=int, default=None, help='default: 224 for v1, 256 for v2')
    p.add_argument('--window', type=int, default=None, help='default: 7 for v1, 8 for v2')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--cuda-batch-size', type=int, default=128)
    p.add_argument('--device', choices=['cpu', 'cuda', 'all'], default='all')
    p.add_argument('--modes', default=','.join(MODES))
    p.add_argument('--tasks', default=','.join(TASKS))
    p.add_argument('--rounds', type=int, default=9, help='alternating rounds; the median is reported')
    p.add_argument('--steps', type=int, default=2, help='steps per timed run')
    p.add_argument('--warmup', type=int, default=5, help='untimed steps first (compilation, memory growth)')
    p.add_argument('--json', default=None, help='default: bench_results/bench_model.json (v1), '
                                                '.../bench_model_v2.json (v2)')
    args = p.parse_args()
    default_size, default_window = DEFAULT_SIZES[args.model]
    args.img_size = args.img_size or default_size
    args.window = args.window or default_window
    args.json = args.json or ('bench_results/bench_model.json' if args.model == 'v1'
                              else 'bench_results/bench_model_v2.json')
    args.modes = [m for m in args.modes.split(',') if m]
    args.tasks = [t for t in args.tasks.split(',') if t]
    for m in args.modes:
        if m not in MODES:
            p.error(f'unknown mode {m}; choose from {", ".join(MODES)}')

    devices = []
    if args.device in ('cpu', 'all'):
        devices.append((torch.device('cpu'), args.batch_size))
    if args.device in ('cuda', 'all') and torch.cuda.is_available():
        devices.append((torch.device('cuda'), args.cuda_batch_size))

    env = {'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
           'cpu_threads': torch.get_num_threads(),
           'cuda': torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           'model': args.model, 'arch': args.arch, 'img_size': args.img_size, 'window': args.window,
           'rounds': args.rounds, 'steps': args.steps}
    print(json.dumps(env))
    results = []
    for device, batch in devices:
        print(f'{device}: batch {batch}', flush=True)
        results += measure(args, device, batch)
    print()
    print_table(results)
    for line in goals(results):
        print(line)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
        json.dump({'env': env, 'results': results, 'goals': goals(results)}, f, indent=1)
    print(f'wrote {args.json}')


if __name__ == '__main__':
    main()

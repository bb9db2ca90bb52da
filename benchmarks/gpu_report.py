"""The report of benchmarks/gpu_check.sh: REPORT.md (markdown tables) and report.json.

gpu_check.sh runs its stages (install, env, training benchmarks, data loader, CUDA tests)
into one work folder, under the file names below, and calls `report` after each stage. The
report is built from whatever is there, so a stage that failed or ran out of time shows up as
such, with the tail of its output, while the others still report. Only `env` imports torch.

    python benchmarks/gpu_report.py env --out WORK/env.json      # GPU name, its peak, versions
    python benchmarks/gpu_report.py peak --env WORK/env.json     # the --peak-tflops to pass (0: no MFU)
    python benchmarks/gpu_report.py report --work WORK --out OUT  # OUT/REPORT.md, OUT/report.json; prints it
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
import xml.etree.ElementTree as ET

# Dense bf16 peak in TFLOP/s by device name (NVIDIA datasheets: half the sparse figure); the
# first entry whose key is in torch.cuda.get_device_name() wins; other cards get no MFU.
PEAK_BF16_TFLOPS = (('H100 PCIe', 756.5), ('H100 NVL', 835.5), ('H200 NVL', 835.5),
                    ('H100', 989.4), ('H200', 989.4))
TRAIN_STAGES = {'tiny': ('train_tiny_eager', 'train_tiny_compile'),
                'base': ('train_base_eager', 'train_base_compile')}
STAGE_MODES = {'train_tiny_eager': 'eager_bf16', 'train_tiny_compile': 'compile_bf16',
               'train_base_eager': 'eager_bf16', 'train_base_compile': 'compile_bf16'}
ARCH_NAMES = {'tiny': 'Swin-T', 'base': 'Swin-B'}
GOAL_TINY_IMG_S, GOAL_TINY_VS_TIMM, GOAL_BASE_IMG_S = 9000.0, 1.8, 2800.0
PYTEST_EXIT = {1: 'some tests failed', 2: 'interrupted', 3: 'pytest internal error',
               4: 'pytest usage error (is tests/cuda there?)', 5: 'no tests collected'}
SUMMARY_WORDS = re.compile(r'(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b')
TAIL_LINES = 40
INSTALL_LINE = re.compile(r'^[a-z][a-z0-9_]*: ')  # gpu_check.sh's lines ('yacs: installed from .whl'), not pip's


# ----------------------------------------------------------------------------- env / peak

def peak_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak of a known card, else None (MFU left out)."""
    for key, peak in PEAK_BF16_TFLOPS:
        if device_name and key in device_name:
            return peak
    return None


def collect_env() -> dict:
    """The machine and versions, read once at the start of a check."""
    import timm
    import torch
    import torchvision

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {'gpu': name, 'peak_bf16_tflops': peak_tflops(name), 'cuda_available': torch.cuda.is_available(),
            'torch': torch.__version__, 'torchvision': torchvision.__version__, 'timm': timm.__version__,
            'cuda_runtime': torch.version.cuda, 'python': platform.python_version(),
            'cpu_count': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(),
            'date': time.strftime('%Y-%m-%d %H:%M:%S %Z')}


# ----------------------------------------------------------------------------- inputs

def load_json(path: str) -> dict | None:
    """A stage's JSON, or None when the stage wrote none (failed early) or an unreadable one."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def stage_status(rec: dict) -> str:
    if 'skipped' in rec:
        return f"skipped: {rec['skipped']}"
    if rec['rc'] == 0:
        return 'ok'
    if rec['rc'] in (124, 137):
        return f"timed out after {rec['limit_s']} s"
    return f"failed (exit {rec['rc']})"


def load_stages(work: str) -> dict[str, dict]:
    """{stage: record} from stages.jsonl, in run order, each with its status and seconds."""
    stages = {}
    try:
        with open(os.path.join(work, 'stages.jsonl')) as f:
            lines = [line for line in f if line.strip()]
    except OSError:
        lines = []
    for line in lines:
        rec = json.loads(line)
        rec['status'] = stage_status(rec)
        rec['seconds'] = round(rec['end'] - rec['start'], 1) if 'end' in rec else None
        stages[rec['stage']] = rec
    return stages


def log_tail(work: str, stage: str, lines: int = TAIL_LINES) -> str:
    try:
        with open(os.path.join(work, f'{stage}.log'), errors='replace') as f:
            return ''.join(f.readlines()[-lines:])
    except OSError:
        return '(no output file)'


# ----------------------------------------------------------------------------- training

def train_rows(work: str, arch: str) -> list[dict]:
    """bench_train rows of one model from its stages: the largest-batch rows where there are any
    (CUDA), else the rows at the given batch (a CPU smoke run)."""
    rows = []
    for stage in TRAIN_STAGES[arch]:
        data = load_json(os.path.join(work, f'{stage}.json'))
        rows += data['results'] if data else []
    largest = [r for r in rows if r['batch_kind'] == 'max']
    return largest or rows


def best_ours(rows: list[dict]) -> dict | None:
    return max(rows, key=lambda r: r['ours']['img_per_s'], default=None)


def timm_eager(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r['mode'] == 'eager_bf16'), None)


def goal(name: str, target: str, value: float | None, threshold: float, measured: str) -> dict:
    if value is None:
        return {'goal': name, 'target': target, 'value': None, 'measured': 'not measured', 'result': 'N/A'}
    return {'goal': name, 'target': target, 'value': value, 'measured': measured,
            'result': 'PASS' if value >= threshold else 'FAIL'}


def img_s_goal(arch: str, rows: list[dict], threshold: float) -> dict:
    best = best_ours(rows)
    value = best['ours']['img_per_s'] if best else None
    measured = f"{fmt_ips(value)} img/s ({best['mode']}, batch {best['ours']['batch']})" if best else ''
    return goal(f'{ARCH_NAMES[arch]} training img/s, ours (best mode)', f'>= {threshold:,.0f} img/s',
                value, threshold, measured)


def ratio_goal(rows: list[dict]) -> dict:
    best, base = best_ours(rows), timm_eager(rows)
    value = best['ours']['img_per_s'] / base['timm']['img_per_s'] if best and base else None
    measured = (f"{value:.2f}x ({fmt_ips(best['ours']['img_per_s'])} {best['mode']} / "
                f"{fmt_ips(base['timm']['img_per_s'])} timm eager_bf16)" if value else '')
    return goal('Swin-T ours (best mode) / timm eager bf16 step, same check', f'>= {GOAL_TINY_VS_TIMM:.1f}x',
                value, GOAL_TINY_VS_TIMM, measured)


def goals(train: dict[str, list[dict]]) -> list[dict]:
    return [img_s_goal('tiny', train['tiny'], GOAL_TINY_IMG_S), ratio_goal(train['tiny']),
            img_s_goal('base', train['base'], GOAL_BASE_IMG_S)]


# ----------------------------------------------------------------------------- tests / data

def junit_counts(path: str) -> dict | None:
    """tests, failures, errors, skipped, time and the failed test ids from pytest's junit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == 'testsuite' else list(root.iter('testsuite'))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ('tests', 'failures', 'errors', 'skipped')}
    counts['time_s'] = round(sum(float(s.get('time', 0)) for s in suites), 1)
    counts['passed'] = counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']
    counts['failed_ids'] = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter('testcase')
                            if c.find('failure') is not None or c.find('error') is not None]
    return counts


def summary_counts(log: str) -> dict[str, int]:
    """Counts from pytest's closing line ('3 passed, 1 skipped, 5 deselected in 2.1s')."""
    line = next((ln for ln in reversed(log.splitlines()) if SUMMARY_WORDS.search(ln)), '')
    return {word.rstrip('s') if word.startswith('error') else word: int(n) for n, word in SUMMARY_WORDS.findall(line)}


def tests_summary(work: str, stages: dict[str, dict]) -> dict:
    rec = stages.get('tests')
    counts = junit_counts(os.path.join(work, 'tests.xml'))
    closing = summary_counts(log_tail(work, 'tests', 200))
    rc = rec.get('rc') if rec else None
    return {'status': rec['status'] if rec else 'not run', 'exit_code': rc,
            'meaning': PYTEST_EXIT.get(rc, '') if rc not in (124, 137) else 'stopped at its time limit',
            'junit': counts, 'closing_line': closing, 'seconds': rec.get('seconds') if rec else None}


def loader_rows(data: dict | None) -> list[dict]:
    return [r for r in (data or {}).get('results', []) if r['kind'] == 'loader']


# ----------------------------------------------------------------------------- markdown

def md_table(header: list[str], rows: list[list]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def fmt(x: float | None, spec: str = ',.0f', suffix: str = '') -> str:
    return 'n/a' if x is None else f'{x:{spec}}{suffix}'


def fmt_ips(x: float | None) -> str:
    """Images/s: whole numbers, with a decimal below 100 (a CPU smoke run)."""
    return fmt(x, ',.0f' if x is None or x >= 100 else '.1f')


def fmt_mfu(x: float | None) -> str:
    return 'n/a' if x is None else f'{100 * x:.1f}%'


def md_goals(report: dict) -> str:
    rows = [[g['goal'], g['target'], g['measured'], f"**{g['result']}**"] for g in report['goals']]
    return '## Goals\n\n' + md_table(['goal', 'target', 'measured', 'result'], rows)


def train_line(arch: str, r: dict) -> list:
    o, t = r['ours'], r['timm']
    batch = str(o['batch']) if o['batch'] == t['batch'] else f"{o['batch']} / {t['batch']}"
    return [ARCH_NAMES[arch], r['mode'], batch, fmt_ips(o['img_per_s']), fmt_ips(t['img_per_s']),
            fmt(r['ratio_ours_over_timm_img_per_s'], '.2f', 'x'), fmt_mfu(o['mfu']), fmt_mfu(t['mfu']),
            fmt(o['peak_mem_mib']), fmt(t['peak_mem_mib'])]


def missing_modes(arch: str, rows: list[dict], stages: dict[str, dict]) -> list[list]:
    """A line for each mode a training stage did not measure, saying why."""
    have = {r['mode'] for r in rows}
    lines = []
    for stage in TRAIN_STAGES[arch]:
        mode = STAGE_MODES[stage]
        if mode not in have:
            why = stages[stage]['status'] if stage in stages else 'not run'
            lines.append([ARCH_NAMES[arch], mode, f'not measured: stage {stage} {why}'] + [''] * 7)
    return lines


def md_train(report: dict, stages: dict[str, dict]) -> str:
    lines = []
    for arch, rows in report['train'].items():
        lines += [train_line(arch, r) for r in rows] + missing_modes(arch, rows, stages)
    header = ['model', 'mode', 'batch (ours / timm)', 'ours img/s', 'timm img/s', 'ours / timm', 'ours MFU',
              'timm MFU', 'ours peak MiB', 'timm peak MiB']
    kind = 'largest batch that fits each model' if report['largest_batch'] else 'the given batch'
    peak = report['env'].get('peak_bf16_tflops')
    mfu = f'MFU against {peak} TFLOP/s dense bf16' if peak else 'MFU n/a (no known peak for this device)'
    return (f'## Training step (bench_train: ours against timm in one process, {kind})\n\n'
            + md_table(header, lines) + f'\n\nours / timm: median of the per-round images/s ratios; {mfu}; '
            'peak memory: CUDA max allocated over setup + warmup (CPU: RSS growth).')


def md_data(report: dict) -> str:
    data = report['data']
    if not data:
        return '## Data loader (bench_data)\n\nnot measured (see Stages).'
    workers = data['settings']['workers']
    rows = [[r['split'], r['pipeline'], fmt(r['images_per_s']), fmt(r['images_per_s_per_core'], ',.1f'),
             fmt(r['ratio_vs_baseline_median'], '.2f', 'x')] for r in loader_rows(data)]
    notes = [f'- {line}' for line in data.get('goals', [])]
    feed = report.get('loader_vs_step')
    if feed:
        notes.append(f"- our train loader ({workers} workers) makes {feed['loader_img_s']:,.0f} img/s, "
                     f"{100 * feed['share']:.0f}% of the best Swin-T step ({feed['step_img_s']:,.0f} img/s)")
    return (f'## Data loader (bench_data, {workers} workers)\n\n'
            + md_table(['split', 'pipeline', 'img/s', 'img/s per core', 'vs baseline'], rows) + '\n\n'
            + '\n'.join(notes))


def md_tests(report: dict) -> str:
    t = report['tests']
    j = t['junit'] or {}
    c = t['closing_line']
    row = [t['status'], j.get('passed', c.get('passed', 'n/a')), j.get('failures', c.get('failed', 'n/a')),
           j.get('errors', c.get('error', 'n/a')), j.get('skipped', c.get('skipped', 'n/a')),
           c.get('deselected', 0), fmt(t['seconds'], '.0f', ' s')]
    text = '## CUDA tests (pytest -m cuda tests/cuda)\n\n' + md_table(
        ['status', 'passed', 'failed', 'errors', 'skipped', 'deselected', 'time'], [row])
    if t['meaning']:
        text += f"\n\nexit {t['exit_code']}: {t['meaning']}"
    failed = j.get('failed_ids', [])
    if failed:
        text += '\n\nfailed: ' + ', '.join(f'`{x}`' for x in failed[:20]) + (' ...' if len(failed) > 20 else '')
    return text


def md_stages(report: dict) -> str:
    rows = [[name, s['status'], fmt(s['seconds'], '.0f', ' s'), fmt(s.get('limit_s'), '.0f', ' s')]
            for name, s in report['stages'].items()]
    text = '## Stages\n\n' + md_table(['stage', 'result', 'time', 'limit'], rows)
    for name, tail in report['failures'].items():
        text += f'\n\n### {name}: last lines of its output\n\n```\n{tail.rstrip()}\n```'
    return text


def md_setup(report: dict) -> str:
    lines = report['setup'] or ['(no install output)']
    return '## Setup (missing packages installed from .whl/)\n\n' + '\n'.join(f'- {line}' for line in lines)


def md_header(report: dict) -> str:
    env = report['env']
    gpu = env.get('gpu') or 'no GPU'
    mode = ' (SMOKE run: tiny sizes on the CPU; the figures mean nothing)' if report['smoke'] else ''
    return (f'# GPU check: {gpu}{mode}\n\n'
            f"torch {env.get('torch', '?')}, torchvision {env.get('torchvision', '?')}, timm {env.get('timm', '?')}, "
            f"Python {env.get('python', '?')}, {env.get('cpu_count', '?')} CPU cores; {env.get('date', '')}; "
            f"stages took {fmt(report['total_s'], '.0f', ' s')}")


def render(report: dict, stages: dict[str, dict]) -> str:
    parts = [md_header(report), md_goals(report), md_train(report, stages), md_data(report), md_tests(report),
             md_stages(report), md_setup(report)]
    return '\n\n'.join(parts) + '\n'


# ----------------------------------------------------------------------------- assembly

def loader_vs_step(data: dict | None, tiny: list[dict]) -> dict | None:
    """Whether our train loader on all cores keeps up with the best Swin-T step."""
    row = next((r for r in loader_rows(data) if (r['split'], r['pipeline']) == ('train', 'ours')), None)
    best = best_ours(tiny)
    if row is None or best is None:
        return None
    step = best['ours']['img_per_s']
    return {'loader_img_s': row['images_per_s'], 'step_img_s': step, 'share': row['images_per_s'] / step}


def build_report(work: str, smoke: bool) -> tuple[dict, dict[str, dict]]:
    stages = load_stages(work)
    train = {arch: train_rows(work, arch) for arch in TRAIN_STAGES}
    data = load_json(os.path.join(work, 'data.json'))
    ends = [s['end'] for s in stages.values() if 'end' in s]
    starts = [s['start'] for s in stages.values() if 'start' in s]
    report = {
        'smoke': smoke, 'env': load_json(os.path.join(work, 'env.json')) or {},
        'goals': goals(train), 'train': train,
        'largest_batch': any(r['batch_kind'] == 'max' for rows in train.values() for r in rows),
        'data': data, 'loader_vs_step': loader_vs_step(data, train['tiny']),
        'tests': tests_summary(work, stages),
        'setup': [ln for ln in log_tail(work, 'install').splitlines() if INSTALL_LINE.match(ln)],
        'stages': {k: {f: v[f] for f in ('status', 'seconds', 'limit_s', 'rc') if f in v} for k, v in stages.items()},
        'failures': {k: log_tail(work, k) for k, v in stages.items() if v['status'] != 'ok' and 'skipped' not in v},
        'total_s': round(max(ends) - min(starts), 1) if ends else None,
        'raw': {s: load_json(os.path.join(work, f'{s}.json')) for s in STAGE_MODES},
    }
    return report, stages


def write_report(work: str, out: str, smoke: bool) -> str:
    report, stages = build_report(work, smoke)
    text = render(report, stages)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'REPORT.md'), 'w') as f:
        f.write(text)
    with open(os.path.join(out, 'report.json'), 'w') as f:
        json.dump(report, f, indent=1)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    sub.add_parser('env').add_argument('--out', required=True)
    sub.add_parser('peak').add_argument('--env', required=True)
    r = sub.add_parser('report')
    r.add_argument('--work', required=True)
    r.add_argument('--out', required=True)
    r.add_argument('--smoke', action='store_true')
    r.add_argument('--quiet', action='store_true', help='write the files, print nothing')
    args = p.parse_args()
    if args.cmd == 'env':
        env = collect_env()
        with open(args.out, 'w') as f:
            json.dump(env, f, indent=1)
        print(json.dumps(env))
    elif args.cmd == 'peak':
        print((load_json(args.env) or {}).get('peak_bf16_tflops') or 0)
    else:
        text = write_report(args.work, args.out, args.smoke)
        if not args.quiet:
            print(text)


if __name__ == '__main__':
    main()

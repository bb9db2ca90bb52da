"""benchmarks/gpu_report.py, the report of benchmarks/gpu_check.sh, on a work folder laid out
as the script's stages leave it (stage records, bench_train / bench_data JSON in their own
format, pytest's junit XML and logs): the goals' PASS / FAIL, the tables, a stage that timed
out and one that failed (with the tail of its output), the GPU's peak, and the command line."""
import json
import os
import subprocess
import sys

import pytest

from helpers.runs import ROOT

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import gpu_report

REPORT = os.path.join(ROOT, 'benchmarks', 'gpu_report.py')
PEAK = 989.4
FLOPS = {'tiny': 4.5e9, 'base': 15.4e9}
JUNIT = ('<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
         '<testsuite name="pytest" errors="0" failures="1" skipped="1" tests="3" time="5.9">'
         '<testcase classname="tests.cuda.test_steps" name="test_fast" time="0.1" />'
         '<testcase classname="tests.cuda.test_steps" name="test_skip" time="0.0"><skipped message="s"/></testcase>'
         '<testcase classname="tests.cuda.test_steps" name="test_compiled" time="2.0">'
         '<failure message="assert 0">E   assert 0</failure></testcase>'
         '</testsuite></testsuites>')


def side(batch: int, img_s: float, flops: float, mem: float) -> dict:
    """One model's half of a bench_train row, as measure_mode writes it."""
    step = batch / img_s
    return {'batch': batch, 'step_s': step, 'img_per_s': img_s, 'min_step_s': step,
            'mfu': img_s * 6 * flops / (PEAK * 1e12), 'peak_mem_mib': mem, 'warmup_s': 1.0, 'all_step_s': [step]}


def row(arch: str, mode: str, ours: tuple, timm: tuple) -> dict:
    """A largest-batch row of bench_train: ours / timm = (batch, img/s, peak MiB)."""
    o, t = side(*ours[:2], FLOPS[arch], ours[2]), side(*timm[:2], FLOPS[arch], timm[2])
    return {'device': 'cuda:0', 'mode': mode, 'batch_kind': 'max', 'flops_per_image_fwd_macs': FLOPS[arch],
            'ratio_ours_over_timm_img_per_s': o['img_per_s'] / t['img_per_s'], 'peak_tflops': PEAK,
            'memory_kind': 'cuda max_memory_allocated above start', 'ours': o, 'timm': t}


def loader(split: str, pipeline: str, img_s: float, ratio: float) -> dict:
    return {'kind': 'loader', 'split': split, 'pipeline': pipeline, 'cores': 16, 'images_per_s': img_s,
            'images_per_s_per_core': img_s / 16, 'ms_per_image_per_core': 16e3 / img_s,
            'ratio_vs_baseline_median': ratio, 'all_images_per_s': [img_s], 'all_ratios': [ratio]}


def write(path, payload) -> None:
    with open(path, 'w') as f:
        f.write(payload if isinstance(payload, str) else json.dumps(payload))


def stage_lines(stages: list[tuple]) -> str:
    """stages.jsonl as gpu_check.sh writes it: (name, rc, seconds, limit) or (name, 'skipped reason')."""
    lines, t = [], 1000.0
    for s in stages:
        if len(s) == 2:
            lines.append({'stage': s[0], 'skipped': s[1]})
            continue
        lines.append({'stage': s[0], 'rc': s[1], 'start': t, 'end': t + s[2], 'limit_s': s[3]})
        t += s[2]
    return ''.join(json.dumps(x) + '\n' for x in lines)


@pytest.fixture
def work(tmp_path):
    """A check where every stage ran: the tests timed out, the Swin-B compile stage failed."""
    w = tmp_path / 'work'
    w.mkdir()
    write(w / 'stages.jsonl', stage_lines([
        ('install', 0, 2.0, 60), ('env', 0, 5.0, 60), ('train_tiny_eager', 0, 40.0, 100),
        ('train_base_eager', 0, 50.0, 100), ('data', 0, 35.0, 75), ('tests', 124, 160.0, 150),
        ('train_tiny_compile', 0, 120.0, 170), ('train_base_compile', 1, 30.0, 40)]))
    write(w / 'install.log', 'yacs: installed from .whl\nERROR: pip noise\nsimplejpeg: already importable\n')
    write(w / 'env.json', {'gpu': 'NVIDIA H100 80GB HBM3', 'peak_bf16_tflops': PEAK, 'torch': '2.11.0+cu130',
                           'torchvision': '0.26.0', 'timm': '1.0.20', 'python': '3.12.3', 'cpu_count': 16})
    write(w / 'train_tiny_eager.json', {'env': {}, 'results': [
        row('tiny', 'eager_bf16', (1024, 6000.0, 40000), (512, 4000.0, 30000))]})
    write(w / 'train_tiny_compile.json', {'env': {}, 'results': [
        row('tiny', 'compile_bf16', (1024, 9500.0, 35000), (512, 5000.0, 28000))]})
    write(w / 'train_base_eager.json', {'env': {}, 'results': [
        row('base', 'eager_bf16', (512, 2500.0, 60000), (256, 1500.0, 50000))]})
    write(w / 'train_base_compile.log', 'step 1\nTraceback (most recent call last):\nRuntimeError: boom\n')
    write(w / 'data.json', {'env': {}, 'settings': {'workers': 16}, 'device_step': [],
                            'results': [loader('train', 'baseline', 1500.0, 1.0), loader('train', 'ours', 3300.0, 2.2),
                                        loader('val', 'baseline', 3000.0, 1.0), loader('val', 'ours', 5000.0, 1.67)],
                            'goals': ['goal: train >= 2.0x baseline per core: MET (2.20)']})
    write(w / 'tests.xml', JUNIT)
    write(w / 'tests.log', 'F.s\n!!! KeyboardInterrupt !!!\n1 failed, 1 passed, 1 skipped, 5 deselected in 150.2s\n')
    return w


def test_report_goals_tables_and_failures(work, tmp_path):
    out = tmp_path / 'out'
    text = gpu_report.write_report(str(work), str(out), smoke=False)
    assert (out / 'REPORT.md').read_text() == text
    report = json.loads((out / 'report.json').read_text())

    # goals: Swin-T best (compiled) 9,500 >= 9,000; 9,500 / timm eager 4,000 = 2.38x >= 1.8x; Swin-B 2,500 < 2,800
    assert [g['result'] for g in report['goals']] == ['PASS', 'PASS', 'FAIL']
    assert report['goals'][1]['value'] == pytest.approx(9500 / 4000)
    assert '| Swin-T training img/s, ours (best mode) | >= 9,000 img/s | 9,500 img/s (compile_bf16, batch 1024) |' \
        in text
    assert '2.38x (9,500 compile_bf16 / 4,000 timm eager_bf16)' in text
    assert '2,500 img/s (eager_bf16, batch 512) | **FAIL** |' in text

    # training rows: batches ours / timm, ratio, MFU (img/s x 6 x MACs / peak), memory; the failed stage's mode
    mfu = 100 * 9500 * 6 * FLOPS['tiny'] / (PEAK * 1e12)
    assert f'| Swin-T | compile_bf16 | 1024 / 512 | 9,500 | 5,000 | 1.90x | {mfu:.1f}% |' in text
    assert '| Swin-B | compile_bf16 | not measured: stage train_base_compile failed (exit 1) |' in text
    assert 'MFU against 989.4 TFLOP/s dense bf16' in text

    # data loader, and whether it feeds the best Swin-T step (3,300 / 9,500 = 35%)
    assert '| train | ours | 3,300 | 206.2 | 2.20x |' in text
    assert '35% of the best Swin-T step (9,500 img/s)' in text
    assert 'goal: train >= 2.0x baseline per core: MET (2.20)' in text

    # tests: counts from the junit file, deselected from the closing line; stopped at its limit
    assert '| timed out after 150 s | 1 | 1 | 0 | 1 | 5 | 160 s |' in text
    assert '`tests.cuda.test_steps::test_compiled`' in text
    assert report['tests']['junit']['failed_ids'] == ['tests.cuda.test_steps::test_compiled']

    # stages: failures carry the tail of their output; setup lists the install lines only
    assert report['stages']['train_base_compile']['status'] == 'failed (exit 1)'
    assert set(report['failures']) == {'tests', 'train_base_compile'}
    assert '### train_base_compile: last lines of its output' in text and 'RuntimeError: boom' in text
    assert report['setup'] == ['yacs: installed from .whl', 'simplejpeg: already importable']
    assert report['total_s'] == pytest.approx(442.0)
    assert text.startswith('# GPU check: NVIDIA H100 80GB HBM3\n')


def test_report_when_every_stage_failed_early(tmp_path):
    """Nothing but the stage records: the goals are N/A, every mode says why it is missing."""
    work = tmp_path / 'work'
    work.mkdir()
    write(work / 'stages.jsonl', stage_lines([('install', 0, 1.0, 60), ('env', 1, 3.0, 60),
                                              ('train_tiny_eager', 1, 5.0, 100),
                                              ('train_base_eager', 'only 12 s left of the 465 s budget')]))
    text = gpu_report.write_report(str(work), str(tmp_path / 'out'), smoke=True)
    assert text.startswith('# GPU check: no GPU (SMOKE run')
    assert text.count('| not measured | **N/A** |') == 3
    assert '| Swin-T | eager_bf16 | not measured: stage train_tiny_eager failed (exit 1) |' in text
    assert '| Swin-B | eager_bf16 | not measured: stage train_base_eager skipped: only 12 s left' in text
    assert '| Swin-B | compile_bf16 | not measured: stage train_base_compile not run |' in text
    assert '## Data loader (bench_data)\n\nnot measured' in text
    assert '| not run | n/a | n/a | n/a | n/a | 0 | n/a |' in text


@pytest.mark.parametrize('name, peak', [('NVIDIA H100 80GB HBM3', 989.4), ('NVIDIA H200', 989.4),
                                        ('NVIDIA H100 PCIe', 756.5), ('NVIDIA A100-SXM4-80GB', None), (None, None)])
def test_peak_by_device_name(name, peak):
    assert gpu_report.peak_tflops(name) == peak


def test_command_line_peak_and_report(work, tmp_path):
    """The calls gpu_check.sh makes: `peak` (0 for an unknown card, so bench_train leaves MFU out) and `report`."""
    env = tmp_path / 'env.json'
    write(env, {'gpu': 'Some GPU', 'peak_bf16_tflops': None})
    peak = subprocess.run([sys.executable, REPORT, 'peak', '--env', str(env)], capture_output=True, text=True)
    assert peak.stdout.strip() == '0'
    peak = subprocess.run([sys.executable, REPORT, 'peak', '--env', str(work / 'env.json')],
                          capture_output=True, text=True)
    assert peak.stdout.strip() == '989.4'
    run = subprocess.run([sys.executable, REPORT, 'report', '--work', str(work), '--out', str(tmp_path / 'o')],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert '## Goals' in run.stdout and (tmp_path / 'o' / 'report.json').is_file()


def test_gpu_check_script_parses():
    assert subprocess.run(['bash', '-n', os.path.join(ROOT, 'benchmarks', 'gpu_check.sh')]).returncode == 0

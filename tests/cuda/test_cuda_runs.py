"""main.py runs on the GPU over the tiny generated JPEG set (tests/helpers/runs.py): a
torch.compile'd training and validation, --throughput, TRAIN.PARALLEL ddp / zero / fsdp as a
process group of one, --eval on the GPU against --eval on the CPU of the same checkpoint, and
a checkpoint written on the GPU resumed on the CPU and back.

The runs in other processes start early and run while this process compiles: the three
`torchrun --nproc_per_node 1` runs (nccl on CUDA, gloo in the CPU dry run), and the CPU legs,
`python main.py` with the GPU hidden (CUDA_VISIBLE_DEVICES=): main.py takes the GPU whenever
torch sees one, so that is how a run is put on the CPU."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch

from checkpoints.reading import model_state_dict, read_checkpoint
from helpers.runs import N_TRAIN, N_VAL, ROOT, free_port, read_metrics, run_main

AMP_BF16 = ('AMP_ENABLE', 'True', 'AMP_DTYPE', 'bf16')  # the default precision of a GPU run
UPDATES = 3 * N_TRAIN // 8  # per epoch: the tiny set's training images over batches of 8
ONE_IMAGE = 100 / (3 * N_VAL) + 1e-9  # top-1 points of one of the 21 validation images
PARALLEL = ('ddp', 'zero', 'fsdp')


class Started:
    """A process started now and awaited later. Its output goes to files: a pipe nobody
    reads until the end would fill up and stop the process."""

    def __init__(self, command: list[str], folder, env: dict):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.stderr = folder, folder / 'stderr.txt'
        with open(folder / 'stdout.txt', 'w') as out, open(self.stderr, 'w') as err:
            self.proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=err)

    def wait(self, timeout: float = 400) -> None:
        """Wait for a successful exit (a failure shows the end of its stderr)."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        assert code == 0, f'{self.folder.name}: exit {code}\n{self.stderr.read_text()[-3000:]}'

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _main_on_cpu(cfg_file, out, *extra) -> Started:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='4')
    return Started([sys.executable, os.path.join(ROOT, 'main.py'), '--cfg', cfg_file, '--output', str(out / 'run'),
                    *extra], out, env)


def _torchrun(cfg_file, out, kind: str) -> Started:
    """One process of TRAIN.PARALLEL `kind`: micro-batches of 4, two per update (DDP no_sync,
    FSDP's gradient-sync switch), full fp32 (TF32's rounding would magnify the kernels'
    summation-order differences); fsdp also checkpoints activations (a block's shards are
    gathered again to recompute it)."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '1', '--master_port',
               str(free_port()), os.path.join(ROOT, 'main.py'), '--cfg', cfg_file, '--output', str(out / 'run'),
               '--batch-size', '4', '--accumulation-steps', '2', *(['--use-checkpoint'] if kind == 'fsdp' else []),
               '--opts', 'TRAIN.PARALLEL', kind, 'TRAIN.EPOCHS', '1', 'TF32', 'False']
    return Started(command, out, dict(os.environ, OMP_NUM_THREADS='2'))


def _log(run_dir) -> str:
    return (run_dir / 'log_rank0.txt').read_text()


def _checkpoint(path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def _finite(weights: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())


@pytest.fixture(scope='module')
def parallel_runs(cfg_file, tmp_path_factory):
    """The same one-epoch run as ddp, zero and fsdp under torchrun, started together; their
    run folders once awaited."""
    root = tmp_path_factory.mktemp('parallel')
    started = {kind: _torchrun(cfg_file, root / kind, kind) for kind in PARALLEL}
    yield started, {kind: root / kind / 'run' / 'tiny' / 'default' for kind in PARALLEL}
    for run in started.values():
        run.kill()


@pytest.fixture(scope='module')
def device_run(cfg_file, device, tmp_path_factory):
    """One bf16 epoch on the device (in this process); its folder."""
    out = tmp_path_factory.mktemp('device_run')
    assert run_main(cfg_file, out, '--opts', 'TRAIN.EPOCHS', '1', *AMP_BF16) == 0
    return out / 'tiny' / 'default'


@pytest.fixture(scope='module')
def cpu_legs(cfg_file, device_run, tmp_path_factory):
    """On the CPU, started together: --eval of the device run's checkpoint in fp32, and the
    device run resumed for a second epoch."""
    root = tmp_path_factory.mktemp('cpu_legs')
    checkpoint = str(device_run / 'ckpt_epoch_0.pth')
    started = {'eval': _main_on_cpu(cfg_file, root / 'eval', '--eval', '--resume', checkpoint,
                                    '--opts', 'AMP_ENABLE', 'False'),
               'resume': _main_on_cpu(cfg_file, root / 'resume', '--resume', checkpoint,
                                      '--opts', 'TRAIN.EPOCHS', '2', *AMP_BF16)}
    yield started, {name: root / name / 'run' / 'tiny' / 'default' for name in started}
    for run in started.values():
        run.kill()


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_training_and_validation(cfg_file, device, tmp_path, fresh_dynamo, parallel_runs, cpu_legs):
    """--compile (inductor) through main.py in bf16: one epoch trains and validates, the
    metrics line is written, the compile time is logged once, the checkpoint has the plain
    module's keys and finite weights, and an eager --eval of it scores like the compiled
    validation did. Batches of 7: the 21 validation images give no smaller last batch, so
    nothing is compiled twice. (It takes `parallel_runs` and `cpu_legs` only so that those
    processes start first and run while this one compiles.)"""
    opts = ('--opts', 'TRAIN.EPOCHS', '1', 'DATA.BATCH_SIZE', '7', 'PRINT_FREQ', '3', *AMP_BF16)
    assert run_main(cfg_file, tmp_path / 'compiled', '--compile', *opts) == 0
    run_dir = tmp_path / 'compiled' / 'tiny' / 'default'
    (line,) = read_metrics(run_dir)
    assert line['epoch'] == 0 and line['n_images'] == 3 * N_VAL
    assert math.isfinite(line['train_loss']) and math.isfinite(line['val_loss']) and 0 <= line['acc1'] <= 100
    log = _log(run_dir)
    assert f'device {device} (' in log
    assert 'torch.compile: training forward' in log and 'torch.compile: validation forward' in log
    assert log.count('torch.compile: first step took') == 1
    weights = _checkpoint(run_dir / 'ckpt_epoch_0.pth')['model']
    assert weights and not any('_orig_mod' in k for k in weights) and _finite(weights)

    assert run_main(cfg_file, tmp_path / 'eager', '--eval', '--resume', str(run_dir / 'ckpt_epoch_0.pth'), *opts) == 0
    (eager,) = read_metrics(tmp_path / 'eager' / 'tiny' / 'default')
    print(f'\ncompiled validation: acc1 {line["acc1"]:.2f} loss {line["val_loss"]:.5f}; eager --eval: '
          f'acc1 {eager["acc1"]:.2f} loss {eager["val_loss"]:.5f}')
    assert abs(eager['acc1'] - line['acc1']) <= ONE_IMAGE  # bf16 kernels: one image at most
    assert eager['val_loss'] == pytest.approx(line['val_loss'], rel=2e-2)


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_throughput_reports_images_per_second(cfg_file, device, tmp_path, precision):
    amp = ('AMP_ENABLE', 'False') if precision == 'fp32' else AMP_BF16
    assert run_main(cfg_file, tmp_path, '--throughput', '--opts', *amp) == 0
    log = _log(tmp_path / 'tiny' / 'default')
    found = re.search(r'batch_size (\d+) throughput ([0-9.]+) images/s \((\w+), (\w+), synthetic input\)', log)
    assert found, log[-2000:]
    print(f'\n{found[0]}')
    assert int(found[1]) == 8 and float(found[2]) > 0
    assert (found[3], found[4]) == (device.type, precision)


def test_each_parallelism_runs_as_a_group_of_one_on_the_device(device, parallel_runs):
    started, folders = parallel_runs
    for run in started.values():
        run.wait()
    expected = {'ddp': None, 'zero': 'ZeRO: the optimizer state is sharded over 1 processes',
                'fsdp': 'FSDP: parameters, gradients and optimizer state sharded over 1 process(es)'}
    for kind, folder in folders.items():
        log = _log(folder)
        assert f'world size 1, rank 0, device {device} (' in log, kind
        assert expected[kind] is None or expected[kind] in log, kind
        (line,) = read_metrics(folder)
        assert line['epoch'] == 0 and line['n_images'] == 3 * N_VAL, kind
        assert math.isfinite(line['train_loss']) and math.isfinite(line['val_loss']), kind
    assert (folders['fsdp'] / 'ckpt_epoch_0.dcp').is_dir() and (folders['zero'] / 'ckpt_epoch_0.pth').is_file()


def test_zero_and_fsdp_train_like_ddp(parallel_runs):
    """Equal losses (1e-4) and weights (1e-3 relative; GPU kernels sum in varying order), the
    same accuracy give or take one of the 21 images, and ZeRO's gathered optimizer state
    equal to DDP's."""
    started, folders = parallel_runs
    for run in started.values():
        run.wait()
    reference = read_metrics(folders['ddp'])[0]
    ddp = model_state_dict(read_checkpoint(str(folders['ddp'] / 'ckpt_epoch_0.pth')))
    for kind, name in (('zero', 'ckpt_epoch_0.pth'), ('fsdp', 'ckpt_epoch_0.dcp')):
        (line,) = read_metrics(folders[kind])
        assert line['train_loss'] == pytest.approx(reference['train_loss'], rel=1e-4), kind
        assert line['val_loss'] == pytest.approx(reference['val_loss'], rel=1e-3), kind
        assert abs(line['acc1'] - reference['acc1']) <= ONE_IMAGE, kind
        weights = model_state_dict(read_checkpoint(str(folders[kind] / name)))
        assert set(weights) == set(ddp), kind
        for key, tensor in ddp.items():
            torch.testing.assert_close(weights[key], tensor, rtol=1e-3, atol=1e-5, msg=f'{kind} {key}')
    zero = _checkpoint(folders['zero'] / 'ckpt_epoch_0.pth')['optimizer']
    plain = _checkpoint(folders['ddp'] / 'ckpt_epoch_0.pth')['optimizer']
    assert sorted(zero['state']) == sorted(plain['state']) and len(plain['state']) > 0
    for index, entry in plain['state'].items():
        torch.testing.assert_close(zero['state'][index]['exp_avg'], entry['exp_avg'], rtol=1e-3, atol=1e-7)


def test_eval_on_the_device_equals_eval_on_the_cpu(cfg_file, device, device_run, cpu_legs, tmp_path):
    """--eval --resume of the device run's checkpoint in fp32, on the CPU (cpu_legs) and on
    the device (in this process): in full fp32 (TF32 False) the same counts and top-1 / top-5
    and the loss to 1e-4; with the default TF32 matmuls, top-1 within one of the 21 images
    and the loss to 1e-2."""
    started, cpu_folders = cpu_legs
    evaluation = ('--eval', '--resume', str(device_run / 'ckpt_epoch_0.pth'), '--opts', 'AMP_ENABLE', 'False')
    assert run_main(cfg_file, tmp_path / 'dev', *evaluation, 'TF32', 'False') == 0
    assert run_main(cfg_file, tmp_path / 'tf32', *evaluation) == 0
    started['eval'].wait()
    folders = {'cpu': cpu_folders['eval'], 'dev': tmp_path / 'dev' / 'tiny' / 'default',
               'tf32': tmp_path / 'tf32' / 'tiny' / 'default'}
    assert 'device cpu (' in _log(folders['cpu'])
    assert f'device {device} (' in _log(folders['dev']) and f'device {device} (' in _log(folders['tf32'])
    lines = {name: read_metrics(folder)[0] for name, folder in folders.items()}
    for name, line in lines.items():
        print(f'\n--eval {name}: acc1 {line["acc1"]:.3f} acc5 {line["acc5"]:.3f} loss {line["val_loss"]:.6f}', end='')
        assert line['mode'] == 'eval' and line['epoch'] == 0 and line['n_images'] == 3 * N_VAL, name
    got, want, tf32 = lines['dev'], lines['cpu'], lines['tf32']
    assert (got['acc1'], got['acc5']) == (want['acc1'], want['acc5'])
    assert got['val_loss'] == pytest.approx(want['val_loss'], rel=1e-4)
    assert abs(tf32['acc1'] - want['acc1']) <= ONE_IMAGE
    assert tf32['val_loss'] == pytest.approx(want['val_loss'], rel=1e-2)


def test_checkpoint_moves_from_the_gpu_to_the_cpu_and_back(cfg_file, device, device_run, cpu_legs, tmp_path):
    """Epoch 0 on the device (device_run) -> epoch 1 resumed on the CPU (cpu_legs) -> epoch 2
    resumed on the device: every leg completes on its device, continues at the next epoch
    with the same setup, and writes finite weights that moved on, with the update count
    (checkpoint and per-parameter optimizer steps) carried across."""
    started, cpu_folders = cpu_legs
    started['resume'].wait()
    cpu_dir = cpu_folders['resume']
    assert run_main(cfg_file, tmp_path / 'back', '--resume', str(cpu_dir / 'ckpt_epoch_1.pth'),
                    '--opts', 'TRAIN.EPOCHS', '3', *AMP_BF16) == 0
    back_dir = tmp_path / 'back' / 'tiny' / 'default'

    previous = None
    for folder, where, epoch in ((device_run, str(device), 0), (cpu_dir, 'cpu', 1), (back_dir, str(device), 2)):
        log = _log(folder)
        assert f'device {where} (' in log, (epoch, where)
        if epoch:
            assert 'resumed from' in log and f'continuing at epoch {epoch}' in log, epoch
            assert 'the setup changed' not in log
        (line,) = read_metrics(folder)
        assert line['epoch'] == epoch and math.isfinite(line['train_loss']) and math.isfinite(line['val_loss'])
        state = _checkpoint(folder / f'ckpt_epoch_{epoch}.pth')
        assert state['epoch'] == epoch and state['step'] == UPDATES * (epoch + 1)
        steps = {int(s['step']) for s in state['optimizer']['state'].values()}
        assert steps == {UPDATES * (epoch + 1)}, steps
        assert _finite(state['model'])
        if previous is not None:
            assert any(not torch.equal(state['model'][k], previous[k]) for k in previous), epoch
        previous = state['model']

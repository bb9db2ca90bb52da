"""Never losing a run: mid-epoch checkpoints and exact resume, stop signals, torchrun
restarts after a killed worker, a changed world size, non-finite updates, the output-folder
lock, and one-line errors for every bad input."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import main
from engine import preemption, runner
from helpers.runs import ROOT, free_port, read_metrics, read_weights, stop_at
from utils import EXIT_DIVERGED, EXIT_PREEMPTED

RANDOMNESS = ['MODEL.DROP_PATH_RATE', '0.2', 'AUG.MIXUP', '0.8', 'AUG.REPROB', '0.5', 'DATA.NUM_WORKERS', '1']


def _run(cfg, out, *opts, extra=()):
    return main.main(['--cfg', cfg, '--output', str(out), *extra, '--opts', *opts])


# 6 updates per epoch: check 2 is update 2 (epoch 0); check 9 is update 8 (epoch 1, after the
# epoch-end check 7)
@pytest.mark.parametrize('check,update', [(2, 2), (9, 8)])
def test_stopped_and_resumed_run_is_bitwise_equal(cfg_file, tmp_path, monkeypatch, check, update):
    opts = ['TRAIN.EPOCHS', '3', 'SAVE_STEP_FREQ', '4', *RANDOMNESS]
    assert _run(cfg_file, tmp_path / 'whole', *opts) == 0
    with monkeypatch.context() as m:
        stop_at(m, check)
        assert _run(cfg_file, tmp_path / 'cut', *opts) == EXIT_PREEMPTED
    cut = tmp_path / 'cut' / 'tiny' / 'default'
    step_file = f'ckpt_step_{update}.pth'
    assert (cut / step_file).exists() and (cut / 'latest').read_text().strip() == step_file
    assert _run(cfg_file, tmp_path / 'cut', *opts) == 0
    whole = tmp_path / 'whole' / 'tiny' / 'default'
    for key, value in read_weights(whole / 'ckpt_epoch_2.pth').items():
        assert torch.equal(value, read_weights(cut / 'ckpt_epoch_2.pth')[key]), key
    assert [m['epoch'] for m in read_metrics(cut)] == [0, 1, 2]
    for a, b in zip(read_metrics(whole), read_metrics(cut)):
        assert a['train_loss'] == b['train_loss'] and a['acc1'] == b['acc1'] and a['lr'] == b['lr']
    assert not list(cut.glob('ckpt_step_*'))  # superseded by the epoch checkpoints


def test_sigterm_checkpoints_and_exits_with_the_documented_code(cfg_file, tmp_path):
    out = tmp_path / 'out'
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py'), '--cfg', cfg_file, '--output', str(out),
                             '--opts', 'TRAIN.EPOCHS', '200', 'SAVE_STEP_FREQ', '0'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / 'tiny' / 'default' / 'log_rank0.txt'
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and 'Train: [1/' in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    assert proc.wait(timeout=60) == EXIT_PREEMPTED
    assert time.time() - sent < 10
    run_dir = out / 'tiny' / 'default'
    latest = (run_dir / 'latest').read_text().strip()  # a mid-epoch checkpoint, or the epoch's own
    assert 'stopped by SIGTERM' in log.read_text()
    state = torch.load(run_dir / latest, weights_only=True)
    assert state['epoch'] >= 0 and state['step'] > 6


def test_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(preemption.os, '_exit', lambda code: exits.append(code))
    stop = preemption.StopRequest()
    stop._handle(signal.SIGUSR1, None)
    assert stop.signal_name == 'SIGUSR1' and not exits
    stop._handle(signal.SIGTERM, None)
    assert exits == [128 + signal.SIGTERM]


def test_torchrun_restarts_after_a_killed_worker_and_finishes(cfg_file, tmp_path):
    out = tmp_path / 'out'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                             '--max-restarts', '1', '--rdzv-backend', 'c10d',
                             '--rdzv-endpoint', f'localhost:{free_port()}',
                             os.path.join(ROOT, 'main.py'), '--cfg', cfg_file, '--output', str(out),
                             '--batch-size', '4', '--opts', 'TRAIN.EPOCHS', '6', 'SAVE_STEP_FREQ', '1'],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / 'stderr.txt', 'w'), env=env)
    log = out / 'tiny' / 'default' / 'log_rank0.txt'  # (a pipe would fill up and stall the launcher)
    deadline = time.time() + 180
    while time.time() < deadline and not (log.exists() and 'Train: [1/' in log.read_text()):
        time.sleep(0.2)
    children = subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True, text=True).stdout.split()
    workers = [pid for pid in children if b'main.py' in open(f'/proc/{pid}/cmdline', 'rb').read()]
    assert workers, 'no worker processes found'
    os.kill(int(workers[-1]), signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, (tmp_path / 'stderr.txt').read_text()[-3000:]
    run_dir = out / 'tiny' / 'default'
    assert [m['epoch'] for m in read_metrics(run_dir)] == list(range(6))  # each epoch once
    text = log.read_text()
    assert 'auto-resume' in text and 'resumed from' in text


def test_resume_with_another_world_or_batch_keeps_the_schedule(cfg_file, tmp_path, monkeypatch):
    opts = ['TRAIN.EPOCHS', '2', 'SAVE_STEP_FREQ', '0']
    with monkeypatch.context() as m:
        stop_at(m, 3)  # half of epoch 0 at batch 8: 24 of 48 images
        assert _run(cfg_file, tmp_path, *opts) == EXIT_PREEMPTED
    assert _run(cfg_file, tmp_path, *opts, extra=['--batch-size', '4']) == 0
    run_dir = tmp_path / 'tiny' / 'default'
    log = (run_dir / 'log_rank0.txt').read_text()
    assert 'the setup changed' in log and 'micro-batch 6' in log  # 24 images = 6 batches of 4
    state = torch.load(run_dir / 'ckpt_epoch_1.pth', weights_only=True)
    # 24 updates done; the next one uses the schedule's index 23, as in the official loop
    assert state['step'] == 2 * 12 and state['lr_scheduler']['num_updates'] == 23


def _nan_after(monkeypatch, calls):
    """The model's forward returns NaN logits on the given training calls (1-based)."""
    build = runner.build_model

    def patched(config, **kwargs):
        model = build(config, **kwargs)
        forward, count = model.forward, {'n': 0}

        def nan_forward(x, *a, **k):
            out = forward(x, *a, **k)
            if model.training:
                count['n'] += 1
                if calls(count['n']):
                    return out * float('nan')
            return out
        model.forward = nan_forward
        return model
    monkeypatch.setattr(runner, 'build_model', patched)


def test_non_finite_updates_are_skipped_and_counted(cfg_file, tmp_path, monkeypatch):
    _nan_after(monkeypatch, lambda n: n in (3, 4))
    assert _run(cfg_file, tmp_path, 'TRAIN.EPOCHS', '1', 'PRINT_FREQ', '1') == 0
    run_dir = tmp_path / 'tiny' / 'default'
    log = (run_dir / 'log_rank0.txt').read_text()
    assert 'skipped 1 update(s)' in log and '(last: update 2;' in log and '2 in this run' in log
    state = torch.load(run_dir / 'ckpt_epoch_0.pth', weights_only=True)
    assert all(torch.isfinite(v).all() for v in state['model'].values() if v.is_floating_point())
    assert all(torch.isfinite(s['exp_avg']).all() for s in state['optimizer']['state'].values())


def test_divergence_stops_with_a_checkpoint_and_exit_code_3(cfg_file, tmp_path, monkeypatch, capsys):
    _nan_after(monkeypatch, lambda n: n >= 3)
    assert _run(cfg_file, tmp_path, 'TRAIN.EPOCHS', '2', 'PRINT_FREQ', '1',
                'TRAIN.MAX_CONSECUTIVE_SKIPS', '3') == EXIT_DIVERGED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'consecutive' in err[0] and 'bf16' in err[0]
    run_dir = tmp_path / 'tiny' / 'default'
    latest = (run_dir / 'latest').read_text().strip()
    state = torch.load(run_dir / latest, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state['model'].values() if v.is_floating_point())


def test_a_second_run_into_the_same_folder_is_refused(cfg_file, tmp_path, capsys):
    import fcntl
    run_dir = tmp_path / 'tiny' / 'default'
    run_dir.mkdir(parents=True)
    with open(run_dir / '.lock', 'a+') as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write('4242\n')
        held.flush()
        assert _run(cfg_file, tmp_path, 'TRAIN.EPOCHS', '1') == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'another run (pid 4242)' in err[0]


def test_fresh_start_without_auto_resume_does_not_mix_with_an_existing_run(cfg_file, tmp_path, capsys):
    assert _run(cfg_file, tmp_path, 'TRAIN.EPOCHS', '1') == 0
    before = (tmp_path / 'tiny' / 'default' / 'metrics.jsonl').read_text()
    assert _run(cfg_file, tmp_path, 'TRAIN.EPOCHS', '1', 'TRAIN.AUTO_RESUME', 'False') == 2
    assert 'already holds checkpoints' in capsys.readouterr().err
    assert (tmp_path / 'tiny' / 'default' / 'metrics.jsonl').read_text() == before
    log = (tmp_path / 'tiny' / 'default' / 'log_rank0.txt').read_text()
    assert log.count('start training') == 1  # the log is appended to, never truncated


# --- every bad input: one line, exit code 2, no traceback, nothing written over ------------

@pytest.fixture(scope='module')
def bad_inputs(data_root, cfg_file, tmp_path_factory):
    """Files the table below points at: broken data trees, a torn and a foreign checkpoint."""
    root = tmp_path_factory.mktemp('bad')
    (root / 'no_val' / 'train' / 'a').mkdir(parents=True)
    shutil.copy(os.path.join(data_root, 'train', 'class0', '0.jpg'), root / 'no_val' / 'train' / 'a')
    (root / 'empty' / 'train').mkdir(parents=True)
    (root / 'empty' / 'val').mkdir(parents=True)
    shutil.copytree(data_root, root / 'mismatch')
    shutil.rmtree(root / 'mismatch' / 'val' / 'class2')
    assert _run(cfg_file, root / 'trained', 'TRAIN.EPOCHS', '1') == 0
    good = root / 'trained' / 'tiny' / 'default' / 'ckpt_epoch_0.pth'
    (root / 'torn.pth').write_bytes(good.read_bytes()[:3000])
    (root / 'a_file').write_text('')
    return {'root': str(root), 'good': str(good), 'torn': str(root / 'torn.pth')}


BAD_INPUTS = [  # (name, arguments after --cfg CFG, words the line must hold)
    ('missing config file', ['--cfg', '{root}/nope.yaml'], 'does not exist'),
    ('unknown key', ['--opts', 'MODEL.SWIN.DEPTH', '[2,2]'], "did you mean 'MODEL.SWIN.DEPTHS'"),
    ('wrong type', ['--opts', 'DATA.IMG_SIZE', 'big'], 'expects int'),
    ('image smaller than a patch', ['--opts', 'DATA.IMG_SIZE', '2'], 'smaller than one patch'),
    ('window size 0', ['--opts', 'MODEL.SWIN.WINDOW_SIZE', '0'], 'WINDOW_SIZE must be positive'),
    ('missing data path', ['--data-path', '{root}/nowhere'], 'does not exist'),
    ('missing split', ['--data-path', '{root}/no_val'], 'val'),
    ('empty dataset', ['--data-path', '{root}/empty'], 'class'),
    ('class mismatch', ['--data-path', '{root}/mismatch'], 'different classes'),
    ('missing checkpoint', ['--resume', '{root}/nope.pth'], 'does not exist'),
    ('corrupt checkpoint', ['--resume', '{torn}'], 'cannot read checkpoint'),
    ('another architecture', ['--resume', '{good}', '--opts', 'MODEL.SWIN.DEPTHS', '[2,3]'], 'layers.1.blocks.2'),
    ('eval without weights', ['--eval'], '--resume'),
    ('output not writable', ['--output', '{root}/a_file'], 'not writable'),
]


@pytest.mark.parametrize('name,args,words', BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_code_2(bad_inputs, cfg_file, tmp_path, name, args, words):
    args = [a.format(**bad_inputs) for a in args]
    cfg = [] if '--cfg' in args else ['--cfg', cfg_file]
    out = [] if '--output' in args else ['--output', str(tmp_path / 'out')]
    before = {p: open(p, 'rb').read() for p in (bad_inputs['torn'], bad_inputs['good'])}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *cfg, *out, *args],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith('error'), proc.stderr[-2000:]
    assert words in lines[0] and 'Traceback' not in proc.stderr
    assert all(open(p, 'rb').read() == data for p, data in before.items())  # nothing written over
    assert not list(tmp_path.rglob('*.pth'))


def test_torchrun_world_larger_than_the_dataset_is_one_line_per_rank(cfg_file, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           '--master_port', str(free_port()), os.path.join(ROOT, 'main.py'),
                           '--cfg', cfg_file, '--output', str(tmp_path), '--batch-size', '32'],
                          capture_output=True, text=True, timeout=300, env=env)
    ours = [line for line in proc.stderr.splitlines() if line.startswith('error')]
    assert proc.returncode != 0 and len(ours) == 2, proc.stderr[-3000:]
    assert all('fewer than one batch' in line for line in ours)

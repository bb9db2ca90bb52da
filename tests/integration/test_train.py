"""Training, resume and evaluation end to end through main.py, on a generated JPEG folder
(three colour classes) and a tiny Swin: outputs, accumulation, exact resume, eval-only
under torchrun, and the one-line errors."""
import glob
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import main
from engine.guard import clip_grad_norm
from engine.loops import train_one_epoch
from helpers.runs import N_VAL, ROOT, free_port, one_line_error, read_metrics, read_weights, run_main


@pytest.fixture(scope='module')
def trained(cfg_file, tmp_path_factory):
    """One uninterrupted 3-epoch run, shared by the tests that inspect its outputs."""
    out = tmp_path_factory.mktemp('run')
    assert run_main(cfg_file, out, '--opts', 'TRAIN.EPOCHS', '3', 'SAVE_KEEP_LAST', '2') == 0
    return out / 'tiny' / 'default'


def test_training_writes_logs_metrics_checkpoints_and_events(trained):
    lines = read_metrics(trained)
    assert [m['epoch'] for m in lines] == [0, 1, 2]
    for m in lines:
        assert {'epoch', 'train_loss', 'acc1', 'acc5', 'val_loss', 'lr', 'img_per_s'} <= set(m)
        assert m['n_images'] == 3 * N_VAL and 0 <= m['acc1'] <= m['acc5'] <= 100 and m['img_per_s'] > 0
    assert lines[2]['train_loss'] < lines[0]['train_loss']  # it learns
    assert lines[2]['val_loss'] < lines[0]['val_loss']
    assert lines[-1]['max_acc1'] == max(m['acc1'] for m in lines)

    # SAVE_KEEP_LAST 2 pruned epoch 0; best.pth is a full checkpoint; nothing half-written
    assert sorted(os.path.basename(p) for p in glob.glob(str(trained / 'ckpt_epoch_*.pth'))) == \
        ['ckpt_epoch_1.pth', 'ckpt_epoch_2.pth']
    assert not glob.glob(str(trained / '*.tmp*'))
    state = torch.load(trained / 'ckpt_epoch_2.pth', map_location='cpu', weights_only=True)
    assert {'model', 'optimizer', 'lr_scheduler', 'scaler', 'epoch', 'max_accuracy', 'config', 'ranks'} <= set(state)
    assert state['epoch'] == 2 and isinstance(state['config'], str) and 'BASE_LR' in state['config']
    assert state['lr_scheduler']['num_updates'] == 3 * 6 - 1  # the index the next update uses (official loop)
    best = torch.load(trained / 'best.pth', map_location='cpu', weights_only=True)
    assert best['max_accuracy'] == max(m['acc1'] for m in lines)

    log = (trained / 'log_rank0.txt').read_text()
    step_line = next(line for line in log.splitlines() if 'Train: [1/3][2/6]' in line)
    for field in ('eta', ' lr ', ' wd ', ' time ', ' data ', 'img/s', 'loss', 'grad_norm', 'mem'):
        assert field in step_line, field
    assert 'effective batch 8' in log and 'parameters' in log and 'torch' in log
    assert (trained / 'config.yaml').exists()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(trained))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    assert {'train/loss', 'train/lr', 'train/grad_norm', 'epoch/acc1', 'epoch/acc5', 'epoch/val_loss',
            'epoch/img_per_s'} <= tags
    assert [e.value for e in events.Scalars('epoch/acc1')] == pytest.approx([m['acc1'] for m in lines])


def test_accumulation_equals_one_large_batch(cfg_file, tmp_path):
    """2 micro-batches of 4 give the update of one batch of 8 (fp32, no dropout, no mixup)."""
    assert run_main(cfg_file, tmp_path / 'big', '--opts', 'TRAIN.EPOCHS', '1') == 0
    assert run_main(cfg_file, tmp_path / 'acc', '--batch-size', '4', '--accumulation-steps', '2',
                '--opts', 'TRAIN.EPOCHS', '1') == 0
    big, acc = (tmp_path / name / 'tiny' / 'default' for name in ('big', 'acc'))
    w_big, w_acc = read_weights(big / 'ckpt_epoch_0.pth'), read_weights(acc / 'ckpt_epoch_0.pth')
    # 6 updates; the schedule index of the next one is 5, as in the official loop
    assert torch.load(acc / 'ckpt_epoch_0.pth', weights_only=True)['lr_scheduler']['num_updates'] == 5
    for key in w_big:
        torch.testing.assert_close(w_acc[key], w_big[key], rtol=1e-4, atol=1e-6)
    (m_big,), (m_acc,) = read_metrics(big), read_metrics(acc)
    assert m_acc['train_loss'] == pytest.approx(m_big['train_loss'], rel=1e-5)  # the true loss is logged
    assert m_acc['lr'] == pytest.approx(m_big['lr'])


@pytest.mark.parametrize('workers', [0, 1])
def test_resume_continues_exactly(cfg_file, tmp_path, workers):
    """Resuming the epoch-0 checkpoint of a 3-epoch run reproduces the uninterrupted run:
    epoch numbering, LR, optimizer state and weights, bit for bit. Drop path (torch RNG),
    mixup (numpy RNG) and random erasing (python and torch RNG) make the restored random
    states matter."""
    first = tmp_path / 'first'
    randomness = ['MODEL.DROP_PATH_RATE', '0.2', 'AUG.MIXUP', '0.8', 'AUG.REPROB', '0.5',
                  'DATA.NUM_WORKERS', str(workers)]
    assert run_main(cfg_file, first, '--opts', 'TRAIN.EPOCHS', '3', 'SAVE_KEEP_LAST', '0', *randomness) == 0
    run_dir = first / 'tiny' / 'default'
    resumed = tmp_path / 'resumed' / 'tiny' / 'default'
    resumed.mkdir(parents=True)
    shutil.copy(run_dir / 'ckpt_epoch_0.pth', resumed)  # auto-resume finds it
    (resumed / 'metrics.jsonl').write_text((run_dir / 'metrics.jsonl').read_text())  # as if killed later
    assert run_main(cfg_file, tmp_path / 'resumed', '--opts', 'TRAIN.EPOCHS', '3', *randomness) == 0

    assert [m['epoch'] for m in read_metrics(resumed)] == [0, 1, 2]  # each epoch once
    for a, b in zip(read_metrics(run_dir), read_metrics(resumed)):
        assert a['lr'] == b['lr'] and a['train_loss'] == b['train_loss'] and a['acc1'] == b['acc1']
    end_a = torch.load(run_dir / 'ckpt_epoch_2.pth', weights_only=True)
    end_b = torch.load(resumed / 'ckpt_epoch_2.pth', weights_only=True)
    for key, value in end_a['model'].items():
        assert torch.equal(value, end_b['model'][key]), key
    for pid, st in end_a['optimizer']['state'].items():
        assert torch.equal(st['exp_avg'], end_b['optimizer']['state'][pid]['exp_avg'])
    assert end_b['lr_scheduler'] == end_a['lr_scheduler']
    log = (resumed / 'log_rank0.txt').read_text()
    assert 'auto-resume' in log and 'continuing at epoch 1' in log


def test_explicit_resume_wins_over_auto_resume(cfg_file, trained, tmp_path):
    out = tmp_path / 'out'
    run_dir = out / 'tiny' / 'default'
    run_dir.mkdir(parents=True)
    shutil.copy(trained / 'ckpt_epoch_2.pth', run_dir)  # newest in the folder: would finish the run
    assert run_main(cfg_file, out, '--resume', str(trained / 'ckpt_epoch_1.pth'), '--opts', 'TRAIN.EPOCHS', '3') == 0
    log = (run_dir / 'log_rank0.txt').read_text()
    assert 'auto-resume would have taken' in log and 'continuing at epoch 2' in log
    assert [m['epoch'] for m in read_metrics(run_dir)] == [2]
    # the abandoned timeline's newer checkpoint was set aside (kept), not overwritten unseen
    assert (run_dir / 'ckpt_epoch_2.pth.stale').exists() and 'renamed' in log


def test_pruning_only_counts_checkpoints_up_to_the_current_epoch(tmp_path):
    from checkpoints import folder
    for epoch in range(5):
        (tmp_path / folder.epoch_checkpoint_name(epoch)).write_bytes(b'x')
    removed = folder.prune_checkpoints(str(tmp_path), keep_last=1, current_epoch=2)
    assert sorted(os.path.basename(p) for p in removed) == ['ckpt_epoch_0.pth', 'ckpt_epoch_1.pth']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt_epoch_2.pth', 'ckpt_epoch_3.pth', 'ckpt_epoch_4.pth']


@pytest.mark.parametrize('dtype', ['bf16', 'fp16'])
def test_amp_dtypes_train(cfg_file, tmp_path, dtype):
    assert run_main(cfg_file, tmp_path, '--opts', 'TRAIN.EPOCHS', '1', 'AMP_ENABLE', 'True', 'AMP_DTYPE', dtype) == 0
    log = (tmp_path / 'tiny' / 'default' / 'log_rank0.txt').read_text()
    assert f'{dtype} autocast' in log
    assert ('loss_scale' in log) == (dtype == 'fp16')  # a scaler only for fp16
    state = torch.load(tmp_path / 'tiny' / 'default' / 'ckpt_epoch_0.pth', weights_only=True)
    assert (state['scaler'] is not None) == (dtype == 'fp16')


def test_eval_in_process_writes_a_metrics_line(cfg_file, trained, tmp_path, capsys):
    assert run_main(cfg_file, tmp_path, '--eval', '--resume', str(trained / 'ckpt_epoch_2.pth')) == 0
    run_dir = tmp_path / 'tiny' / 'default'
    (line,) = read_metrics(run_dir)
    assert line['mode'] == 'eval' and line['n_images'] == 3 * N_VAL and line['epoch'] == 2
    assert line['acc1'] == pytest.approx(read_metrics(trained)[-1]['acc1'])
    assert not glob.glob(str(run_dir / '*.pth'))  # never trains, never saves


@pytest.mark.parametrize('nproc', [1, 2])
def test_eval_under_torchrun_counts_every_image_once(cfg_file, trained, tmp_path, nproc):
    out = tmp_path / f'np{nproc}'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
                           '--master_port', str(free_port()), os.path.join(ROOT, 'main.py'),
                           '--cfg', cfg_file, '--output', str(out), '--eval',
                           '--pretrained', str(trained / 'ckpt_epoch_2.pth')],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = read_metrics(out / 'tiny' / 'default')
    reference = read_metrics(trained)[-1]
    assert line['n_images'] == 3 * N_VAL
    assert line['acc1'] == pytest.approx(reference['acc1'], abs=1e-9)
    assert line['acc5'] == pytest.approx(reference['acc5'], abs=1e-9)
    assert line['val_loss'] == pytest.approx(reference['val_loss'], rel=1e-5)
    assert (out / 'tiny' / 'default' / f'log_rank{nproc - 1}.txt').exists()


def test_clip_grad_zero_leaves_gradients_untouched():
    model = torch.nn.Linear(4, 3)
    model(torch.randn(5, 4)).pow(2).sum().mul(100).backward()
    params = list(model.parameters())
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm(params, clip=None)
    assert all(torch.equal(b, p.grad) for b, p in zip(before, params))
    assert norm.item() == pytest.approx(torch.cat([b.flatten() for b in before]).norm().item(), rel=1e-6)
    clipped = clip_grad_norm(params, clip=1.0)
    assert clipped.item() == pytest.approx(norm.item(), rel=1e-6)  # the norm before clipping
    assert torch.cat([p.grad.flatten() for p in params]).norm().item() == pytest.approx(1.0, rel=1e-4)


def test_no_sync_on_micro_steps_that_do_not_update(cfg_file, tmp_path, monkeypatch):
    """Under DDP, gradients are all-reduced only on the micro-step that updates."""
    import argparse
    import logging

    from config import get_config
    from data import build_loader
    from distributed.process_group import DistContext
    from engine.trainer import Trainer
    from models import build_model

    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        config = get_config(argparse.Namespace(cfg=cfg_file, opts=['TRAIN.ACCUMULATION_STEPS', '3',
                                                                   'OUTPUT', str(tmp_path)]))
        _, _, loader, loader_val, _ = build_loader(config, 0, 1)
        ctx = DistContext(0, 1, 0, torch.device('cpu'))
        trainer = Trainer(config, ctx, build_model(config), loader, loader_val, None, None, logging.getLogger('nosync'))
        ddp = trainer.train_module
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        entered = []
        original = ddp.no_sync

        def counting_no_sync():
            entered.append(1)
            return original()
        monkeypatch.setattr(ddp, 'no_sync', counting_no_sync)
        stats = train_one_epoch(trainer, loader, 0)
    finally:
        dist.destroy_process_group()
    assert len(loader) == 6 and stats.updates == 2
    assert len(entered) == 4  # 2 updates x (3 - 1) micro-steps without an all-reduce


# --- one-line errors ------------------------------------------------------------------------


def test_eval_without_weights_is_refused(cfg_file, tmp_path, capsys):
    assert run_main(cfg_file, tmp_path, '--eval') == 2
    assert '--resume' in one_line_error(capsys) and not any(tmp_path.iterdir())


def test_missing_and_corrupt_checkpoints(cfg_file, trained, tmp_path, capsys):
    assert run_main(cfg_file, tmp_path / 'a', '--eval', '--resume', str(tmp_path / 'nope.pth')) == 2
    assert 'does not exist' in one_line_error(capsys)
    torn = tmp_path / 'torn.pth'
    torn.write_bytes((trained / 'ckpt_epoch_2.pth').read_bytes()[:5000])
    assert run_main(cfg_file, tmp_path / 'b', '--eval', '--resume', str(torn)) == 2
    assert 'cannot read checkpoint' in one_line_error(capsys)
    assert torn.stat().st_size == 5000  # never touched


def test_checkpoint_of_another_architecture_names_the_keys(cfg_file, trained, tmp_path, capsys):
    assert run_main(cfg_file, tmp_path, '--eval', '--resume', str(trained / 'ckpt_epoch_2.pth'),
                '--opts', 'MODEL.SWIN.DEPTHS', '[2, 3]') == 2
    line = one_line_error(capsys)
    assert 'does not fit this model' in line and 'layers.1.blocks.2' in line


def test_auto_resume_skips_a_torn_newest_checkpoint(cfg_file, trained, tmp_path):
    run_dir = tmp_path / 'tiny' / 'default'
    run_dir.mkdir(parents=True)
    shutil.copy(trained / 'ckpt_epoch_1.pth', run_dir)
    (run_dir / 'ckpt_epoch_2.pth').write_bytes(b'torn')
    assert run_main(cfg_file, tmp_path, '--opts', 'TRAIN.EPOCHS', '3') == 0
    log = (run_dir / 'log_rank0.txt').read_text()
    assert 'auto-resume skips' in log and 'ckpt_epoch_2.pth' in log and 'continuing at epoch 2' in log


def test_resuming_with_another_optimizer_is_one_line(cfg_file, trained, tmp_path, capsys):
    assert run_main(cfg_file, tmp_path, '--optim', 'sgd', '--resume', str(trained / 'ckpt_epoch_1.pth'),
                '--opts', 'TRAIN.EPOCHS', '3') == 2
    assert 'another optimizer' in one_line_error(capsys)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    import utils
    path = tmp_path / 'ckpt_epoch_0.pth'
    utils.atomic_save({'model': {'w': torch.ones(2)}}, str(path))

    def full_disk(obj, f):
        f.write(b'partial')
        raise RuntimeError('[enforce fail at inline_container.cc] unexpected pos')  # torch's ENOSPC
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(utils.OutputError, match='previous file is untouched'):
        utils.atomic_save({'model': {'w': torch.zeros(2)}}, str(path))
    assert os.listdir(tmp_path) == ['ckpt_epoch_0.pth']
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)['model']['w'], torch.ones(2))


def test_a_write_error_on_rank_0_stops_every_rank_with_one_line(cfg_file, tmp_path):
    out = tmp_path / 'out'
    (out / 'tiny' / 'default' / 'best.pth').mkdir(parents=True)  # cannot be replaced by a file
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           '--master_port', str(free_port()), os.path.join(ROOT, 'main.py'),
                           '--cfg', cfg_file, '--output', str(out), '--batch-size', '4',
                           '--opts', 'TRAIN.EPOCHS', '1', 'TRAIN.AUTO_RESUME', 'False'],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"error (rank {rank}): cannot write '" in proc.stderr, proc.stderr[-3000:]
    assert 'Connection reset' not in proc.stderr


def test_prepare_into_an_unwritable_place_is_one_line(tmp_path, capsys):
    (tmp_path / 'file').write_text('')
    demo = os.path.join(ROOT, 'configs', 'demo', 'swin_micro_digits.yaml')
    assert main.main(['--cfg', demo, '--data-path', str(tmp_path / 'file' / 'digits'),
                      '--output', str(tmp_path / 'out')]) == 2
    assert 'cannot write the digits dataset' in one_line_error(capsys)


def test_output_folder_not_writable(cfg_file, tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    assert run_main(cfg_file, blocker) == 2
    assert 'not writable' in one_line_error(capsys)


def test_demo_config_prepares_its_data_and_trains(tmp_path):
    """The README demo, cut to one epoch: DATA.PREPARE writes the digits on first use."""
    data = tmp_path / 'digits'
    demo = os.path.join(ROOT, 'configs', 'demo', 'swin_micro_digits.yaml')
    assert main.main(['--cfg', demo, '--data-path', str(data), '--output', str(tmp_path / 'out'),
                      '--opts', 'TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0']) == 0
    assert sorted(os.listdir(data / 'train')) == [str(c) for c in range(10)]
    (line,) = read_metrics(tmp_path / 'out' / 'swin_micro_digits' / 'default')
    assert line['n_images'] == 359 and line['val_loss'] < math.log(10)  # better than guessing already

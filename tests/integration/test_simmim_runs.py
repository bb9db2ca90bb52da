"""SimMIM pre-training through main.py (`--simmim-pretrain` on a Swin config): per-epoch
training and validation reconstruction losses, the reconstruction pictures, a checkpoint with
the official SimMIM keys that resumes bit for bit, and fine-tuning from it with --pretrained."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.runs import ROOT, free_port, read_metrics, run_main, stop_at
from utils import EXIT_PREEMPTED

PRETRAIN = ['--simmim-pretrain', '--opts', 'DATA.MASK_PATCH_SIZE', '8', 'DATA.MASK_RATIO', '0.5',
            'SAVE_KEEP_LAST', '0', 'SAVE_FREQ', '1', 'MODEL.DROP_PATH_RATE', '0.1']


@pytest.fixture(scope='module')
def pretrained(cfg_file, tmp_path_factory):
    """A 3-epoch SimMIM pre-training of the tiny Swin; its run folder."""
    out = tmp_path_factory.mktemp('pretrain')
    assert run_main(cfg_file, out, *PRETRAIN, 'TRAIN.EPOCHS', '3') == 0
    return out / 'tiny' / 'default'


def test_pretraining_logs_reconstruction_losses_and_pictures(pretrained):
    metrics = read_metrics(pretrained)
    assert [m['epoch'] for m in metrics] == [0, 1, 2]
    for m in metrics:
        assert 0 < m['train_loss'] < 10 and 0 < m['val_loss'] < 10 and m['n_images'] == 21
        assert 'acc1' not in m
    assert metrics[-1]['train_loss'] < metrics[0]['train_loss']
    for epoch in range(3):
        with Image.open(pretrained / f'reconstruction_epoch{epoch:03d}.png') as picture:
            # 8 validation images spread over the classes, each as original | masked |
            # reconstruction, enlarged 4x (32 px images)
            assert picture.size == (3 * 128, 8 * 128) and picture.mode == 'RGB'
            pixels = np.asarray(picture)
    masked = pixels[:, 128:256]
    assert (masked == 128).all(axis=2).mean() > 0.3  # about half the squares hidden in grey
    assert not np.array_equal(pixels[:, :128], pixels[:, 256:])  # the masked part is predicted
    # the colour classes: the first picked image is red, the last blue
    assert pixels[:128, :128, 0].mean() > pixels[:128, :128, 2].mean()
    assert pixels[-128:, :128, 2].mean() > pixels[-128:, :128, 0].mean()
    log = (pretrained / 'log_rank0.txt').read_text()
    assert 'SimMIM pre-training' in log and 'reconstruction loss' in log


def test_pretraining_checkpoint_has_the_official_simmim_keys(pretrained):
    state = torch.load(pretrained / 'ckpt_epoch_2.pth', map_location='cpu', weights_only=True)
    keys = set(state['model'])
    assert {'encoder.mask_token', 'decoder.0.weight', 'decoder.0.bias'} <= keys
    assert all(k.startswith(('encoder.', 'decoder.')) for k in keys)
    assert 'PRETRAIN: true' in state['config']


def test_pretraining_resumes_bit_for_bit(cfg_file, pretrained, tmp_path):
    resumed = tmp_path / 'resumed' / 'tiny' / 'default'
    resumed.mkdir(parents=True)
    shutil.copy(pretrained / 'ckpt_epoch_0.pth', resumed)
    (resumed / 'metrics.jsonl').write_text((pretrained / 'metrics.jsonl').read_text())
    assert run_main(cfg_file, tmp_path / 'resumed', *PRETRAIN, 'TRAIN.EPOCHS', '3') == 0
    for a, b in zip(read_metrics(pretrained), read_metrics(resumed)):
        assert a['train_loss'] == b['train_loss'] and a['val_loss'] == b['val_loss'] and a['lr'] == b['lr']
    end_a = torch.load(pretrained / 'ckpt_epoch_2.pth', weights_only=True)['model']
    end_b = torch.load(resumed / 'ckpt_epoch_2.pth', weights_only=True)['model']
    assert all(torch.equal(value, end_b[key]) for key, value in end_a.items())


def test_pretraining_stopped_mid_epoch_resumes_bit_for_bit(cfg_file, tmp_path, monkeypatch):
    """A stop signal after update 2 (of 6 per epoch): the mid-epoch checkpoint, resumed with a
    loader worker, ends with the uninterrupted run's weights and losses."""
    opts = [*PRETRAIN, 'TRAIN.EPOCHS', '2', 'SAVE_STEP_FREQ', '4', 'DATA.NUM_WORKERS', '1']
    assert run_main(cfg_file, tmp_path / 'whole', *opts) == 0
    with monkeypatch.context() as m:
        stop_at(m, 2)
        assert run_main(cfg_file, tmp_path / 'cut', *opts) == EXIT_PREEMPTED
    cut, whole = tmp_path / 'cut' / 'tiny' / 'default', tmp_path / 'whole' / 'tiny' / 'default'
    assert (cut / 'ckpt_step_2.pth').exists()
    assert run_main(cfg_file, tmp_path / 'cut', *opts) == 0
    end_a = torch.load(whole / 'ckpt_epoch_1.pth', weights_only=True)['model']
    end_b = torch.load(cut / 'ckpt_epoch_1.pth', weights_only=True)['model']
    assert all(torch.equal(value, end_b[key]) for key, value in end_a.items())
    assert [m['train_loss'] for m in read_metrics(whole)] == [m['train_loss'] for m in read_metrics(cut)]


def test_fine_tuning_starts_from_the_pretrained_encoder(cfg_file, pretrained, tmp_path):
    out = tmp_path / 'finetune'
    assert run_main(cfg_file, out, '--pretrained', str(pretrained / 'ckpt_epoch_2.pth'),
                    '--opts', 'TRAIN.EPOCHS', '1') == 0
    run_dir = out / 'tiny' / 'default'
    metrics = read_metrics(run_dir)
    assert len(metrics) == 1 and 'acc1' in metrics[0]
    log = (run_dir / 'log_rank0.txt').read_text()
    assert 'simmim-format weights' in log
    assert 'not used by the classifier: decoder.0.bias, decoder.0.weight, encoder.mask_token' in log
    assert "classifier: the model's own initialization" in log


@pytest.mark.parametrize('parallel', ['ddp', 'fsdp'])
def test_pretraining_under_torchrun_with_amp_and_accumulation(cfg_file, tmp_path, parallel):
    """Two processes (gloo), bf16 autocast, 2 micro-batches per update, DDP or FSDP (whose
    gathers the picture's forward must take part in): every validation image counted once,
    both ranks' logs, the picture, the official checkpoint keys."""
    out = tmp_path / parallel
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           '--master_port', str(free_port()), os.path.join(ROOT, 'main.py'),
                           '--cfg', cfg_file, '--output', str(out), '--accumulation-steps', '2', *PRETRAIN,
                           'TRAIN.EPOCHS', '1', 'AMP_ENABLE', 'True', 'AMP_DTYPE', 'bf16', 'TRAIN.PARALLEL', parallel],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = out / 'tiny' / 'default'
    (line,) = read_metrics(run_dir)
    assert line['n_images'] == 21 and 0 < line['val_loss'] < 10 and line['updates'] == 48 // 2 // 8 // 2
    assert (run_dir / 'log_rank1.txt').exists() and (run_dir / 'reconstruction_epoch000.png').exists()
    assert 'precision: bf16 autocast' in (run_dir / 'log_rank0.txt').read_text()
    if parallel == 'ddp':
        assert 'decoder.0.weight' in torch.load(run_dir / 'ckpt_epoch_0.pth', weights_only=True)['model']
    else:
        assert (run_dir / 'ckpt_epoch_0.dcp').is_dir()

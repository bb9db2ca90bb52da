"""LAMB and LARS through main.py: one-line mistakes, training and exact resume."""
import math
import shutil

import pytest
import torch

import main
from helpers.runs import read_metrics


@pytest.mark.parametrize('name', ['lamb', 'lars'])
def test_training_and_exact_resume_through_main(cfg_file, tmp_path, name):
    """Two epochs with LAMB / LARS write metrics and checkpoints; resuming the epoch-0
    checkpoint reproduces the second epoch bit for bit (moments, momentum, step counts)."""
    opts = ['--optim', name, '--opts', 'TRAIN.EPOCHS', '2', 'SAVE_KEEP_LAST', '0', 'TRAIN.BASE_LR', '0.5']
    first = tmp_path / 'first'
    assert main.main(['--cfg', cfg_file, '--output', str(first)] + opts) == 0
    run_dir = first / 'tiny' / 'default'
    lines = read_metrics(run_dir)
    assert [m['epoch'] for m in lines] == [0, 1]
    assert all(math.isfinite(m['train_loss']) and math.isfinite(m['val_loss']) for m in lines)
    log = (run_dir / 'log_rank0.txt').read_text()
    assert 'skipped' not in log  # no non-finite update

    resumed = tmp_path / 'resumed' / 'tiny' / 'default'
    resumed.mkdir(parents=True)
    shutil.copy(run_dir / 'ckpt_epoch_0.pth', resumed)
    (resumed / 'metrics.jsonl').write_text((run_dir / 'metrics.jsonl').read_text().splitlines()[0] + '\n')
    assert main.main(['--cfg', cfg_file, '--output', str(tmp_path / 'resumed')] + opts) == 0
    assert 'continuing at epoch 1' in (resumed / 'log_rank0.txt').read_text()
    assert [m['epoch'] for m in read_metrics(resumed)] == [0, 1]
    a = torch.load(run_dir / 'ckpt_epoch_1.pth', map_location='cpu', weights_only=True)
    b = torch.load(resumed / 'ckpt_epoch_1.pth', map_location='cpu', weights_only=True)
    assert read_metrics(resumed)[1]['train_loss'] == lines[1]['train_loss']
    for key, value in a['model'].items():
        assert torch.equal(value, b['model'][key]), key
    assert a['optimizer']['state'].keys() == b['optimizer']['state'].keys()
    for pid, state in a['optimizer']['state'].items():
        for key, value in state.items():
            assert torch.equal(value, b['optimizer']['state'][pid][key]), (pid, key)
    if name == 'lamb':  # 6 updates per epoch, counted per parameter in the file
        assert {int(s['step']) for s in a['optimizer']['state'].values()} == {12}

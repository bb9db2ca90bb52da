"""main.py on WebDataset shards (DATA.DATASET wds) written by tools/make_shards.py: training
from the shards of a folder is the run trained from the folder (same metrics, same
weights), and a folder without shards ends in one line."""
import pytest
import torch

from helpers.runs import N_VAL, one_line_error, read_metrics, read_weights, run_main
from tools.make_shards import main as make_shards_main


@pytest.fixture(scope='module')
def shard_root(data_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('wds') / 'shards')
    assert make_shards_main([data_root, out, '--maxcount', '10']) == 0
    return out


def test_training_from_shards_equals_training_from_the_folder(cfg_file, shard_root, tmp_path):
    opts = ['TRAIN.EPOCHS', '1', 'DATA.NUM_WORKERS', '2']
    assert run_main(cfg_file, tmp_path / 'folder', '--opts', *opts) == 0
    assert run_main(cfg_file, tmp_path / 'wds', '--data-path', shard_root, '--opts', 'DATA.DATASET', 'wds', *opts) == 0
    folder, shards = (read_metrics(tmp_path / name / 'tiny' / 'default') for name in ('folder', 'wds'))
    assert shards[0]['n_images'] == 3 * N_VAL
    for key in ('train_loss', 'acc1', 'acc5', 'val_loss', 'lr'):
        assert shards[0][key] == folder[0][key], key
    a, b = (read_weights(tmp_path / name / 'tiny' / 'default' / 'ckpt_epoch_0.pth') for name in ('folder', 'wds'))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_folder_without_shards_is_one_line_and_exit_2(cfg_file, tmp_path, capsys):
    rc = run_main(cfg_file, tmp_path / 'out', '--data-path', str(tmp_path), '--opts', 'DATA.DATASET', 'wds')
    assert rc == 2 and '-*.tar' in one_line_error(capsys)

"""main.py on a Hugging Face DatasetDict (DATA.DATASET hf): one epoch of the tiny Swin scored
on every validation image, and a folder that is no dataset ending in one line."""
import os

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

from data.sources import FolderSource
from helpers.runs import N_VAL, one_line_error, read_metrics, run_main


def _split(folder) -> Dataset:
    src = FolderSource(folder)
    images = [{'bytes': open(p, 'rb').read(), 'path': os.path.basename(p)} for p, _ in src.samples]
    return Dataset.from_dict({'image': images, 'label': src.samples.labels.tolist()},
                             features=Features({'image': Image(), 'label': ClassLabel(names=src.classes)}))


@pytest.fixture(scope='module')
def saved(data_root, tmp_path_factory):
    path = str(tmp_path_factory.mktemp('hf') / 'saved')
    DatasetDict(train=_split(os.path.join(data_root, 'train')),
                validation=_split(os.path.join(data_root, 'val'))).save_to_disk(path)
    return path


def test_one_epoch_on_a_saved_dataset_dict(cfg_file, saved, tmp_path):
    rc = run_main(cfg_file, tmp_path, '--data-path', saved, '--opts', 'DATA.DATASET', 'hf',
                  'TRAIN.EPOCHS', '1', 'DATA.NUM_WORKERS', '2')
    assert rc == 0
    lines = read_metrics(tmp_path / 'tiny' / 'default')
    assert [m['epoch'] for m in lines] == [0]
    assert lines[0]['n_images'] == 3 * N_VAL and 0 <= lines[0]['acc1'] <= 100


def test_folder_that_is_no_dataset_is_one_line_and_exit_2(cfg_file, tmp_path, capsys):
    bad = tmp_path / 'not_a_dataset'
    (bad / 'train').mkdir(parents=True)
    rc = run_main(cfg_file, tmp_path / 'out', '--data-path', str(bad), '--opts', 'DATA.DATASET', 'hf')
    assert rc == 2 and str(bad) in one_line_error(capsys)

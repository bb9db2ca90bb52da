"""main.py end to end: --throughput on the demo config, and a mistake found after start-up."""
import os

import yaml

import main
from helpers.runs import ROOT

DEMO = os.path.join(ROOT, 'configs', 'demo', 'swin_micro_112.yaml')


def test_throughput_runs_and_writes_config_and_log(tmp_path, capsys):
    rc = main.main(['--cfg', DEMO, '--throughput', '--batch-size', '2', '--output', str(tmp_path),
                    '--tag', 't1', '--disable_amp'])
    assert rc == 0
    run_dir = tmp_path / 'swin_micro_patch4_window7_112' / 't1'
    saved = yaml.safe_load((run_dir / 'config.yaml').read_text())
    assert saved['DATA']['BATCH_SIZE'] == 2 and saved['AMP_ENABLE'] is False
    log = (run_dir / 'log_rank0.txt').read_text()
    assert 'batch_size 2 throughput' in log and '(cpu, fp32, synthetic input)' in log
    assert not list(run_dir.glob('*.tmp'))


def test_training_without_data_path_is_one_line_and_writes_no_checkpoint(tmp_path, capsys):
    rc = main.main(['--cfg', DEMO, '--output', str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith('error:') and '--data-path' in err[0]
    assert not list(tmp_path.rglob('*.pth'))

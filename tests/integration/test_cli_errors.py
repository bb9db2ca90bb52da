"""`python main.py` with a mistake on the command line or in the YAML: one error line,
exit code 2, no traceback (run as real processes, concurrently)."""
import os
import subprocess
import sys

import pytest

from helpers.runs import ROOT, collect

SWIN_T = os.path.join(ROOT, 'configs', 'swin_tiny_patch4_window7_224.yaml')


def write(path, text: str):
    path.write_text(text)
    return path


CLI_CASES = {
    'missing_cfg': (['--cfg', 'configs/no_such_config.yaml'], ['no_such_config.yaml', 'does not exist']),
    'unknown_yaml_key': (None, ['MODEL.SWIN.WINDOWSIZE', "'MODEL.SWIN.WINDOW_SIZE'"]),
    'unknown_flag': (['--cfg', str(SWIN_T), '--bach-size', '64'], ['--bach-size', "'--batch-size'"]),
}


@pytest.fixture(scope='module')
def cli_results(tmp_path_factory):
    """Run the three `python main.py` cases concurrently (each one imports torch)."""
    bad = write(tmp_path_factory.mktemp('cli') / 'bad_key.yaml',
                'MODEL:\n  NAME: cli_case\n  SWIN:\n    WINDOWSIZE: 7\n')
    env = {k: v for k, v in os.environ.items() if k not in ('LOCAL_RANK', 'RANK', 'WORLD_SIZE')}
    procs = {}
    for name, (argv, _) in CLI_CASES.items():
        argv = argv if argv is not None else ['--cfg', str(bad)]
        procs[name] = subprocess.Popen([sys.executable, 'main.py', *argv], cwd=str(ROOT), env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return collect(procs, timeout=120)


@pytest.mark.parametrize('name', list(CLI_CASES))
def test_cli_mistake_gives_one_error_line_and_exit_2(cli_results, name):
    rc, out, err = cli_results[name]
    assert 'Traceback' not in out and 'Traceback' not in err, err
    assert rc == 2, (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith('\n'), f'stderr is not exactly one line: {err!r}'
    assert lines[0].startswith('error: ') and len(lines[0]) > len('error: ')
    for word in CLI_CASES[name][1]:
        assert word in lines[0], (word, lines[0])

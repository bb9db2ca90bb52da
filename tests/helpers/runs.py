"""Running main.py in tests: the tiny JPEG folder and config most runs use, and the readers
of a run's outputs."""
from __future__ import annotations

import json
import os
import socket
import subprocess

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLORS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
N_TRAIN, N_VAL = 16, 7  # per class; 21 validation images: an odd count for 2 ranks
TINY = """
DATA:
  IMG_SIZE: 32
  BATCH_SIZE: 8
  NUM_WORKERS: 0
  DATA_PATH: {data}
MODEL:
  NAME: tiny
  DROP_PATH_RATE: 0.0
  SWIN:
    EMBED_DIM: 16
    DEPTHS: [2, 2]
    NUM_HEADS: [2, 4]
    WINDOW_SIZE: 4
TRAIN:
  EPOCHS: 2
  WARMUP_EPOCHS: 1
  BASE_LR: 0.05
AUG:
  AUTO_AUGMENT: none
  MIXUP: 0.0
  CUTMIX: 0.0
  REPROB: 0.0
AMP_ENABLE: False
PRINT_FREQ: 2
"""


def write_color_folder(root) -> str:
    """train/ and val/ of three noisy colour classes (32 x 32 JPEGs), N_TRAIN and N_VAL per class."""
    rng = np.random.default_rng(0)
    for split, n in (('train', N_TRAIN), ('val', N_VAL)):
        for c, color in enumerate(COLORS):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True)
            for i in range(n):
                noisy = np.array(color)[None, None, :] + rng.normal(0, 60, (32, 32, 3))
                Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f'{i}.jpg', quality=90)
    return str(root)


def run_main(cfg_file, out, *extra) -> int:
    """main.py in this process; returns its exit code."""
    import main
    return main.main(['--cfg', cfg_file, '--output', str(out)] + list(extra))


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def read_weights(path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)['model']


def one_line_error(capsys) -> str:
    """The run's stderr is one `error...` line; returns it."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error'), err
    return err[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def collect(procs: dict[str, subprocess.Popen], timeout: float) -> dict:
    """name -> (exit code, stdout, stderr) of the started `procs`; kills any left running.
    Several command-line cases run at once: each pays the seconds of importing torch."""
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=timeout)
            results[name] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return results


def stop_at(monkeypatch, call: int) -> None:
    """Make every rank agree to stop at the `call`-th stop check (one after each optimizer
    update and one after each epoch's validation), as a signal would."""
    from engine import preemption
    seen = {'n': 0}

    def agreed(self, *updates_done):
        seen['n'] += 1
        if seen['n'] == call:
            self.signal_name = 'SIGTERM'
        return self.signal_name is not None
    monkeypatch.setattr(preemption.StopRequest, 'agreed', agreed)
    monkeypatch.setattr(preemption.StopRequest, 'agreed_after_update', agreed)

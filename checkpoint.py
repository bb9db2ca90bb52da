"""Checkpoint files: atomic writes, the newest readable one for auto-resume, strict model
loading with a one-line error, pruning, and the RNG states a resume restores.

A checkpoint is a plain dict (`model` in the official key format, `optimizer`,
`lr_scheduler`, `scaler`, `epoch`, `max_accuracy`, `config` as a YAML string, plus `step`,
`rng`, ...) that `torch.load(weights_only=True)` reads: no pickled objects.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch

EPOCH_FILE = re.compile(r'^ckpt_epoch_(\d+)\.pth$')
BEST_FILE = 'best.pth'
# derived buffers the model rebuilds itself; a file may carry them or not (see the model)
_DERIVED_SUFFIXES = ('relative_position_index', 'attn_mask')


class CheckpointError(ValueError):
    """A checkpoint the user named (or the run found) cannot be used; one line."""


def epoch_checkpoint_name(epoch: int) -> str:
    return f'ckpt_epoch_{epoch}.pth'


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`:
    a crash or a full disk leaves the previous file intact, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"cannot write checkpoint '{path}': {e.strerror or e}; "
                              f"the previous checkpoints are untouched") from None
    _fsync_dir(folder)


def atomic_link(src: str, dst: str) -> None:
    """Make `dst` hold the same bytes as `src` (a hard link where possible: no second write)."""
    tmp = f'{dst}.tmp-{os.getpid()}'
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"cannot write checkpoint '{dst}': {e.strerror or e}") from None
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))


def epoch_checkpoints(folder: str) -> list[tuple[int, str]]:
    """(epoch, path) of the epoch checkpoints in `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = EPOCH_FILE.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


def prune_checkpoints(folder: str, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` epoch checkpoints (0 keeps all); best.pth stays."""
    found = epoch_checkpoints(folder)
    if keep_last <= 0 or len(found) <= keep_last:
        return []
    removed = []
    for _, path in found[:-keep_last]:
        os.remove(path)
        removed.append(path)
    return removed


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint file safely (weights_only) on the CPU, or raise CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises several types for torn or foreign files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint '{path}' (truncated, or not a PyTorch "
                              f"checkpoint): {reason[:200]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a dict of weights")
    return obj


def newest_readable_checkpoint(folder: str, logger: logging.Logger) -> Optional[tuple[str, dict]]:
    """The newest epoch checkpoint in `folder` that loads; unreadable ones are skipped with
    a warning naming them (and left on disk for the user to inspect)."""
    for _, path in reversed(epoch_checkpoints(folder)):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as e:
            logger.warning(f'auto-resume skips {e}')
    return None


def model_state_dict(checkpoint: dict) -> dict:
    """The weights of an official/our checkpoint (`model` entry) or of a bare state dict,
    without DDP's `module.` prefix."""
    state = checkpoint.get('model', checkpoint)
    if not isinstance(state, dict):
        raise CheckpointError(f"the checkpoint's 'model' entry is a {type(state).__name__}, not a state dict")
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state.items()}


def _first(names: list[str], n: int = 3) -> str:
    more = f' and {len(names) - n} more' if len(names) > n else ''
    return ', '.join(names[:n]) + more


def load_model_weights(model: torch.nn.Module, state: dict, source: str) -> None:
    """Strict load that reports a mismatch as one line naming the first differing keys."""
    own = model.state_dict()
    derived = lambda k: k.endswith(_DERIVED_SUFFIXES)  # noqa: E731
    missing = [k for k in own if k not in state and not derived(k)]
    unexpected = [k for k in state if k not in own and not derived(k)]
    shapes = [f'{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}' for k in own
              if k in state and not derived(k) and hasattr(state[k], 'shape') and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f'missing {_first(missing)}')
    if unexpected:
        problems.append(f'unexpected {_first(unexpected)}')
    if shapes:
        problems.append(f'shape mismatch {_first(shapes, 2)}')
    if problems:
        raise CheckpointError(f"'{source}' does not fit this model (another architecture or config?): "
                              + '; '.join(problems))
    model.load_state_dict(state, strict=True)


def capture_rng() -> dict:
    """This process's RNG states, as tensors and plain numbers (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'gauss': float(gauss)},
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state['python'])
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])

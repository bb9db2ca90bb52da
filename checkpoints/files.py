"""Checkpoint files: atomic writes, the newest readable one for auto-resume, strict model
loading with a one-line error, pruning, and the RNG states a resume restores.

A checkpoint is a plain dict (`model` in the official key format, `optimizer`,
`lr_scheduler`, `scaler`, `epoch`, `max_accuracy`, `config` as a YAML string, plus `step`,
`rng`, ...) that `torch.load(weights_only=True)` reads: no pickled objects. Sharded runs
(TRAIN.PARALLEL fsdp) write the same content as a folder instead (`*.dcp`, see
sharded.py); the names, `latest`, pruning and auto-resume treat both alike.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import re
import shutil

import numpy as np
import torch

from utils import (  # noqa: F401
    TMP_MARK,
    CheckpointError,
    OutputError,
    atomic_save,
    atomic_write,
    atomic_write_text,
    error_line,
    fsync_dir,
)

EPOCH_FILE = re.compile(r'^ckpt_epoch_(\d+)\.(?:pth|dcp)$')
STEP_FILE = re.compile(r'^ckpt_step_(\d+)\.(?:pth|dcp)$')  # mid-epoch, numbered by optimizer updates done
BEST_FILE = 'best.pth'
BEST_FOLDER = 'best.dcp'
LATEST_FILE = 'latest'  # names the newest checkpoint; rewritten only after it is in place
# derived buffers the model rebuilds itself; a file may carry them or not (see the model)
DERIVED_SUFFIXES = ('relative_position_index', 'attn_mask', 'relative_coords_table')


def _suffix(sharded: bool) -> str:
    return 'dcp' if sharded else 'pth'


def epoch_checkpoint_name(epoch: int, sharded: bool = False) -> str:
    return f'ckpt_epoch_{epoch}.{_suffix(sharded)}'


def step_checkpoint_name(updates: int, sharded: bool = False) -> str:
    return f'ckpt_step_{updates}.{_suffix(sharded)}'


def best_name(sharded: bool = False) -> str:
    return BEST_FOLDER if sharded else BEST_FILE


def remove_other_best(folder: str, sharded: bool) -> None:
    """After a new best in one format, drop a best of the other format that an earlier run
    in this folder (with another TRAIN.PARALLEL) left, so only one best remains."""
    other = os.path.join(folder, best_name(not sharded))
    if os.path.exists(other):
        remove_checkpoint(other)


SET_ASIDE = TMP_MARK + 'old'  # a folder being replaced, for an instant


def remove_checkpoint(path: str) -> None:
    """Delete a checkpoint file or a sharded checkpoint folder."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def replace_folder(tmp: str, path: str) -> None:
    """Rename the finished folder `tmp` to `path`. A folder cannot be renamed over another,
    so an existing `path` is first renamed to a temporary name (auto-resume then falls back
    to the previous checkpoint for that instant) and deleted afterwards."""
    old = path + SET_ASIDE
    if os.path.exists(path):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    if os.path.exists(old):
        shutil.rmtree(old)


def _link_folder(src: str, dst: str) -> None:
    """A sharded checkpoint's copy made of hard links (copies where links are refused)."""
    tmp = f'{dst}{TMP_MARK}{os.getpid()}'
    if os.path.exists(tmp):
        shutil.rmtree(tmp)

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    try:
        shutil.copytree(src, tmp, copy_function=link)
        replace_folder(tmp, dst)
    except OSError as e:
        raise OutputError(f"cannot write '{dst}': {error_line(e)}; the previous one is untouched") from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def atomic_link(src: str, dst: str) -> None:
    """Make `dst` hold the same bytes as `src` (a hard link where possible: no second write)."""
    if os.path.isdir(src):
        _link_folder(src, dst)
        return
    tmp = f'{dst}{TMP_MARK}{os.getpid()}'
    try:
        if os.path.exists(tmp):
            os.remove(tmp)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:  # no hard links on this filesystem: copy
        with open(src, 'rb') as f:
            atomic_write(dst, lambda out: shutil.copyfileobj(f, out))
        return
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))


def remove_stale_temporaries(folder: str) -> list[str]:
    """Temporary files and folders left by a process killed while writing (never a
    finished checkpoint). A folder that `replace_folder` had set aside when the kill came
    is put back instead, if its replacement had not arrived."""
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.endswith(SET_ASIDE) and not os.path.exists(os.path.join(folder, name[:-len(SET_ASIDE)])):
            os.replace(os.path.join(folder, name), os.path.join(folder, name[:-len(SET_ASIDE)]))
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if TMP_MARK in name:
            remove_checkpoint(os.path.join(folder, name))
            removed.append(name)
    return removed


def _numbered(folder: str, pattern: re.Pattern) -> list[tuple[int, str]]:
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = pattern.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


def epoch_checkpoints(folder: str) -> list[tuple[int, str]]:
    """(epoch, path) of the epoch checkpoints in `folder`, oldest first."""
    return _numbered(folder, EPOCH_FILE)


def step_checkpoints(folder: str) -> list[tuple[int, str]]:
    """(updates done, path) of the mid-epoch checkpoints in `folder`, oldest first."""
    return _numbered(folder, STEP_FILE)


def mark_latest(folder: str, path: str) -> None:
    atomic_write_text(os.path.basename(path) + '\n', os.path.join(folder, LATEST_FILE))


def resume_candidates(folder: str) -> list[str]:
    """Checkpoints to try, newest first: the one `latest` names, then every epoch and
    mid-epoch checkpoint by modification time."""
    paths = [p for _, p in epoch_checkpoints(folder) + step_checkpoints(folder)]
    paths.sort(key=os.path.getmtime, reverse=True)
    marker = os.path.join(folder, LATEST_FILE)
    if os.path.isfile(marker):
        with open(marker) as f:
            named = os.path.join(folder, f.read().strip())
        if named in paths:
            paths.remove(named)
            paths.insert(0, named)
    return paths


def prune_checkpoints(folder: str, keep_last: int, current_epoch: int) -> list[str]:
    """Delete all but the newest `keep_last` epoch checkpoints up to `current_epoch` (0 keeps
    all); the current one is always kept, best.pth too."""
    found = [(e, p) for e, p in epoch_checkpoints(folder) if e <= current_epoch]
    if keep_last <= 0 or len(found) <= keep_last:
        return []
    removed = []
    for _, path in found[:-keep_last]:
        remove_checkpoint(path)
        removed.append(path)
    return removed


def prune_step_checkpoints(folder: str, keep_from: int) -> None:
    """Delete mid-epoch checkpoints older than `keep_from` updates: a newer one supersedes them."""
    for updates, path in step_checkpoints(folder):
        if updates < keep_from:
            remove_checkpoint(path)


def set_aside_later_checkpoints(folder: str, epoch: int, updates: int, keep: str | None = None) -> list[str]:
    """Rename epoch checkpoints of epochs after `epoch` and mid-epoch ones after `updates`
    (except `keep`, the file resumed from) to '*.stale' (kept, but no longer seen by
    auto-resume or pruning): a run restarted at an earlier point abandons that timeline."""
    later = [p for e, p in epoch_checkpoints(folder) if e > epoch]
    later += [p for u, p in step_checkpoints(folder) if u > updates]
    later = [p for p in later if keep is None or os.path.abspath(p) != os.path.abspath(keep)]
    for path in later:
        os.replace(path, path + '.stale')
    return later


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint file safely (weights_only) on the CPU, or raise CheckpointError.
    For a sharded checkpoint folder: its non-tensor part, the tensors stay on disk until
    `model_state_dict` (or a training resume) reads them."""
    if os.path.isdir(path):
        from checkpoints import sharded  # it builds on this module
        return sharded.read_meta(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        # timm's train.py stores its argparse.Namespace beside the weights: plain values, allowed
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises several types for torn or foreign files
        if 'Weights only load failed' in str(e):
            raise CheckpointError(f"checkpoint '{path}' holds pickled Python objects, which safe "
                                  f"(weights_only) loading refuses; save its state dicts only") from None
        raise CheckpointError(f"cannot read checkpoint '{path}' (truncated, or not a PyTorch "
                              f"checkpoint): {error_line(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a dict of weights")
    return obj


def newest_readable_checkpoint(folder: str, logger: logging.Logger) -> tuple[str, dict] | None:
    """The newest checkpoint in `folder` that loads; unreadable ones are skipped with a
    warning naming them (and left on disk for the user to inspect)."""
    for path in resume_candidates(folder):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as e:
            logger.warning(f'auto-resume skips {e}')
    return None


def model_state_dict(checkpoint: dict) -> dict:
    """The weights of an official/our checkpoint (`model` entry), of a timm training
    checkpoint (`state_dict`) or of a bare state dict, without DDP's `module.` prefix; the
    full weights of a sharded checkpoint."""
    from checkpoints import sharded  # it builds on this module
    if sharded.SHARDED in checkpoint:
        return sharded.read_full_state(checkpoint[sharded.SHARDED])
    state = checkpoint.get('model', checkpoint.get('state_dict', checkpoint))
    if not isinstance(state, dict):
        raise CheckpointError(f"the checkpoint's 'model' entry is a {type(state).__name__}, not a state dict")
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state.items()}


def _first_names(names: list[str], n: int = 3) -> str:
    more = f' and {len(names) - n} more' if len(names) > n else ''
    return ', '.join(names[:n]) + more


def mismatch_error(source: str, missing: list[str], unexpected: list[str],
                   shapes: list[str]) -> CheckpointError | None:
    """One line naming the first keys a file lacks, has in excess, or has in another shape."""
    problems = []
    if missing:
        problems.append(f'missing {_first_names(missing)}')
    if unexpected:
        problems.append(f'unexpected {_first_names(unexpected)}')
    if shapes:
        problems.append(f'shape mismatch {_first_names(shapes, 2)}')
    if not problems:
        return None
    return CheckpointError(f"'{source}' does not fit this model (another architecture or config?): "
                           + '; '.join(problems))


def check_fits(own: dict[str, tuple], saved: dict[str, tuple], source: str) -> None:
    """Raise one line naming the first differing keys when the tensor names and shapes
    `saved` (name -> shape) are not the model's `own`; derived buffers may differ."""
    derived = lambda k: k.endswith(DERIVED_SUFFIXES)  # noqa: E731
    missing = [k for k in own if k not in saved and not derived(k)]
    unexpected = [k for k in saved if k not in own and not derived(k)]
    shapes = [f'{k} {saved[k]} vs model {own[k]}' for k in own
              if k in saved and not derived(k) and saved[k] is not None and saved[k] != own[k]]
    error = mismatch_error(source, missing, unexpected, shapes)
    if error:
        raise error


def shapes_of(state: dict) -> dict[str, tuple | None]:
    return {k: tuple(v.shape) if hasattr(v, 'shape') else None for k, v in state.items()}


def load_model_weights(model: torch.nn.Module, state: dict, source: str) -> None:
    """Strict load that reports a mismatch as one line naming the first differing keys."""
    check_fits(shapes_of(model.state_dict()), shapes_of(state), source)
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
        state['cuda'] = torch.cuda.get_rng_state()  # this rank's device
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state['python'])
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])

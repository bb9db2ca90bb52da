"""The checkpoints of a run's output folder: their names, the `latest` marker, the
candidates auto-resume tries, pruning, setting aside an abandoned timeline, and the
temporaries a killed write leaves behind.

Epoch checkpoints are `ckpt_epoch_<epoch>`, mid-epoch ones `ckpt_step_<updates done>`,
the best one `best`; files end in `.pth`, the folders of sharded (fsdp) runs in `.dcp`.
Every name is published by a rename, so a checkpoint is whole or absent.
"""
from __future__ import annotations

import os
import re
import shutil

from utils import TMP_MARK, OutputError, atomic_write, atomic_write_text, error_line, fsync_dir

EPOCH_FILE = re.compile(r'^ckpt_epoch_(\d+)\.(?:pth|dcp)$')
STEP_FILE = re.compile(r'^ckpt_step_(\d+)\.(?:pth|dcp)$')  # mid-epoch, numbered by optimizer updates done
BEST_FILE = 'best.pth'
BEST_FOLDER = 'best.dcp'
LATEST_FILE = 'latest'  # names the newest checkpoint; rewritten only after it is in place
SET_ASIDE = TMP_MARK + 'old'  # a folder being replaced, for an instant


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

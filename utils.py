"""Small pieces every part of the project shares: the user-error types and exit codes,
seeding, device synchronization and peak memory, and atomic file writes.

main.py imports this module to report a flag mistake before torch loads, so torch is
imported inside the functions that need it.
"""
from __future__ import annotations

import os
import random
import resource
import sys
from collections.abc import Callable
from typing import IO, Any

# --- user errors and exit codes ----------------------------------------------------------


class ConfigError(ValueError):
    """A mistake in the user's config or flags, reported as one line."""


class DataError(ValueError):
    """A problem with the user's data, reported as one line naming the file."""

    def __init__(self, message: str):
        # A DataLoader re-raises a worker's exception as this type with the worker's whole
        # traceback as its message; keep only the original line.
        if message.startswith('Caught DataError'):
            message = message.rstrip().splitlines()[-1].split('DataError: ', 1)[-1]
        super().__init__(message)


class CheckpointError(ValueError):
    """A checkpoint the user named (or the run found) cannot be used; one line."""


class OutputError(ValueError):
    """A file of the run (checkpoint, config, metrics) cannot be written; one line."""


class ToolError(ValueError):
    """A user mistake a tool found (a file, flag or device), reported as one line."""


class DivergedError(RuntimeError):
    """Training stopped after too many consecutive non-finite updates (exit code 3)."""


# Every mistake of the user's: one `error:` line and EXIT_USER_ERROR, never a traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, OutputError, ToolError)

EXIT_USER_ERROR = 2       # a mistake in flags, config, data, checkpoint or output folder
EXIT_DIVERGED = 3         # too many consecutive non-finite updates; a checkpoint was written
EXIT_PREEMPTED = 75       # stopped by a signal after writing a checkpoint: requeue to resume (EX_TEMPFAIL)


def error_line(e: BaseException) -> str:
    """The first line of an exception, for a one-line message."""
    text = getattr(e, 'strerror', None) or str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def report_error(message: str) -> None:
    """Write `error[ (rank r)]: message` in one write: under torchrun several ranks share the
    terminal, and print's separate write of the newline let two ranks' lines run together."""
    where = f" (rank {os.environ.get('RANK', 0)})" if int(os.environ.get('WORLD_SIZE', 1)) > 1 else ''
    sys.stderr.write(f'error{where}: {message}\n')
    sys.stderr.flush()


# --- seeding, device ------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def synchronize(device: Any) -> None:
    """Wait for queued device work, so a timer measures it (a no-op on the CPU)."""
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def reset_peak_memory(device: Any) -> None:
    """Start a new CUDA peak (the next `peak_memory_mb`); the CPU's resident peak cannot reset."""
    import torch
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: Any) -> float:
    """Peak device memory allocated (CUDA, since the last `reset_peak_memory`) or peak
    resident memory of the process (CPU)."""
    import torch
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == 'darwin' else rss / 2 ** 10


# --- atomic file writes ---------------------------------------------------------------------

TMP_MARK = '.tmp-'  # temporary files are '<final name>.tmp-<pid>'


def fsync_dir(folder: str) -> None:
    """Make a rename in `folder` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """`write(file)` into a temporary file in the same folder, fsync, rename over `path`:
    a crash or a full disk leaves the previous file intact, never a torn one, and no
    temporary file behind (torch.save reports a full disk as RuntimeError)."""
    tmp = f'{path}{TMP_MARK}{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise OutputError(f"cannot write '{path}': {error_line(e)}; the previous file is untouched") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_folder_atomically(target: str, fill: Callable[[str], Any]) -> Any:
    """`fill(folder)` writes into a temporary sibling of `target` (unique across the nodes
    sharing a disk), renamed to `target` when complete: a crash never leaves a half-written
    folder. Returns what `fill` returned, or None when `target` appeared meanwhile (another
    process renamed its complete copy into place first; this one's is discarded)."""
    import shutil
    import socket
    target = os.path.abspath(target)  # also drops a trailing '/', which would put tmp inside it
    tmp = f'{target}{TMP_MARK}{socket.gethostname()}-{os.getpid()}'
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed process that had our pid
    try:
        os.makedirs(tmp)
        result = fill(tmp)
        os.rename(tmp, target)
    except OSError:
        if os.path.exists(target):
            return None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a partial tree otherwise
    return result


def atomic_save(obj: Any, path: str) -> None:
    """torch.save `obj` to `path` atomically."""
    import torch
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))

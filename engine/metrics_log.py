"""What a run records besides its text log: `metrics.jsonl` (one JSON object per epoch,
or per evaluation) and TensorBoard events. Only rank 0 writes; other ranks get a no-op."""
from __future__ import annotations

import json
import os
from typing import Any

from utils import OutputError, atomic_write_text

METRICS_FILE = 'metrics.jsonl'


def _read_lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f if line.strip()]


class MetricsLog:
    """Appends metric lines (flushed and fsynced: a crash loses at most the line being
    written) and mirrors scalars to TensorBoard when `tensorboard` is on."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool = True):
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import; rank 0 only
            self.writer = SummaryWriter(log_dir=output_dir)

    def drop_epochs_from(self, epoch: int) -> int:
        """On resume: remove lines of epochs >= `epoch` (they are about to be run again), so
        the file holds each epoch once. Rewritten atomically. Returns lines removed."""
        if not self.enabled:
            return 0
        lines = _read_lines(self.path)
        epochs = [_epoch_of(line) for line in lines]
        keep = [line for line, e in zip(lines, epochs) if e is None or e < epoch]
        if len(keep) == len(lines):
            return 0
        atomic_write_text(''.join(keep), self.path)
        return len(lines) - len(keep)

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, 'a') as f:
                f.write(json.dumps(record) + '\n')
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OutputError(f"cannot append to '{self.path}': {e.strerror or e}") from None

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _epoch_of(line: str) -> int | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:  # a line torn by a crash: dropped on the next resume
        return 10 ** 9
    epoch = record.get('epoch') if record.get('mode', 'train') == 'train' else None
    return epoch if isinstance(epoch, int) else None

"""What the models know about their weights: which buffers they derive themselves, and
whether a state dict fits a model, reported as one line.

Derived buffers (the relative position index, the shift mask, Swin V2's coordinate table)
are computed from the window size and resolution; files may carry them (official ones do),
for this or another window, or not at all (timm's), and a model always keeps its own. Their
names are those the model classes declare in `derived_buffers`.
"""
from __future__ import annotations

import torch

from utils import CheckpointError

from . import swin_transformer as v1
from . import swin_transformer_v2 as v2

DERIVED_BUFFERS = frozenset(v1.WindowAttentionBase.derived_buffers + v2.WindowAttention.derived_buffers
                            + v1.SwinTransformerBlock.derived_buffers)


def is_derived(key: str) -> bool:
    """Whether the state_dict key names a derived buffer (of any module)."""
    return key.rsplit('.', 1)[-1] in DERIVED_BUFFERS


def shapes_of(state: dict) -> dict[str, tuple | None]:
    """name -> shape of every tensor in `state` (None for an entry that is not one)."""
    return {k: tuple(v.shape) if hasattr(v, 'shape') else None for k, v in state.items()}


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


def check_fits(own_shapes: dict[str, tuple], saved_shapes: dict[str, tuple | None], source: str) -> None:
    """Raise one line naming the first differing keys when the tensor names and shapes
    `saved_shapes` (name -> shape) are not the model's `own_shapes`; derived buffers may differ."""
    missing = [k for k in own_shapes if k not in saved_shapes and not is_derived(k)]
    unexpected = [k for k in saved_shapes if k not in own_shapes and not is_derived(k)]
    shapes = [f'{k} {saved_shapes[k]} vs model {own_shapes[k]}' for k in own_shapes
              if k in saved_shapes and not is_derived(k) and saved_shapes[k] is not None
              and saved_shapes[k] != own_shapes[k]]
    error = mismatch_error(source, missing, unexpected, shapes)
    if error:
        raise error


def load_model_weights(model: torch.nn.Module, state: dict, source: str) -> None:
    """Strict load that reports a mismatch as one line naming the first differing keys."""
    check_fits(shapes_of(model.state_dict()), shapes_of(state), source)
    model.load_state_dict(state, strict=True)

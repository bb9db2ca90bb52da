"""Start a model from another model's weights (`--pretrained`): official Swin files, bare
state dicts, this project's checkpoints and timm-format files, fitted to the model's window
size, image size and class count.

Every adaptation is logged (position tables resized, Swin V2 coordinate tables rebuilt for
another window, head mapped or re-initialized); any other difference is an error naming the
keys and shapes, so nothing is dropped silently.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from utils import CheckpointError

from .simmim_weights import from_simmim, geometric_resize_bias_table, is_simmim_layout
from .weights import is_derived, mismatch_error

HEAD_KEYS = ('head.weight', 'head.bias')
_TIMM_DOWNSAMPLE = re.compile(r'^layers\.(\d+)\.downsample\.')


@dataclass
class LoadReport:
    """What `fit_weights` did, for the log and for tests."""
    source_format: str                              # 'official', 'timm' or 'simmim'
    loaded: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)     # 'key: old shape -> new shape'
    head: str = 'kept'  # 'kept', 'mapped', 'reinitialized', 'initialized' (the model's own), 'dropped', 'none'
    rebuilt: list[str] = field(default_factory=list)     # Swin V2 windows whose coordinate tables were rebuilt
    dropped: list[str] = field(default_factory=list)     # SimMIM's decoder and mask token

    def lines(self) -> list[str]:
        parts = sorted({'.'.join(k.split('.')[:2]) if k.startswith('layers.') else k.split('.')[0]
                        for k in self.loaded})
        out = [f'pretrained: {len(self.loaded)} tensors loaded from {self.source_format}-format weights '
               f'({", ".join(parts)}); classifier {self.head}']
        if self.dropped:
            unused = ', '.join(sorted(self.dropped))
            out.append(f'pretrained: SimMIM pre-training weights not used by the classifier: {unused}')
        return out + [f'pretrained: resized {r}' for r in self.resized] + [f'pretrained: {r}' for r in self.rebuilt]


def is_timm_layout(state: dict) -> bool:
    """timm names the classifier `head.fc` and puts each downsampling at the start of the
    next stage (`layers.1.downsample` first); the official model ends stages 0..n-2 with it."""
    if any(k.startswith('head.fc.') for k in state):
        return True
    stages = {int(m.group(1)) for k in state if (m := _TIMM_DOWNSAMPLE.match(k))}
    return bool(stages) and 0 not in stages


def from_timm(state: dict) -> dict:
    """timm's Swin V1 and V2 keys -> the official ones (the tensors are the same)."""
    out = {}
    for key, value in state.items():
        match = _TIMM_DOWNSAMPLE.match(key)
        if match:
            key = f'layers.{int(match.group(1)) - 1}.downsample.' + key[match.end():]
        elif key.startswith('head.fc.'):
            key = 'head.' + key[len('head.fc.'):]
        out[key] = value
    return out


def resize_bias_table(table: torch.Tensor, side: int) -> torch.Tensor:
    """A ((2w-1)^2, heads) relative position bias table resampled to (side^2, heads) by
    bicubic interpolation over its square grid of offsets (the official fine-tuning rule)."""
    old = math.isqrt(table.shape[0])
    grid = table.float().t().reshape(1, -1, old, old)
    grid = F.interpolate(grid, size=(side, side), mode='bicubic', align_corners=False)
    return grid.reshape(-1, side * side).t().contiguous().to(table.dtype)


def resize_position_embedding(pos: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An absolute position embedding (1, H*W, C) on a square grid resampled to `size`."""
    old = math.isqrt(pos.shape[1])
    grid = pos.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=size, mode='bicubic', align_corners=False)
    return grid.flatten(2).transpose(1, 2).contiguous().to(pos.dtype)


def read_class_map(path: str, num_classes: int, source_classes: int) -> torch.Tensor:
    """The row of the file's classifier for each of the model's classes: one integer per
    line (the official map22kto1k.txt format)."""
    try:
        with open(path) as f:
            rows = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise CheckpointError(f"MODEL.PRETRAINED_CLASS_MAP '{path}' cannot be read ({e.strerror}); "
                              f"give the path of the class index file, or '' to re-initialize the head") from None
    try:
        index = [int(r) for r in rows]
    except ValueError:
        raise CheckpointError(f"MODEL.PRETRAINED_CLASS_MAP '{path}' must hold one integer per line") from None
    if len(index) != num_classes:
        raise CheckpointError(f"MODEL.PRETRAINED_CLASS_MAP '{path}' lists {len(index)} classes but the "
                              f"model has {num_classes}")
    bad = [i for i in index if not 0 <= i < source_classes]
    if bad:
        raise CheckpointError(f"MODEL.PRETRAINED_CLASS_MAP '{path}' holds index {bad[0]}, outside the "
                              f"{source_classes} classes of the pretrained head")
    return torch.tensor(index, dtype=torch.long)


def _file_window(state: dict, prefix: str) -> int | None:
    """The window a Swin V2 attention of the file was made for, from the derived buffers it
    carries (official files do; timm's do not)."""
    coords = state.get(prefix + 'relative_coords_table')
    if coords is not None and coords.ndim == 4:
        return (coords.shape[1] + 1) // 2
    index = state.get(prefix + 'relative_position_index')
    if index is not None and index.ndim == 2 and math.isqrt(index.shape[0]) ** 2 == index.shape[0]:
        return math.isqrt(index.shape[0])
    return None


def rebuilt_coordinate_tables(model: torch.nn.Module, state: dict) -> list[str]:
    """Swin V2 at another window than the file's: nothing to resize, since the bias MLP takes
    offsets of any window; the model rebuilds its coordinate and index tables. One line saying
    so, with the pretrained window sizes the offsets are scaled by (0 = by the new window)."""
    changes: dict[tuple[int, int], list[int]] = {}
    for name, buf in model.named_buffers():
        if not name.endswith('relative_coords_table') or buf.ndim != 4:
            continue
        old, new = _file_window(state, name[:-len('relative_coords_table')]), (buf.shape[1] + 1) // 2
        if old is not None and old != new:
            stage = int(name.split('.')[1]) if name.startswith('layers.') else -1
            stages = changes.setdefault((old, new), [])
            if stage not in stages:
                stages.append(stage)
    if not changes:
        return []
    parts = [f'{old} -> {new}' + (f' (stage{"s" if len(st) > 1 else ""} {", ".join(map(str, st))})'
                                  if len(changes) > 1 else '') for (old, new), st in changes.items()]
    sizes = getattr(model, 'pretrained_window_sizes', None)
    line = (f'window {", ".join(parts)}: coordinate tables rebuilt, bias MLP carried over '
            f'(pretrained window sizes {sizes})')
    if sizes is not None and not any(sizes):
        line += ('; MODEL.SWINV2.PRETRAINED_WINDOW_SIZES is 0, so the MLP sees offsets scaled by the new '
                 'window rather than the one it was trained at: set it to the file\'s window per stage')
    return [line]


def _patch_grid(model: torch.nn.Module) -> tuple[int, int] | None:
    grid = getattr(model, 'patches_resolution', None)
    return tuple(grid) if grid is not None else None


class _Fitter:
    """Fits a state dict to a model's own, collecting what changed and what cannot be fitted."""

    def __init__(self, model: torch.nn.Module, report: LoadReport):
        self.model = model
        self.own = model.state_dict()
        self.report = report
        self.problems: list[str] = []

    def fit(self, key: str, value: torch.Tensor) -> torch.Tensor | None:
        want = self.own[key]
        if value.shape == want.shape:
            return value
        if key.endswith('relative_position_bias_table') and value.shape[1] == want.shape[1] \
                and math.isqrt(value.shape[0]) ** 2 == value.shape[0]:
            side = math.isqrt(want.shape[0])
            old = math.isqrt(value.shape[0])
            simmim = self.report.source_format == 'simmim'  # the official SimMIM fine-tuning's rule
            self.report.resized.append(f'{key}: {old}x{old} -> {side}x{side} offsets (window {(old + 1) // 2} -> '
                                       f'{(side + 1) // 2}), {"geometric" if simmim else "bicubic"}')
            return geometric_resize_bias_table(value, side) if simmim else resize_bias_table(value, side)
        if key == 'absolute_pos_embed' and value.ndim == 3 and value.shape[2] == want.shape[2] \
                and math.isqrt(value.shape[1]) ** 2 == value.shape[1]:
            grid = _patch_grid(self.model)
            old = math.isqrt(value.shape[1])
            self.report.resized.append(f'{key}: {old}x{old} -> {grid[0]}x{grid[1]} patches, bicubic')
            return resize_position_embedding(value, grid)
        self.problems.append(f'{key} {tuple(value.shape)} vs model {tuple(want.shape)}')
        return None


def _fit_head(model: torch.nn.Module, state: dict, out: dict, class_map: str, allow_reinit: bool,
              logger: logging.Logger, report: LoadReport) -> None:
    """Keep the file's classifier, map its rows, or start it anew (zeros, as the official
    fine-tuning does), depending on the class counts and MODEL.PRETRAINED_CLASS_MAP."""
    own = model.state_dict()
    has_head = all(k in own for k in HEAD_KEYS)
    file_head = [k for k in HEAD_KEYS if k in state]
    if not has_head:
        if file_head:
            report.head = 'dropped'
            logger.info(f'the file\'s classifier ({tuple(state["head.weight"].shape)}) is not used: '
                        f'the model has no head (num_classes 0)')
        else:
            report.head = 'none'
        return
    want_w = own['head.weight']
    num_classes = want_w.shape[0]
    if len(file_head) == 1:
        raise CheckpointError(f'the pretrained file has {file_head[0]} but not '
                              f'{({*HEAD_KEYS} - {file_head[0]}).pop()}: an incomplete classifier')
    if not file_head:
        if class_map:
            raise CheckpointError('MODEL.PRETRAINED_CLASS_MAP is set but the pretrained file has no '
                                  'classifier to select classes from; set it to \'\'')
        if report.source_format == 'simmim':  # the official SimMIM fine-tuning keeps the new head's init
            out['head.weight'], out['head.bias'] = own['head.weight'], own['head.bias']
            report.head = 'initialized'
            logger.info('classifier: the model\'s own initialization (a SimMIM encoder has no classifier)')
            return
        file_rows = None
    else:
        w, b = state['head.weight'], state['head.bias']
        if w.ndim != 2 or w.shape[1] != want_w.shape[1] or b.shape != (w.shape[0],):
            raise CheckpointError(f'the pretrained head {tuple(w.shape)} does not fit the model\'s '
                                  f'{tuple(want_w.shape)} (other feature width: another architecture?)')
        file_rows = w.shape[0]
    if file_rows == num_classes:
        out['head.weight'], out['head.bias'] = state['head.weight'], state['head.bias']
        report.head = 'kept'
        if class_map:
            logger.info(f'MODEL.PRETRAINED_CLASS_MAP is not used: the file\'s head already has {num_classes} classes')
        return
    if file_rows is not None and class_map:
        index = read_class_map(class_map, num_classes, file_rows)
        out['head.weight'] = state['head.weight'][index].clone()
        out['head.bias'] = state['head.bias'][index].clone()
        report.head = 'mapped'
        logger.info(f'classifier: {num_classes} of the file\'s {file_rows} classes selected by {class_map}')
        return
    found = f'{file_rows} classes' if file_rows is not None else 'no classifier'
    if not allow_reinit:
        raise CheckpointError(f'the pretrained file has {found} and the model {num_classes}: evaluating would '
                              f'score an untrained head; set MODEL.PRETRAINED_CLASS_MAP to select its classes')
    out['head.weight'] = torch.zeros_like(want_w)
    out['head.bias'] = torch.zeros_like(own['head.bias'])
    report.head = 'reinitialized'
    hint = (' (to keep the classifier of a 22k checkpoint on 1k classes, set MODEL.PRETRAINED_CLASS_MAP to '
            'the official map22kto1k.txt)' if file_rows and file_rows > num_classes else '')
    logger.info(f'classifier re-initialized (zeros, as the official fine-tuning): the file has {found}, '
                f'the model {num_classes}{hint}')


def fit_weights(model: torch.nn.Module, state: dict, path: str, logger: logging.Logger, class_map: str = '',
                allow_head_reinit: bool = True) -> LoadReport:
    """Load `state` (weights read from `path`) into `model`, adapting what a fine-tuning needs
    adapted (checkpoints.reading.load_pretrained reads the file). `allow_head_reinit` False
    (evaluation) makes a class-count mismatch without a class map an error rather than a head
    of zeros."""
    non_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(f"'{path}' is not a state dict of tensors (entry {non_tensors[0]})")
    report = LoadReport('simmim' if is_simmim_layout(state) else 'timm' if is_timm_layout(state) else 'official')
    if report.source_format == 'simmim':
        state, report.dropped = from_simmim(state)
    elif report.source_format == 'timm':
        state = from_timm(state)
    report.rebuilt = rebuilt_coordinate_tables(model, state)
    state = {k: v for k, v in state.items() if not is_derived(k)}

    fitter = _Fitter(model, report)
    out: dict[str, torch.Tensor] = {}
    own_keys = [k for k in fitter.own if not is_derived(k)]
    missing = [k for k in own_keys if k not in state and k not in HEAD_KEYS]
    unexpected = [k for k in state if k not in fitter.own and k not in HEAD_KEYS]
    for key in own_keys:
        if key in state and key not in HEAD_KEYS:
            value = fitter.fit(key, state[key])
            if value is not None:
                out[key] = value
    error = mismatch_error(path, missing, unexpected, fitter.problems)
    if error:
        raise error
    _fit_head(model, state, out, class_map, allow_head_reinit, logger, report)
    model.load_state_dict(out, strict=True)  # the model keeps its own derived buffers
    report.loaded = sorted(out)
    for line in report.lines():
        logger.info(line)
    return report

"""Top-5 classes of image files by a checkpoint's model:

    python tools/predict.py --checkpoint output/swin_micro_digits/default/best.pth a.jpg b.jpg

Images go through exactly the validation pipeline of training (the same decoder, resize
and crop, and the same normalization on the device), in fp32, so the probabilities are
those validation scored. Class names come from `--classes` (one per line, line i = class
i), else from the class folders of DATA.DATA_PATH/train in the model's config (numbered as
training numbered them), else `class <i>`. A user mistake ends with one `error:` line and
exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

# checkpoint_model (next to this file) also puts the repo root on sys.path for `data`
from checkpoint_model import load_model, tool_parser
from yacs.config import CfgNode

from data.decode import DecodeError
from data.device_prep import DevicePreprocessor
from data.sources import class_folders
from data.transforms import build_transform
from models import logits_of
from utils import USER_ERRORS, ToolError

BATCH = 32  # images per forward pass, so a long list of files needs no more memory
TOP = 5


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = tool_parser('Print the top-5 classes of images by a checkpoint.')
    parser.add_argument('--classes', metavar='TXT', help='class names, one per line (line i = class i)')
    parser.add_argument('--device', choices=('cpu', 'cuda'), help='default: cuda when available, else cpu')
    parser.add_argument('images', nargs='+', metavar='IMAGE')
    return parser.parse_args(argv)


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise ToolError('--device cuda: no CUDA device is available here; use --device cpu')
    return torch.device(name)


def _read_names(path: str, num_classes: int) -> list[str]:
    try:
        with open(path, encoding='utf-8') as f:
            names = [line.strip() for line in f.read().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise ToolError(f"cannot read --classes file '{path}': {getattr(e, 'strerror', None) or e}") from None
    while names and not names[-1]:  # a trailing blank line names no class
        names.pop()
    if len(names) != num_classes:
        raise ToolError(f"--classes file '{path}' names {len(names)} classes but the model has "
                        f"{num_classes}; give one name per line, line i for class i")
    return names


def class_names(config: CfgNode, classes_file: str | None) -> list[str]:
    """Names of the model's classes, by index: the file, the training folders, or numbers."""
    num_classes = config.MODEL.NUM_CLASSES
    if classes_file:
        return _read_names(classes_file, num_classes)
    data = config.DATA
    train = os.path.join(data.DATA_PATH, 'train')
    # an image-folder run (data/build.py's build_source): its labels are the sorted folder names
    if data.DATA_PATH and data.DATASET.lower() == 'imagenet' and not data.ZIP_MODE and os.path.isdir(train):
        names = class_folders(train)
        if len(names) == num_classes:
            return names
        print(f"note: '{train}' has {len(names)} class folders but the model has {num_classes} "
              f"classes; showing class numbers", file=sys.stderr)
    return [f'class {i}' for i in range(num_classes)]


def _load_image(path: str, transform) -> torch.Tensor:
    try:
        with open(path, 'rb') as f:
            return transform(f.read())
    except OSError as e:
        raise ToolError(f"cannot read image '{path}': {e.strerror or e}") from None
    except DecodeError as e:
        raise ToolError(f"cannot read image '{path}': {e}") from None


@torch.no_grad()
def top_classes(model: torch.nn.Module, images: torch.Tensor,
                prep: DevicePreprocessor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, class indices) of the top classes of uint8 images (B, 3, S, S)."""
    normalized, _ = prep(images, torch.zeros(len(images), dtype=torch.long))
    probs = logits_of(model(normalized)).float().softmax(dim=1)
    return probs.topk(min(TOP, probs.shape[1]), dim=1)


def _print_result(path: str, probs: torch.Tensor, indices: torch.Tensor, names: list[str]) -> None:
    print(path)
    top = [names[i] for i in indices.tolist()]
    width = max(len(name) for name in top)
    for rank, (name, p) in enumerate(zip(top, probs.tolist()), 1):
        print(f'{rank}. {name:<{width}}  {100 * p:6.2f}%')


def run(args: argparse.Namespace) -> None:
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:  # before the model is built: the common mistake fails fast
        more = f' (nor do {len(missing) - 1} more)' if len(missing) > 1 else ''
        raise ToolError(f"image '{missing[0]}' does not exist{more}")
    device = pick_device(args.device)
    config, model = load_model(args.checkpoint, args.cfg, args.ema, device)
    if config.MODEL.NUM_CLASSES == 0:
        raise ToolError(f"the model of '{args.checkpoint}' has no classifier (MODEL.NUM_CLASSES 0)")
    names = class_names(config, args.classes)
    transform = build_transform(False, config)
    prep = DevicePreprocessor(config, device, is_train=False)
    for start in range(0, len(args.images), BATCH):
        paths = args.images[start:start + BATCH]
        probs, indices = top_classes(model, torch.stack([_load_image(p, transform) for p in paths]), prep)
        for path, p, i in zip(paths, probs.cpu(), indices.cpu()):
            _print_result(path, p, i, names)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, or 2 after one `error:` line for a user mistake."""
    try:
        run(_parse_args(argv))
    except USER_ERRORS as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""One official-format file from a sharded checkpoint folder (TRAIN.PARALLEL fsdp), for
evaluation and release:

    python tools/consolidate_checkpoint.py --checkpoint output/swin_large/default/best.dcp --output swin_large.pth

The shards are read by this one process (no launcher, no GPU) into full tensors, loaded
strictly into the model the checkpoint's config describes (so a file that does not fit
its model is refused here, not at release), and written atomically as
`{'model', 'config', 'epoch', 'max_accuracy'}`: what the official code, `--pretrained`,
`--eval --resume` and tools/predict.py read. The optimizer state is left out; to continue
training, resume from the folder itself (with any number of processes, fsdp or ddp).
"""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from checkpoints.reading import read_checkpoint  # noqa: E402
from tools.checkpoint_model import load_model, tool_parser  # noqa: E402
from utils import USER_ERRORS, ToolError, atomic_save  # noqa: E402


def consolidate(path: str, output: str, cfg: str | None = None) -> dict:
    """Write `output` from the sharded checkpoint `path`; returns what was written."""
    if os.path.isfile(path):
        raise ToolError(f"'{path}' is not a sharded checkpoint folder (a .pth file already is one file)")
    meta = read_checkpoint(path)
    config, model = load_model(path, cfg, ema=False, device=torch.device('cpu'))
    state = {'model': model.state_dict(), 'config': config.dump(), 'epoch': meta.get('epoch'),
             'max_accuracy': meta.get('max_accuracy')}
    atomic_save(state, output)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser(__doc__.splitlines()[0])
    parser.add_argument('--output', required=True, metavar='FILE', help='the .pth file to write')
    try:
        args = parser.parse_args(argv)
        if args.ema:
            raise ToolError('sharded checkpoints hold no EMA weights (TRAIN.EMA is not used with fsdp); '
                            'leave out --ema')
        state = consolidate(args.checkpoint, args.output, args.cfg)
    except USER_ERRORS as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    n = sum(t.numel() for t in state['model'].values())
    print(f"wrote {args.output}: {len(state['model'])} tensors, {n / 1e6:.2f}M values, epoch {state['epoch']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())

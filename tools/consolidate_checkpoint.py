"""One official-format file from a sharded checkpoint folder (TRAIN.PARALLEL fsdp), or from
the official Swin-MoE per-rank files, for evaluation and release:

    python tools/consolidate_checkpoint.py --checkpoint output/swin_large/default/best.dcp --output swin_large.pth
    python tools/consolidate_checkpoint.py --checkpoint swin_moe_small_32expert.pth --output moe_32.pth

Swin-MoE: the official training writes PREFIX.rank0, .rank1, ... (each rank's experts) and,
for its final checkpoint, PREFIX.master (the rest); given PREFIX, the experts are
concatenated in rank order into `{'model'}`, which runs here read as they read their own
checkpoints (MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS x processes must equal the experts it holds;
with experts shared by n processes, NUM_LOCAL_EXPERTS -n, it holds one slice per rank and
runs on the same number of processes).

The shards are read by this one process (no launcher, no GPU) into full tensors, loaded
strictly into the model the checkpoint's config describes (so a file that does not fit
its model is refused here, not at release), and written atomically as
`{'model', 'config', 'epoch', 'max_accuracy'}`: what the official code, `--pretrained`,
`--eval --resume` and tools/predict.py read. The optimizer state is left out; to continue
training, resume from the folder itself (with any number of processes, fsdp or ddp).
"""
from __future__ import annotations

import glob
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from checkpoints.reading import model_state_dict, read_checkpoint  # noqa: E402
from tools.checkpoint_model import load_model, tool_parser  # noqa: E402
from utils import USER_ERRORS, CheckpointError, ToolError, atomic_save  # noqa: E402

EXPERT_KEY = '._moe_layer.experts.'  # official (Tutel) names of expert weights


def merge_rank_files(prefix: str) -> dict:
    """One state dict from the official Swin-MoE per-rank files: PREFIX.rank0, .rank1, ...
    (each rank's experts; training files also hold the rest) and PREFIX.master (the rest,
    beside the final experts-only files). Experts are concatenated in rank order."""
    ranks = []
    while os.path.isfile(f'{prefix}.rank{len(ranks)}'):
        ranks.append(model_state_dict(read_checkpoint(f'{prefix}.rank{len(ranks)}')))
    if not ranks:
        raise CheckpointError(f"neither '{prefix}' nor its per-rank files ('{prefix}.rank0', ...) exist")
    strays = [p for p in glob.glob(glob.escape(prefix) + '.rank*') if p[len(prefix) + 5:] not in
              {str(r) for r in range(len(ranks))}]
    if strays:
        raise CheckpointError(f"'{strays[0]}' does not follow '{prefix}.rank0' .. '.rank{len(ranks) - 1}' in order")
    master = f'{prefix}.master'
    merged = dict(model_state_dict(read_checkpoint(master))) if os.path.isfile(master) else {}
    for key, value in ranks[0].items():
        uneven = [r for r, state in enumerate(ranks) if key not in state]
        if uneven:
            raise CheckpointError(f"'{prefix}.rank{uneven[0]}' has no '{key}', which rank 0's file has")
        merged[key] = torch.cat([state[key] for state in ranks]) if EXPERT_KEY in key else merged.get(key, value)
    return merged


def consolidate_experts(prefix: str, output: str) -> dict:
    """Write `output` from the official Swin-MoE per-rank files of `prefix`."""
    state = {'model': merge_rank_files(prefix)}
    atomic_save(state, output)
    return dict(state, epoch=None)


def consolidate(path: str, output: str, cfg: str | None = None) -> dict:
    """Write `output` from the sharded checkpoint `path`; returns what was written."""
    if not os.path.exists(path) and os.path.isfile(f'{path}.rank0'):
        return consolidate_experts(path, output)
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

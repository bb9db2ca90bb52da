"""Command-line entry: flags -> validated config -> process group -> train, --eval or
--throughput. Runs as `python main.py ...` (one process) or under `torchrun`.

Flags and config are checked before torch is imported, so a mistake is reported at once.
Every user mistake ends with one `error:` line and exit code 2.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence

from config import get_config
from utils import ConfigError


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a mistake as one ConfigError line instead of usage + exit."""

    def error(self, message: str):
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The official Swin command line (flags not given leave the YAML untouched)."""
    p = OneLineArgumentParser('Swin Transformer training and evaluation')
    p.add_argument('--cfg', type=str, required=True, metavar='FILE', help='path to the config YAML')
    p.add_argument('--opts', nargs='+', default=None, metavar='KEY VALUE',
                   help='override config keys: --opts TRAIN.EPOCHS 100 DATA.IMG_SIZE 256')
    p.add_argument('--batch-size', type=int, help='batch size per process')
    p.add_argument('--data-path', type=str, help='path to the dataset')
    p.add_argument('--zip', action='store_true', help='read the dataset from zip files')
    p.add_argument('--cache-mode', type=str, choices=['no', 'full', 'part'],
                   help='no: no cache; full: cache all data; part: cache this rank\'s shard only')
    p.add_argument('--pretrained', help='pretrained weights to start from')
    p.add_argument('--resume', help='checkpoint to resume from')
    p.add_argument('--accumulation-steps', type=int, help='gradient accumulation steps')
    p.add_argument('--use-checkpoint', action='store_true', help='activation checkpointing to save memory')
    p.add_argument('--compile', action='store_true', help='torch.compile the model (sets TRAIN.COMPILE True)')
    p.add_argument('--disable_amp', '--disable-amp', action='store_true', help='train and evaluate in fp32')
    p.add_argument('--enable-amp', action='store_true',
                   help='the official SimMIM scripts\' flag (sets ENABLE_AMP); AMP_ENABLE already decides here')
    p.add_argument('--simmim-pretrain', action='store_true',
                   help='SimMIM masked-image pre-training of the Swin the config names (MODEL.SIMMIM.PRETRAIN True)')
    p.add_argument('--amp-opt-level', type=str, choices=['O0', 'O1', 'O2'],
                   help='deprecated apex flag; O0 disables AMP, the others change nothing')
    p.add_argument('--output', type=str, metavar='PATH', help='output root (default: output)')
    p.add_argument('--tag', help='experiment tag, the last folder of the output path')
    p.add_argument('--eval', action='store_true', help='evaluate only')
    p.add_argument('--throughput', action='store_true', help='measure inference throughput only')
    p.add_argument('--fused_window_process', action='store_true',
                   help='accepted for compatibility; window attention is always fused here')
    p.add_argument('--fused_layernorm', action='store_true',
                   help='accepted for compatibility; LayerNorm is always torch\'s fused kernel')
    p.add_argument('--optim', type=str, help='optimizer name, overrides TRAIN.OPTIMIZER.NAME')
    # Launchers pass these; rank and world size come from the environment instead.
    p.add_argument('--local_rank', '--local-rank', type=int, default=None, help=argparse.SUPPRESS)
    return p


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_option(argv: Sequence[str] | None = None):
    """Parse flags and build the frozen config. Raises ConfigError on any user mistake."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0]
        if _is_number(flag):  # argparse reads '-1e-3' as a flag, not as a negative number
            raise ConfigError(f"argument '{flag}' was read as a flag; write the negative number "
                              f"without an exponent (for example -0.001)")
        known = [s for a in parser._actions for s in a.option_strings if s.startswith('--')]
        close = difflib.get_close_matches(flag.split('=')[0], known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else '; see --help'
        raise ConfigError(f"unknown argument '{flag}'{hint}")
    config = get_config(args)
    if config.EVAL_MODE and not (config.MODEL.RESUME or config.MODEL.PRETRAINED):
        raise ConfigError('--eval needs weights to evaluate: add --resume CHECKPOINT or --pretrained FILE')
    return args, config


def main(argv: Sequence[str] | None = None) -> int:
    try:
        _, config = parse_option(argv)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2

    # heavy imports (torch, timm) only once the command line is known to be valid
    from engine import runner
    return runner.run(config)


if __name__ == '__main__':
    sys.exit(main())

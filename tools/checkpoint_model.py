"""The model of a checkpoint file, rebuilt for inference; shared by tools/predict.py and
tools/export_onnx.py so both read checkpoints the same way.

Our checkpoints carry their config (a YAML string) beside the weights; official ones hold
only `model`, so `--cfg` names their YAML file (and, when given, wins over the embedded
config). `--ema` takes the EMA weights (`model_ema`) that training saves with TRAIN.EMA.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn
from yacs.config import CfgNode

# Run as a script from any directory: the repo root holds the project's modules.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from checkpoints.reading import model_state_dict, read_checkpoint  # noqa: E402
from config import config_from_yaml_text, get_config  # noqa: E402
from main import OneLineArgumentParser  # noqa: E402
from models import build_model  # noqa: E402
from models.weights import load_model_weights  # noqa: E402
from utils import ToolError  # noqa: E402


def tool_parser(description: str) -> argparse.ArgumentParser:
    """A parser whose mistakes are one-line ConfigErrors, with the flags that name the
    checkpoint and its weights, the same in every tool."""
    parser = OneLineArgumentParser(description=description)
    parser.add_argument('--checkpoint', required=True, metavar='FILE',
                        help='checkpoint of this project (holds its config) or an official one (needs --cfg)')
    parser.add_argument('--cfg', metavar='YAML',
                        help="config of the checkpoint's model; required for checkpoints without an "
                             "embedded config (official ones), and wins over an embedded one")
    parser.add_argument('--ema', action='store_true', help="use the EMA weights ('model_ema') of the checkpoint")
    return parser


def load_model(path: str, cfg: str | None, ema: bool, device: torch.device) -> tuple[CfgNode, nn.Module]:
    """(config, model in eval mode on `device`) with the checkpoint's weights loaded strictly."""
    ckpt = read_checkpoint(path)
    if cfg:
        config = get_config(argparse.Namespace(cfg=cfg))
    elif isinstance(ckpt.get('config'), str):
        config = config_from_yaml_text(ckpt['config'], f"the config in '{path}'")
    else:
        raise ToolError(f"'{path}' holds no config (an official checkpoint?); pass --cfg with the "
                        f"YAML file of its model")
    if ema:
        if not isinstance(ckpt.get('model_ema'), dict):
            raise ToolError(f"'{path}' holds no EMA weights ('model_ema'; the run had TRAIN.EMA.ENABLE "
                            f"off); leave out --ema")
        state = model_state_dict({'model': ckpt['model_ema']})
    else:
        state = model_state_dict(ckpt)
    model = build_model(config)
    load_model_weights(model, state, path)
    return config, model.to(device).eval()

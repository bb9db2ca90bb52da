"""Configs for tests that build optimizers, schedules and models without a run."""
from __future__ import annotations

import argparse
import os

import config
from config import set_key

from .runs import ROOT

DEMO = os.path.join(ROOT, 'configs', 'demo', 'swin_micro_112.yaml')


def make_config(*opts: str):
    return config.get_config(argparse.Namespace(cfg=DEMO, opts=list(opts)))


def with_changes(cfg, **changes):
    """A copy of a frozen config with TRAIN.OPTIMIZER / TRAIN.LR_SCHEDULER names that
    validation would reject, to reach the builders' own checks."""
    cfg = cfg.clone()
    cfg.defrost()
    for key, value in changes.items():
        set_key(cfg, key, value)
    return cfg


def group_of(optimizer):
    return {id(p): g for g in optimizer.param_groups for p in g['params']}

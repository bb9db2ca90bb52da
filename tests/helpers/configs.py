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


def data_config(root, **settings):
    """The default config over DATA_PATH `root` as the data tests use it (64 px images,
    batch 4, no loader workers), then `settings` ({'DATA.DATASET': 'wds', ...}); validated
    and frozen."""
    cfg = config.default_config()
    defaults = {'DATA.DATA_PATH': root, 'DATA.IMG_SIZE': 64, 'DATA.BATCH_SIZE': 4, 'DATA.NUM_WORKERS': 0}
    for key, value in {**defaults, **settings}.items():
        set_key(cfg, key, value)
    config.validate_config(cfg)
    cfg.freeze()
    return cfg


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

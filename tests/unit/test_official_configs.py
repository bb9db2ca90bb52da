"""The official config surface: every key and default of the official `config.py`, every
official YAML file in the official layout (configs/swin, swinv2, swinmlp, swinmoe, simmim)
loading with its own values, the flat paths kept as links, and the model types those files
name (swin_mlp from MODEL.SWIN_MLP, swin_moe from MODEL.SWIN_MOE). CPU only, fast.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest
import yaml

import config
import main
from config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / 'configs'

# ----------------------------------------------------------------------------- official data

# Every key of the official config.py (microsoft/Swin-Transformer, the version with SimMIM,
# Swin-MLP and Swin-MoE), with its official default. Sections are listed apart.
OFFICIAL_SECTIONS = [
    'DATA', 'MODEL', 'MODEL.SWIN', 'MODEL.SWINV2', 'MODEL.SWIN_MOE', 'MODEL.SWIN_MLP', 'MODEL.SIMMIM',
    'MODEL.SIMMIM.NORM_TARGET', 'TRAIN', 'TRAIN.LR_SCHEDULER', 'TRAIN.OPTIMIZER', 'TRAIN.MOE', 'AUG', 'TEST',
]
OFFICIAL_DEFAULTS = {
    'BASE': [''],
    'DATA.BATCH_SIZE': 128,
    'DATA.DATA_PATH': '',
    'DATA.DATASET': 'imagenet',
    'DATA.IMG_SIZE': 224,
    'DATA.INTERPOLATION': 'bicubic',
    'DATA.ZIP_MODE': False,
    'DATA.CACHE_MODE': 'part',
    'DATA.PIN_MEMORY': True,
    'DATA.NUM_WORKERS': 8,
    'DATA.MASK_PATCH_SIZE': 32,
    'DATA.MASK_RATIO': 0.6,
    'MODEL.TYPE': 'swin',
    'MODEL.NAME': 'swin_tiny_patch4_window7_224',
    'MODEL.PRETRAINED': '',
    'MODEL.RESUME': '',
    'MODEL.NUM_CLASSES': 1000,
    'MODEL.DROP_RATE': 0.0,
    'MODEL.DROP_PATH_RATE': 0.1,
    'MODEL.LABEL_SMOOTHING': 0.1,
    'MODEL.SWIN.PATCH_SIZE': 4,
    'MODEL.SWIN.IN_CHANS': 3,
    'MODEL.SWIN.EMBED_DIM': 96,
    'MODEL.SWIN.DEPTHS': [2, 2, 6, 2],
    'MODEL.SWIN.NUM_HEADS': [3, 6, 12, 24],
    'MODEL.SWIN.WINDOW_SIZE': 7,
    'MODEL.SWIN.MLP_RATIO': 4.0,
    'MODEL.SWIN.QKV_BIAS': True,
    'MODEL.SWIN.QK_SCALE': None,
    'MODEL.SWIN.APE': False,
    'MODEL.SWIN.PATCH_NORM': True,
    'MODEL.SWINV2.PATCH_SIZE': 4,
    'MODEL.SWINV2.IN_CHANS': 3,
    'MODEL.SWINV2.EMBED_DIM': 96,
    'MODEL.SWINV2.DEPTHS': [2, 2, 6, 2],
    'MODEL.SWINV2.NUM_HEADS': [3, 6, 12, 24],
    'MODEL.SWINV2.WINDOW_SIZE': 7,
    'MODEL.SWINV2.MLP_RATIO': 4.0,
    'MODEL.SWINV2.QKV_BIAS': True,
    'MODEL.SWINV2.APE': False,
    'MODEL.SWINV2.PATCH_NORM': True,
    'MODEL.SWINV2.PRETRAINED_WINDOW_SIZES': [0, 0, 0, 0],
    'MODEL.SWIN_MOE.PATCH_SIZE': 4,
    'MODEL.SWIN_MOE.IN_CHANS': 3,
    'MODEL.SWIN_MOE.EMBED_DIM': 96,
    'MODEL.SWIN_MOE.DEPTHS': [2, 2, 6, 2],
    'MODEL.SWIN_MOE.NUM_HEADS': [3, 6, 12, 24],
    'MODEL.SWIN_MOE.WINDOW_SIZE': 7,
    'MODEL.SWIN_MOE.MLP_RATIO': 4.0,
    'MODEL.SWIN_MOE.QKV_BIAS': True,
    'MODEL.SWIN_MOE.QK_SCALE': None,
    'MODEL.SWIN_MOE.APE': False,
    'MODEL.SWIN_MOE.PATCH_NORM': True,
    'MODEL.SWIN_MOE.MLP_FC2_BIAS': True,
    'MODEL.SWIN_MOE.INIT_STD': 0.02,
    'MODEL.SWIN_MOE.PRETRAINED_WINDOW_SIZES': [0, 0, 0, 0],
    'MODEL.SWIN_MOE.MOE_BLOCKS': [[-1], [-1], [-1], [-1]],
    'MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS': 1,
    'MODEL.SWIN_MOE.TOP_VALUE': 1,
    'MODEL.SWIN_MOE.CAPACITY_FACTOR': 1.25,
    'MODEL.SWIN_MOE.COSINE_ROUTER': False,
    'MODEL.SWIN_MOE.NORMALIZE_GATE': False,
    'MODEL.SWIN_MOE.USE_BPR': True,
    'MODEL.SWIN_MOE.IS_GSHARD_LOSS': False,
    'MODEL.SWIN_MOE.GATE_NOISE': 1.0,
    'MODEL.SWIN_MOE.COSINE_ROUTER_DIM': 256,
    'MODEL.SWIN_MOE.COSINE_ROUTER_INIT_T': 0.5,
    'MODEL.SWIN_MOE.MOE_DROP': 0.0,
    'MODEL.SWIN_MOE.AUX_LOSS_WEIGHT': 0.01,
    'MODEL.SWIN_MLP.PATCH_SIZE': 4,
    'MODEL.SWIN_MLP.IN_CHANS': 3,
    'MODEL.SWIN_MLP.EMBED_DIM': 96,
    'MODEL.SWIN_MLP.DEPTHS': [2, 2, 6, 2],
    'MODEL.SWIN_MLP.NUM_HEADS': [3, 6, 12, 24],
    'MODEL.SWIN_MLP.WINDOW_SIZE': 7,
    'MODEL.SWIN_MLP.MLP_RATIO': 4.0,
    'MODEL.SWIN_MLP.APE': False,
    'MODEL.SWIN_MLP.PATCH_NORM': True,
    'MODEL.SIMMIM.NORM_TARGET.ENABLE': False,
    'MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE': 47,
    'TRAIN.START_EPOCH': 0,
    'TRAIN.EPOCHS': 300,
    'TRAIN.WARMUP_EPOCHS': 20,
    'TRAIN.WEIGHT_DECAY': 0.05,
    'TRAIN.BASE_LR': 5e-4,
    'TRAIN.WARMUP_LR': 5e-7,
    'TRAIN.MIN_LR': 5e-6,
    'TRAIN.CLIP_GRAD': 5.0,
    'TRAIN.AUTO_RESUME': True,
    'TRAIN.ACCUMULATION_STEPS': 1,
    'TRAIN.USE_CHECKPOINT': False,
    'TRAIN.LR_SCHEDULER.NAME': 'cosine',
    'TRAIN.LR_SCHEDULER.DECAY_EPOCHS': 30,
    'TRAIN.LR_SCHEDULER.DECAY_RATE': 0.1,
    'TRAIN.LR_SCHEDULER.WARMUP_PREFIX': True,
    'TRAIN.LR_SCHEDULER.GAMMA': 0.1,
    'TRAIN.LR_SCHEDULER.MULTISTEPS': [],
    'TRAIN.OPTIMIZER.NAME': 'adamw',
    'TRAIN.OPTIMIZER.EPS': 1e-8,
    'TRAIN.OPTIMIZER.BETAS': (0.9, 0.999),
    'TRAIN.OPTIMIZER.MOMENTUM': 0.9,
    'TRAIN.LAYER_DECAY': 1.0,
    'TRAIN.MOE.SAVE_MASTER': False,
    'AUG.COLOR_JITTER': 0.4,
    'AUG.AUTO_AUGMENT': 'rand-m9-mstd0.5-inc1',
    'AUG.REPROB': 0.25,
    'AUG.REMODE': 'pixel',
    'AUG.RECOUNT': 1,
    'AUG.MIXUP': 0.8,
    'AUG.CUTMIX': 1.0,
    'AUG.CUTMIX_MINMAX': None,
    'AUG.MIXUP_PROB': 1.0,
    'AUG.MIXUP_SWITCH_PROB': 0.5,
    'AUG.MIXUP_MODE': 'batch',
    'TEST.CROP': True,
    'TEST.SEQUENTIAL': False,
    'TEST.SHUFFLE': False,
    'ENABLE_AMP': False,
    'AMP_ENABLE': True,
    'AMP_OPT_LEVEL': '',
    'OUTPUT': '',
    'TAG': 'default',
    'SAVE_FREQ': 1,
    'PRINT_FREQ': 10,
    'SEED': 0,
    'EVAL_MODE': False,
    'THROUGHPUT_MODE': False,
    'LOCAL_RANK': 0,
    'FUSED_WINDOW_PROCESS': False,
    'FUSED_LAYERNORM': False,
}
# Defaults that differ on purpose, and why (docs/configuration.md says the same)
DIFFERENT_DEFAULTS = {
    'OUTPUT': 'output',  # official '' plus a flag default of 'output': the same folder
}

# The official layout (configs/<folder>/<file>): every file upstream ships, no more
OFFICIAL_FILES = {
    'swin': [
        'swin_base_patch4_window12_384_22kto1k_finetune', 'swin_base_patch4_window12_384_finetune',
        'swin_base_patch4_window7_224', 'swin_base_patch4_window7_224_22k',
        'swin_base_patch4_window7_224_22kto1k_finetune', 'swin_large_patch4_window12_384_22kto1k_finetune',
        'swin_large_patch4_window7_224_22k', 'swin_large_patch4_window7_224_22kto1k_finetune',
        'swin_small_patch4_window7_224', 'swin_small_patch4_window7_224_22k',
        'swin_small_patch4_window7_224_22kto1k_finetune', 'swin_tiny_c24_patch4_window8_256',
        'swin_tiny_patch4_window7_224', 'swin_tiny_patch4_window7_224_22k',
        'swin_tiny_patch4_window7_224_22kto1k_finetune',
    ],
    'swinv2': [
        'swinv2_base_patch4_window12_192_22k', 'swinv2_base_patch4_window12to16_192to256_22kto1k_ft',
        'swinv2_base_patch4_window12to24_192to384_22kto1k_ft', 'swinv2_base_patch4_window16_256',
        'swinv2_base_patch4_window8_256', 'swinv2_large_patch4_window12_192_22k',
        'swinv2_large_patch4_window12to16_192to256_22kto1k_ft', 'swinv2_large_patch4_window12to24_192to384_22kto1k_ft',
        'swinv2_small_patch4_window16_256', 'swinv2_small_patch4_window8_256',
        'swinv2_tiny_patch4_window16_256', 'swinv2_tiny_patch4_window8_256',
    ],
    'swinmlp': [
        'swin_mlp_base_patch4_window7_224', 'swin_mlp_tiny_c12_patch4_window8_256',
        'swin_mlp_tiny_c24_patch4_window8_256', 'swin_mlp_tiny_c6_patch4_window8_256',
    ],
    'swinmoe': [
        f'swin_moe_{size}_patch4_window12_192_{variant}_22k'
        for size, variants in (
            ('base', ('16expert_32gpu', '32expert_32gpu', '8expert_32gpu', 'cosine_router_32expert_32gpu',
                      'densebaseline')),
            ('small', ('16expert_32gpu', '32expert_32gpu', '64expert_64gpu', '8expert_32gpu',
                       'cosine_router_32expert_32gpu', 'densebaseline')))
        for variant in variants
    ],
    'simmim': [
        'simmim_finetune__swin_base__img224_window7__800ep', 'simmim_finetune__swinv2_base__img224_window14__800ep',
        'simmim_pretrain__swin_base__img192_window6__800ep', 'simmim_pretrain__swinv2_base__img192_window12__800ep',
    ],
}
OFFICIAL_PATHS = sorted(CONFIGS / folder / f'{name}.yaml' for folder, names in OFFICIAL_FILES.items() for name in names)
# Files that used to sit flat in configs/ and moved into the official folders: the flat path is
# a relative link to the moved file, since docs and users name the flat paths
FLAT_LINKS = [(folder, name) for folder in ('swin', 'swinv2') for name in OFFICIAL_FILES[folder]
              if name not in ('swin_tiny_c24_patch4_window8_256',) and not name.endswith('_224_22k')]
# Keys get_config lower-cases (names of choices)
LOWERED = {'MODEL.TYPE', 'TRAIN.OPTIMIZER.NAME', 'TRAIN.LR_SCHEDULER.NAME', 'DATA.DATASET', 'DATA.INTERPOLATION',
           'DATA.CACHE_MODE', 'AUG.MIXUP_MODE', 'AUG.REMODE', 'AMP_DTYPE', 'DATA.PREPARE', 'TRAIN.LR_SCALING',
           'TRAIN.PARALLEL', 'TRAIN.FSDP.REDUCE_DTYPE'}


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    monkeypatch.delenv('LOCAL_RANK', raising=False)


def load(path, **kwargs):
    return config.get_config(argparse.Namespace(cfg=str(path), **kwargs))


def merged_only(path):
    """The defaults with the file (and its BASE files) merged, not validated: how a file whose
    model type is refused is still read."""
    cfg = config.default_config()
    config.merge_config_file(cfg, str(path))
    return cfg


def get(node, key: str):
    for part in key.split('.'):
        node = node[part]
    return node


def all_keys(node, prefix=''):
    keys = set()
    for k, v in node.items():
        keys.add(prefix + k)
        if isinstance(v, config.CN):
            keys |= all_keys(v, prefix + k + '.')
    return keys


def yaml_values(path: Path) -> dict:
    """The file's values read with the yaml library alone, its BASE files (relative to it) first."""
    data = yaml.safe_load(path.read_text()) or {}
    merged: dict = {}
    bases = data.pop('BASE', [''])
    for base in [bases] if isinstance(bases, str) else bases:
        if base:
            _deep_update(merged, yaml_values(path.parent / base))
    _deep_update(merged, data)
    return merged


def _deep_update(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_update(into[k], v)
        else:
            into[k] = v


def leaves(data: dict, prefix=''):
    for k, v in data.items():
        if isinstance(v, dict):
            yield from leaves(v, f'{prefix}{k}.')
        else:
            yield f'{prefix}{k}', v


def same(ours, theirs, lowered: bool) -> bool:
    if isinstance(theirs, (list, tuple)):
        return (isinstance(ours, (list, tuple)) and len(ours) == len(theirs)
                and all(same(a, b, lowered) for a, b in zip(ours, theirs)))
    if isinstance(theirs, bool) or theirs is None:
        return ours is theirs
    if isinstance(theirs, str) and isinstance(ours, float):  # PyYAML reads 2e-05 as text
        return ours == float(theirs)
    if isinstance(theirs, (int, float)):
        return not isinstance(ours, bool) and isinstance(ours, (int, float)) and ours == theirs
    if lowered:
        return ours == theirs.lower()
    return ours == theirs


def mismatches(cfg, path: Path, through_get_config: bool) -> list[str]:
    wrong = []
    for key, value in leaves(yaml_values(path)):
        ours = get(cfg, key)
        if not same(ours, value, through_get_config and key in LOWERED):
            wrong.append(f'{key}: config {ours!r} != YAML {value!r}')
    return wrong


def expect_error(fn, *words: str) -> str:
    with pytest.raises(ConfigError) as info:
        fn()
    message = str(info.value)
    assert message.strip() and '\n' not in message, f'not one line: {message!r}'
    for word in words:
        assert word in message, f'{word!r} not in {message!r}'
    return message


# ----------------------------------------------------------------------------- keys and defaults

def test_official_key_list_is_complete_data():
    """The lists above are the whole official config (a typo or a lost line fails here)."""
    assert len(OFFICIAL_DEFAULTS) == 130 and len(OFFICIAL_SECTIONS) == 14
    assert all(key.rsplit('.', 1)[0] in OFFICIAL_SECTIONS for key in OFFICIAL_DEFAULTS if '.' in key)


def test_our_keys_are_a_superset_of_the_official_keys():
    ours = all_keys(config.default_config())
    missing = sorted((set(OFFICIAL_DEFAULTS) | set(OFFICIAL_SECTIONS)) - ours)
    assert not missing, f'official keys missing from config.py: {missing}'
    for section in OFFICIAL_SECTIONS:
        assert isinstance(get(config.default_config(), section), config.CN), f'{section} is not a section'


@pytest.mark.parametrize('key', sorted(OFFICIAL_DEFAULTS))
def test_official_default(key):
    expected = DIFFERENT_DEFAULTS.get(key, OFFICIAL_DEFAULTS[key])
    value = get(config.default_config(), key)
    assert same(value, expected, lowered=False), f'{key}: {value!r} != official {expected!r}'
    if isinstance(expected, (int, float, str)) and not isinstance(expected, bool):
        assert type(value) is type(expected), f'{key}: {type(value).__name__} != {type(expected).__name__}'


def test_an_empty_yaml_keeps_every_default(tmp_path):
    empty = tmp_path / 'empty.yaml'
    empty.write_text('# nothing\n')
    loaded, defaults = load(empty), config.default_config()
    for key in sorted(set(OFFICIAL_DEFAULTS) - {'OUTPUT'}):  # the run folder is settled from the name
        assert same(get(loaded, key), get(defaults, key), lowered=False), key


# ----------------------------------------------------------------------------- the files

def test_official_folders_hold_exactly_the_official_files():
    for folder, names in OFFICIAL_FILES.items():
        found = sorted(p.stem for p in (CONFIGS / folder).glob('*.yaml'))
        assert found == sorted(names), f'configs/{folder}: {sorted(set(found) ^ set(names))}'
        for name in names:
            assert not (CONFIGS / folder / f'{name}.yaml').is_symlink(), f'{folder}/{name} must be a file'
    assert len(OFFICIAL_PATHS) == 46


def _shares_experts(path) -> bool:
    """The official Swin-MoE files that share one expert over several GPUs (NUM_LOCAL_EXPERTS
    -2 or -4: Tutel's sharded experts)."""
    return yaml_values(path).get('MODEL', {}).get('SWIN_MOE', {}).get('NUM_LOCAL_EXPERTS', 1) < -1


SHARED_EXPERT_PATHS = [p for p in OFFICIAL_PATHS if _shares_experts(p)]


@pytest.mark.parametrize('path', OFFICIAL_PATHS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_official_file_loads_with_its_own_values(path):
    cfg = load(path)
    assert len(list(leaves(yaml_values(path)))) >= 5
    assert not mismatches(cfg, path, through_get_config=True)
    assert config.model_arch(cfg)[1] == 'MODEL.' + config.ARCH_SECTIONS[cfg.MODEL.TYPE]


def test_the_shared_expert_files_are_the_8_and_16_expert_ones():
    assert len(SHARED_EXPERT_PATHS) == 4  # the 8- and 16-expert files on 32 GPUs: -4 and -2
    assert all(re.search(r'_(8|16)expert_32gpu', p.name) for p in SHARED_EXPERT_PATHS)
    for path in SHARED_EXPERT_PATHS:
        experts = 8 if '_8expert' in path.name else 16
        assert load(path).MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS == -(32 // experts)


def test_value_check_detects_a_difference():
    path = CONFIGS / 'swin' / 'swin_tiny_patch4_window7_224.yaml'
    cfg = load(path, opts=['MODEL.SWIN.EMBED_DIM', '48', 'MODEL.DROP_PATH_RATE', '0.3'])
    assert [m.split(':')[0] for m in mismatches(cfg, path, True)] == ['MODEL.DROP_PATH_RATE', 'MODEL.SWIN.EMBED_DIM']


def test_yaml_values_follow_base_files(tmp_path):
    (tmp_path / 'sub').mkdir()
    (tmp_path / 'base.yaml').write_text('MODEL:\n  DROP_PATH_RATE: 0.3\n  SWIN:\n    EMBED_DIM: 48\n')
    child = tmp_path / 'sub' / 'child.yaml'
    child.write_text("BASE: ['../base.yaml']\nMODEL:\n  SWIN:\n    EMBED_DIM: 24\n")
    assert dict(leaves(yaml_values(child))) == {'MODEL.DROP_PATH_RATE': 0.3, 'MODEL.SWIN.EMBED_DIM': 24}
    assert not mismatches(load(child), child, True)


def test_swin_moe_values_keep_their_types():
    cfg = merged_only(CONFIGS / 'swinmoe' / 'swin_moe_base_patch4_window12_192_8expert_32gpu_22k.yaml')
    moe = cfg.MODEL.SWIN_MOE
    assert moe.MOE_BLOCKS == [[-1], [-1], [1, 3, 5, 7, 9, 11, 13, 15, 17], [1]]
    assert moe.NUM_LOCAL_EXPERTS == -4 and moe.INIT_STD == 0.005 and moe.MLP_FC2_BIAS is False
    assert cfg.TRAIN.CLIP_GRAD == 3.0 and cfg.TEST.SHUFFLE is True


@pytest.mark.parametrize('folder,name', FLAT_LINKS, ids=[n for _, n in FLAT_LINKS])
def test_flat_path_is_a_relative_link_to_the_moved_file(folder, name):
    flat = CONFIGS / f'{name}.yaml'
    assert flat.is_symlink(), f'configs/{name}.yaml is not a link'
    assert os.readlink(flat) == f'{folder}/{name}.yaml'
    assert flat.resolve() == (CONFIGS / folder / f'{name}.yaml').resolve()
    assert load(flat).dump() == load(CONFIGS / folder / f'{name}.yaml').dump()


def test_flat_links_cover_every_moved_file():
    assert len(FLAT_LINKS) == 22
    links = sorted(p.name for p in CONFIGS.glob('*.yaml') if p.is_symlink())
    assert links == sorted(f'{name}.yaml' for _, name in FLAT_LINKS)


# ----------------------------------------------------------------------------- model types

def test_swin_mlp_reads_its_own_section():
    cfg = load(CONFIGS / 'swinmlp' / 'swin_mlp_tiny_c24_patch4_window8_256.yaml')
    arch, section = config.model_arch(cfg)
    assert section == 'MODEL.SWIN_MLP' and arch.WINDOW_SIZE == 8 and list(arch.NUM_HEADS) == [4, 8, 16, 32]
    assert cfg.MODEL.SWIN.WINDOW_SIZE == 7  # the V1 section is untouched


def test_swin_mlp_is_validated_on_its_section():
    path = CONFIGS / 'swinmlp' / 'swin_mlp_tiny_c24_patch4_window8_256.yaml'
    # a V1 section that would be wrong does not matter for swin_mlp ...
    assert load(path, opts=['MODEL.SWIN.NUM_HEADS', '[5]']).MODEL.TYPE == 'swin_mlp'
    # ... its own does
    expect_error(lambda: load(path, opts=['MODEL.SWIN_MLP.NUM_HEADS', '[4, 8, 16]']), 'MODEL.SWIN_MLP.DEPTHS',
                 'MODEL.SWIN_MLP.NUM_HEADS')
    expect_error(lambda: load(path, opts=['MODEL.SWIN_MLP.NUM_HEADS', '[5, 8, 16, 32]']),
                 'MODEL.SWIN_MLP.NUM_HEADS[0]=5')
    expect_error(lambda: load(path, opts=['MODEL.SWIN_MLP.WINDOW_SIZE', '0']), 'MODEL.SWIN_MLP.WINDOW_SIZE')
    expect_error(lambda: load(path, opts=['TRAIN.FREEZE_STAGES', '5']), 'TRAIN.FREEZE_STAGES', '[0, 4]')


def test_swin_moe_runs_only_what_it_supports():
    tiny = CONFIGS / 'swin' / 'swin_tiny_patch4_window7_224.yaml'
    assert load(tiny, opts=['MODEL.TYPE', 'swin_moe']).MODEL.TYPE == 'swin_moe'
    assert config.model_arch(load(tiny, opts=['MODEL.TYPE', 'SWIN_MOE']))[1] == 'MODEL.SWIN_MOE'
    moe = ['MODEL.TYPE', 'swin_moe']
    expect_error(lambda: load(tiny, opts=moe + ['TRAIN.PARALLEL', 'fsdp']), 'Swin-MoE', 'ddp')
    expect_error(lambda: load(tiny, opts=moe + ['TRAIN.COMPILE', 'True']), 'Swin-MoE', 'TRAIN.COMPILE')
    expect_error(lambda: load(tiny, opts=moe + ['MODEL.SWIN_MOE.TOP_VALUE', '3']), 'TOP_VALUE')
    expect_error(lambda: load(tiny, opts=moe + ['MODEL.SWIN_MOE.MOE_BLOCKS', '[[1]]']), 'MOE_BLOCKS')
    assert load(tiny, opts=['MODEL.TYPE', 'swin_mlp']).MODEL.TYPE == 'swin_mlp'
    expect_error(lambda: load(tiny, opts=['MODEL.TYPE', 'swin_mpl']), "did you mean 'swin_mlp'")


def test_zero_local_experts_exits_with_code_2(capsys):
    path = CONFIGS / 'swinmoe' / 'swin_moe_base_patch4_window12_192_8expert_32gpu_22k.yaml'
    assert main.main(['--cfg', str(path), '--throughput', '--opts', 'MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS', '0']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'NUM_LOCAL_EXPERTS' in err


# ----------------------------------------------------------------------------- SimMIM and AMP keys

@pytest.mark.parametrize('name', OFFICIAL_FILES['simmim'])
def test_simmim_files_pass_the_pretraining_checks(name):
    cfg = load(CONFIGS / 'simmim' / f'{name}.yaml')
    config.validate_pretrain_config(cfg)
    if 'swinv2' in name and 'pretrain' in name:
        assert cfg.MODEL.SIMMIM.NORM_TARGET.ENABLE is True and cfg.MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE == 47


def test_pretraining_checks_reject_what_the_mask_generator_cannot_do():
    path = CONFIGS / 'simmim' / 'simmim_pretrain__swin_base__img192_window6__800ep.yaml'
    expect_error(lambda: config.validate_pretrain_config(load(path, opts=['DATA.IMG_SIZE', '200'])),
                 'DATA.IMG_SIZE 200', 'DATA.MASK_PATCH_SIZE 32')
    expect_error(lambda: config.validate_pretrain_config(load(path, opts=['DATA.MASK_PATCH_SIZE', '6'])),
                 'DATA.MASK_PATCH_SIZE 6', 'MODEL.SWIN.PATCH_SIZE 4')
    mlp = load(CONFIGS / 'swinmlp' / 'swin_mlp_tiny_c24_patch4_window8_256.yaml')
    expect_error(lambda: config.validate_pretrain_config(mlp), 'SimMIM', "'swin_mlp'")


def test_pretrain_switch_runs_the_pretraining_checks():
    path = CONFIGS / 'simmim' / 'simmim_pretrain__swinv2_base__img192_window12__800ep.yaml'
    assert load(path).MODEL.SIMMIM.PRETRAIN is False  # [New] key, off by default
    assert load(path, opts=['MODEL.SIMMIM.PRETRAIN', 'True']).MODEL.SIMMIM.PRETRAIN is True
    expect_error(lambda: load(path, opts=['MODEL.SIMMIM.PRETRAIN', 'True', 'DATA.IMG_SIZE', '200']),
                 'DATA.IMG_SIZE 200')
    mlp = CONFIGS / 'swinmlp' / 'swin_mlp_tiny_c24_patch4_window8_256.yaml'
    expect_error(lambda: load(mlp, opts=['MODEL.SIMMIM.PRETRAIN', 'True']), 'SimMIM', "'swin_mlp'")
    on = ['MODEL.SIMMIM.PRETRAIN', 'True']
    expect_error(lambda: load(path, opts=on + ['DATA.LOADER', 'dali']), 'DATA.LOADER torch')
    expect_error(lambda: load(path, opts=on + ['DATA.DATASET', 'synthetic']), 'synthetic')
    expect_error(lambda: load(path, opts=on + ['EVAL_MODE', 'True']), '--eval', 'reconstruction')
    assert config.mixup_active(load(path)) and not config.mixup_active(load(path, opts=on))  # no labels to mix


def test_simmim_keys_are_validated():
    tiny = CONFIGS / 'swin' / 'swin_tiny_patch4_window7_224.yaml'
    expect_error(lambda: load(tiny, opts=['DATA.MASK_RATIO', '1.0']), 'DATA.MASK_RATIO')
    expect_error(lambda: load(tiny, opts=['DATA.MASK_PATCH_SIZE', '0']), 'DATA.MASK_PATCH_SIZE')
    expect_error(lambda: load(tiny, opts=['MODEL.SIMMIM.NORM_TARGET.ENABLE', 'True',
                                          'MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE', '48']),
                 'NORM_TARGET.PATCH_SIZE', 'odd')
    # an even size is only a mistake when the normalized target is on
    assert load(tiny, opts=['MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE', '48']).MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE == 48


def test_enable_amp_flag_sets_the_simmim_switch():
    tiny = CONFIGS / 'swin' / 'swin_tiny_patch4_window7_224.yaml'
    assert load(tiny).ENABLE_AMP is False
    assert load(tiny, enable_amp=True).ENABLE_AMP is True
    assert load(tiny, enable_amp=True).AMP_ENABLE is True

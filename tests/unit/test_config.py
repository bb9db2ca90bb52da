"""Config loading, inheritance, overrides, flags and validation (CPU only, fast).

The config is the first thing a user meets: the official YAML files and command lines
must work unchanged, and every mistake must end in one `error: ...` line (exit code 2),
never a traceback or a silently ignored value.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import yaml

import config
import main
from config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / 'configs'
SWIN_T = CONFIGS / 'swin_tiny_patch4_window7_224.yaml'
SWIN_B_384 = CONFIGS / 'swin_base_patch4_window12_384.yaml'
ALL_YAMLS = sorted(CONFIGS.glob('**/*.yaml'))


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    """LOCAL_RANK from an outer launcher must not leak into these tests."""
    monkeypatch.delenv('LOCAL_RANK', raising=False)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(cfg, **kwargs):
    return config.get_config(argparse.Namespace(cfg=str(cfg), **kwargs))


def get(cfg, key: str):
    node = cfg
    for part in key.split('.'):
        node = node[part]
    return node


def expect_error(fn, *words: str) -> str:
    """Run fn, expect a one-line ConfigError containing every word; return the message."""
    with pytest.raises(ConfigError) as info:
        fn()
    message = str(info.value)
    assert message.strip(), 'empty error message'
    assert '\n' not in message, f'error message is not one line: {message!r}'
    for word in words:
        assert word in message, f'{word!r} not in {message!r}'
    return message


def parse(*argv: str):
    return main.parse_option(list(argv))


# ----------------------------------------------------------------------------- 1. shipped YAMLs

def test_config_tree_is_searched_recursively():
    names = {p.relative_to(CONFIGS).as_posix() for p in ALL_YAMLS}
    assert 'swin_tiny_patch4_window7_224.yaml' in names
    assert 'swin_base_patch4_window12_384.yaml' in names
    assert any('/' in n for n in names), f'no YAML in a subfolder found: {sorted(names)}'


# Every shipped file loads, the official Swin-MoE files that share one expert over several
# GPUs (NUM_LOCAL_EXPERTS -4 / -2) included
SHARED_EXPERTS = {'swin_moe_base_patch4_window12_192_8expert_32gpu_22k.yaml',
                  'swin_moe_base_patch4_window12_192_16expert_32gpu_22k.yaml',
                  'swin_moe_small_patch4_window12_192_8expert_32gpu_22k.yaml',
                  'swin_moe_small_patch4_window12_192_16expert_32gpu_22k.yaml'}
BUILDABLE_YAMLS = ALL_YAMLS


def test_the_shared_expert_yamls_are_among_the_loaded_ones():
    assert SHARED_EXPERTS <= {p.name for p in BUILDABLE_YAMLS}


@pytest.mark.parametrize('path', BUILDABLE_YAMLS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_shipped_yaml_loads_frozen(path):
    cfg = load(path)
    assert isinstance(cfg.MODEL.NAME, str) and cfg.MODEL.NAME.strip()
    assert cfg.is_frozen()
    with pytest.raises(AttributeError):
        cfg.TRAIN.EPOCHS = 1
    # OUTPUT/MODEL.NAME/TAG; the official SimMIM files set their own TAG
    assert cfg.OUTPUT == os.path.join('output', cfg.MODEL.NAME, yaml.safe_load(path.read_text()).get('TAG', 'default'))


def test_swin_tiny_yaml_values():
    cfg = load(SWIN_T)
    assert cfg.MODEL.NAME == 'swin_tiny_patch4_window7_224'
    assert cfg.MODEL.TYPE == 'swin'
    assert cfg.MODEL.SWIN.EMBED_DIM == 96
    assert list(cfg.MODEL.SWIN.DEPTHS) == [2, 2, 6, 2]
    assert list(cfg.MODEL.SWIN.NUM_HEADS) == [3, 6, 12, 24]
    assert cfg.MODEL.SWIN.WINDOW_SIZE == 7
    assert cfg.MODEL.DROP_PATH_RATE == pytest.approx(0.2)
    assert cfg.DATA.IMG_SIZE == 224


def test_swin_base_384_yaml_values():
    cfg = load(SWIN_B_384)
    assert cfg.DATA.IMG_SIZE == 384
    assert cfg.MODEL.SWIN.WINDOW_SIZE == 12
    assert cfg.TEST.CROP is False
    assert cfg.MODEL.SWIN.EMBED_DIM == 128
    assert list(cfg.MODEL.SWIN.DEPTHS) == [2, 2, 18, 2]


# ----------------------------------------------------------------------------- 2. defaults

def test_default_config_is_a_fresh_copy():
    a = config.default_config()
    a.TRAIN.EPOCHS = 1
    a.MODEL.SWIN.DEPTHS.append(9)
    b = config.default_config()
    assert b.TRAIN.EPOCHS == 300
    assert list(b.MODEL.SWIN.DEPTHS) == [2, 2, 6, 2]


# ----------------------------------------------------------------------------- 3. BASE inheritance

BASE_YAML = """\
MODEL:
  NAME: base_model
  DROP_PATH_RATE: 0.3
DATA:
  IMG_SIZE: 192
TRAIN:
  EPOCHS: 50
  BASE_LR: 2e-05
"""


def test_base_relative_to_yaml_file_and_child_wins(tmp_path, monkeypatch):
    write(tmp_path / 'base.yaml', BASE_YAML)
    child = write(tmp_path / 'sub' / 'child.yaml', """\
BASE: ['../base.yaml']
MODEL:
  NAME: child_model
DATA:
  IMG_SIZE: 256
""")
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # BASE is resolved from the YAML's folder, not the cwd
    cfg = load(child)
    assert cfg.MODEL.NAME == 'child_model'           # child wins
    assert cfg.DATA.IMG_SIZE == 256                  # child wins
    assert cfg.TRAIN.EPOCHS == 50                    # from base
    assert cfg.MODEL.DROP_PATH_RATE == pytest.approx(0.3)  # from base
    assert cfg.TRAIN.BASE_LR == pytest.approx(2e-05)  # from base, decoded
    assert cfg.TRAIN.WARMUP_EPOCHS == 20             # default untouched


def test_base_given_as_plain_string(tmp_path):
    write(tmp_path / 'base.yaml', BASE_YAML)
    child = write(tmp_path / 'sub' / 'child.yaml', 'BASE: ../base.yaml\n')
    cfg = load(child)
    assert cfg.MODEL.NAME == 'base_model' and cfg.TRAIN.EPOCHS == 50


def test_nested_base_chain(tmp_path):
    write(tmp_path / 'root.yaml', """\
TRAIN:
  EPOCHS: 10
  WARMUP_EPOCHS: 2
MODEL:
  NAME: root
""")
    write(tmp_path / 'a' / 'mid.yaml', """\
BASE: ['../root.yaml']
TRAIN:
  EPOCHS: 20
MODEL:
  NAME: mid
DATA:
  BATCH_SIZE: 32
""")
    leaf = write(tmp_path / 'a' / 'b' / 'leaf.yaml', """\
BASE: ['../mid.yaml']
MODEL:
  NAME: leaf
""")
    cfg = load(leaf)
    assert cfg.MODEL.NAME == 'leaf'
    assert cfg.TRAIN.EPOCHS == 20        # mid overrides root
    assert cfg.TRAIN.WARMUP_EPOCHS == 2  # only root sets it
    assert cfg.DATA.BATCH_SIZE == 32     # only mid sets it


def test_several_bases_merge_in_order(tmp_path):
    write(tmp_path / 'one.yaml', 'TRAIN:\n  EPOCHS: 11\n  WARMUP_EPOCHS: 1\n')
    write(tmp_path / 'two.yaml', 'TRAIN:\n  EPOCHS: 22\n')
    child = write(tmp_path / 'child.yaml', "BASE: ['one.yaml', 'two.yaml']\n")
    cfg = load(child)
    assert cfg.TRAIN.EPOCHS == 22
    assert cfg.TRAIN.WARMUP_EPOCHS == 1


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / 'a.yaml', "BASE: ['sub/b.yaml']\n")
    b = write(tmp_path / 'sub' / 'b.yaml', "BASE: ['../a.yaml']\n")
    expect_error(lambda: load(b), 'BASE', 'itself')


def test_base_self_reference_is_an_error(tmp_path):
    me = write(tmp_path / 'me.yaml', "BASE: ['me.yaml']\n")
    expect_error(lambda: load(me), 'BASE', 'itself')


def test_missing_base_file_is_named(tmp_path):
    child = write(tmp_path / 'child.yaml', "BASE: ['no_such_base.yaml']\n")
    message = expect_error(lambda: load(child), 'no_such_base.yaml', 'does not exist')
    assert 'child.yaml' in message  # names where it was referenced


def test_exponent_floats_in_yaml_become_floats(tmp_path):
    text = 'TRAIN:\n  BASE_LR: 2e-05\n  WARMUP_LR: 2e-08\n  MIN_LR: 2e-07\n  WEIGHT_DECAY: 1e-8\n'
    assert isinstance(yaml.safe_load(text)['TRAIN']['BASE_LR'], str)  # the PyYAML quirk
    cfg = load(write(tmp_path / 'lr.yaml', text))
    for key, expected in [('BASE_LR', 2e-05), ('WARMUP_LR', 2e-08), ('MIN_LR', 2e-07),
                          ('WEIGHT_DECAY', 1e-8)]:
        value = cfg.TRAIN[key]
        assert isinstance(value, float), (key, value)
        assert value == pytest.approx(expected, rel=1e-12)


def test_int_accepted_for_float_key(tmp_path):
    cfg = load(write(tmp_path / 'x.yaml', 'TRAIN:\n  CLIP_GRAD: 1\n  OPTIMIZER:\n    BETAS: [0.9, 0.95]\n'))
    assert isinstance(cfg.TRAIN.CLIP_GRAD, float) and cfg.TRAIN.CLIP_GRAD == 1.0
    assert tuple(cfg.TRAIN.OPTIMIZER.BETAS) == pytest.approx((0.9, 0.95))


# ----------------------------------------------------------------------------- 4. --opts

def test_opts_override_with_decoded_types():
    cfg = load(SWIN_T, opts=['TRAIN.EPOCHS', '100',
                             'MODEL.SWIN.DEPTHS', '[2,2,2,2]',
                             'TRAIN.CLIP_GRAD', 'None',
                             'TRAIN.BASE_LR', '1e-3',
                             'TEST.CROP', 'False',
                             'TRAIN.OPTIMIZER.BETAS', '(0.9, 0.95)',
                             'MODEL.NAME', 'my_model'])
    assert cfg.TRAIN.EPOCHS == 100 and type(cfg.TRAIN.EPOCHS) is int
    assert list(cfg.MODEL.SWIN.DEPTHS) == [2, 2, 2, 2]
    assert all(type(d) is int for d in cfg.MODEL.SWIN.DEPTHS)
    assert cfg.TRAIN.CLIP_GRAD is None
    assert isinstance(cfg.TRAIN.BASE_LR, float) and cfg.TRAIN.BASE_LR == pytest.approx(1e-3)
    assert cfg.TEST.CROP is False
    assert tuple(cfg.TRAIN.OPTIMIZER.BETAS) == pytest.approx((0.9, 0.95))
    assert cfg.OUTPUT == os.path.join('output', 'my_model', 'default')
    # values the YAML set and --opts did not touch are kept
    assert cfg.MODEL.DROP_PATH_RATE == pytest.approx(0.2)
    # the module defaults are not mutated by a run's overrides
    assert config.default_config().TRAIN.EPOCHS == 300
    assert config.default_config().TRAIN.CLIP_GRAD == 5.0


def test_opts_through_command_line():
    _, cfg = parse('--cfg', str(SWIN_T), '--opts', 'TRAIN.EPOCHS', '7', 'MODEL.SWIN.DEPTHS', '[2,2,2,2]',
                   'TRAIN.CLIP_GRAD', 'None')
    assert cfg.TRAIN.EPOCHS == 7
    assert list(cfg.MODEL.SWIN.DEPTHS) == [2, 2, 2, 2]
    assert cfg.TRAIN.CLIP_GRAD is None


def test_opts_odd_count_is_an_error():
    expect_error(lambda: load(SWIN_T, opts=['TRAIN.EPOCHS', '100', 'TRAIN.WARMUP_EPOCHS']),
                 'TRAIN.WARMUP_EPOCHS', 'pairs')
    expect_error(lambda: parse('--cfg', str(SWIN_T), '--opts', 'TRAIN.EPOCHS'), 'TRAIN.EPOCHS', 'pairs')


@pytest.mark.parametrize('key,suggestion', [
    ('MODEL.SWIN.DEPTH', 'MODEL.SWIN.DEPTHS'),
    ('TRAIN.EPOCH', 'TRAIN.EPOCHS'),
    ('DATA.BATCHSIZE', 'DATA.BATCH_SIZE'),
])
def test_opts_unknown_key_suggests_closest(key, suggestion):
    message = expect_error(lambda: load(SWIN_T, opts=[key, '4']), key, 'unknown')
    assert f"'{suggestion}'" in message


def test_opts_key_below_a_value_or_naming_a_section():
    expect_error(lambda: load(SWIN_T, opts=['DATA.IMG_SIZE.X', '3']), 'DATA.IMG_SIZE.X', 'unknown')
    expect_error(lambda: load(SWIN_T, opts=['MODEL.SWIN', '3']), 'MODEL.SWIN', 'section')


def test_opts_wrong_type_is_an_error():
    expect_error(lambda: load(SWIN_T, opts=['TRAIN.EPOCHS', 'many']), 'TRAIN.EPOCHS', 'expects')
    expect_error(lambda: load(SWIN_T, opts=['MODEL.SWIN.DEPTHS', '[2,x]']), 'MODEL.SWIN.DEPTHS', 'expects')


# ----------------------------------------------------------------------------- 5. flags

FLAG_CASES = [
    (['--batch-size', '32'], 'DATA.BATCH_SIZE', 32),
    (['--data-path', '/data/imagenet'], 'DATA.DATA_PATH', '/data/imagenet'),
    (['--zip'], 'DATA.ZIP_MODE', True),
    (['--cache-mode', 'full'], 'DATA.CACHE_MODE', 'full'),
    (['--cache-mode', 'no'], 'DATA.CACHE_MODE', 'no'),
    (['--pretrained', 'weights/swin_tiny.pth'], 'MODEL.PRETRAINED', 'weights/swin_tiny.pth'),
    (['--resume', 'ckpt/epoch_3.pth'], 'MODEL.RESUME', 'ckpt/epoch_3.pth'),
    (['--accumulation-steps', '4'], 'TRAIN.ACCUMULATION_STEPS', 4),
    (['--use-checkpoint'], 'TRAIN.USE_CHECKPOINT', True),
    (['--disable_amp'], 'AMP_ENABLE', False),
    (['--amp-opt-level', 'O0'], 'AMP_ENABLE', False),
    (['--tag', 'exp1'], 'TAG', 'exp1'),
    (['--eval', '--resume', 'ckpt.pth'], 'EVAL_MODE', True),
    (['--throughput'], 'THROUGHPUT_MODE', True),
    (['--optim', 'sgd'], 'TRAIN.OPTIMIZER.NAME', 'sgd'),
    (['--optim', 'SGD'], 'TRAIN.OPTIMIZER.NAME', 'sgd'),
    (['--fused_window_process'], 'FUSED_WINDOW_PROCESS', True),
    (['--fused_layernorm'], 'FUSED_LAYERNORM', True),
]


@pytest.fixture(scope='module')
def no_flag_config():
    return parse('--cfg', str(SWIN_T))[1]


@pytest.mark.parametrize('flags,key,expected', FLAG_CASES, ids=[' '.join(c[0]) for c in FLAG_CASES])
def test_flag_sets_its_key(no_flag_config, flags, key, expected):
    assert get(no_flag_config, key) != expected, 'case would pass without the flag'
    _, cfg = parse('--cfg', str(SWIN_T), *flags)
    assert get(cfg, key) == expected
    assert type(get(cfg, key)) is type(expected)


def test_amp_opt_level_other_than_o0_keeps_amp():
    _, cfg = parse('--cfg', str(SWIN_T), '--amp-opt-level', 'O1')
    assert cfg.AMP_ENABLE is True


def test_output_flag_becomes_output_name_tag(tmp_path):
    root = str(tmp_path / 'runs')
    _, cfg = parse('--cfg', str(SWIN_T), '--output', root, '--tag', 'trial')
    assert cfg.OUTPUT == os.path.join(root, 'swin_tiny_patch4_window7_224', 'trial')
    _, cfg = parse('--cfg', str(SWIN_T), '--output', root)
    assert cfg.OUTPUT == os.path.join(root, 'swin_tiny_patch4_window7_224', 'default')


def test_flags_not_given_never_override_yaml(tmp_path):
    cfg_file = write(tmp_path / 'mine.yaml', """\
MODEL:
  NAME: mine
  PRETRAINED: yaml_weights.pth
  RESUME: yaml_ckpt.pth
DATA:
  BATCH_SIZE: 16
  DATA_PATH: /yaml/data
  ZIP_MODE: True
  CACHE_MODE: full
TRAIN:
  ACCUMULATION_STEPS: 2
  USE_CHECKPOINT: True
  OPTIMIZER:
    NAME: sgd
AMP_ENABLE: False
EVAL_MODE: True
THROUGHPUT_MODE: True
OUTPUT: myout
TAG: yamltag
""")
    _, cfg = parse('--cfg', str(cfg_file))
    assert cfg.DATA.CACHE_MODE == 'full'
    assert cfg.OUTPUT == os.path.join('myout', 'mine', 'yamltag')
    assert cfg.DATA.BATCH_SIZE == 16
    assert cfg.DATA.DATA_PATH == '/yaml/data'
    assert cfg.DATA.ZIP_MODE is True
    assert cfg.MODEL.PRETRAINED == 'yaml_weights.pth'
    assert cfg.MODEL.RESUME == 'yaml_ckpt.pth'
    assert cfg.TRAIN.ACCUMULATION_STEPS == 2
    assert cfg.TRAIN.USE_CHECKPOINT is True
    assert cfg.TRAIN.OPTIMIZER.NAME == 'sgd'
    assert cfg.AMP_ENABLE is False
    assert cfg.EVAL_MODE is True
    assert cfg.THROUGHPUT_MODE is True


def test_yaml_false_switches_stay_false_without_flags(tmp_path):
    cfg_file = write(tmp_path / 'off.yaml', 'DATA:\n  ZIP_MODE: False\nAMP_ENABLE: True\n')
    _, cfg = parse('--cfg', str(cfg_file))
    assert cfg.DATA.ZIP_MODE is False and cfg.AMP_ENABLE is True


@pytest.mark.parametrize('order', ['flags_last', 'flags_first'])
def test_flags_override_opts_for_the_same_key(order):
    opts = ['--opts', 'DATA.BATCH_SIZE', '8', 'TAG', 'from_opts', 'DATA.CACHE_MODE', 'no',
            'TRAIN.EPOCHS', '9']
    flags = ['--batch-size', '4', '--tag', 'from_flag', '--cache-mode', 'full']
    argv = ['--cfg', str(SWIN_T)] + (opts + flags if order == 'flags_last' else flags + opts)
    _, cfg = parse(*argv)
    assert cfg.DATA.BATCH_SIZE == 4
    assert cfg.TAG == 'from_flag'
    assert cfg.DATA.CACHE_MODE == 'full'
    assert cfg.TRAIN.EPOCHS == 9  # --opts still applies where no flag competes
    assert cfg.OUTPUT.endswith(os.path.join('swin_tiny_patch4_window7_224', 'from_flag'))


@pytest.mark.parametrize('flags', [['--local_rank', '3'], ['--local-rank', '3'], ['--local-rank=3'],
                                   ['--local_rank=3']])
def test_local_rank_flag_accepted(flags):
    args, cfg = parse('--cfg', str(SWIN_T), *flags)
    assert args.local_rank == 3
    assert cfg.is_frozen()


def test_local_rank_comes_from_environment(monkeypatch):
    monkeypatch.setenv('LOCAL_RANK', '2')
    assert load(SWIN_T).LOCAL_RANK == 2
    monkeypatch.delenv('LOCAL_RANK')
    assert load(SWIN_T).LOCAL_RANK == 0


def test_minimal_namespace_is_enough():
    """get_config(args) needs only `cfg`, so other tools can call it."""
    cfg = config.get_config(argparse.Namespace(cfg=str(SWIN_T)))
    assert cfg.DATA.BATCH_SIZE == 128 and cfg.AMP_ENABLE is True


# ----------------------------------------------------------------------------- 6. validation errors

YAML_ERRORS = [
    ('unknown_nested_key', 'MODEL:\n  SWIN:\n    DEPTH: [2, 2, 2, 2]\n',
     ['unknown', 'MODEL.SWIN.DEPTH', "did you mean 'MODEL.SWIN.DEPTHS'"]),
    ('unknown_top_key', 'TRIAN:\n  EPOCHS: 3\n', ['unknown', 'TRIAN', "did you mean 'TRAIN'"]),
    ('img_size_str', 'DATA:\n  IMG_SIZE: abc\n', ['DATA.IMG_SIZE', 'expects', 'abc']),
    ('img_size_bool', 'DATA:\n  IMG_SIZE: true\n', ['DATA.IMG_SIZE', 'expects']),
    ('img_size_fraction', 'DATA:\n  IMG_SIZE: 224.5\n', ['DATA.IMG_SIZE', 'expects']),
    ('depths_str', 'MODEL:\n  SWIN:\n    DEPTHS: [a, b]\n', ['MODEL.SWIN.DEPTHS', 'expects']),
    ('depths_scalar', 'MODEL:\n  SWIN:\n    DEPTHS: 2\n', ['MODEL.SWIN.DEPTHS', 'expects']),
    ('section_as_value', 'DATA: 5\n', ['DATA', 'section']),
    ('value_as_section', 'TAG:\n  X: 1\n', ['TAG', 'section']),
    ('img_size_zero', 'DATA:\n  IMG_SIZE: 0\n', ['DATA.IMG_SIZE', 'positive']),
    ('img_size_negative', 'DATA:\n  IMG_SIZE: -224\n', ['DATA.IMG_SIZE', 'positive']),
    ('patch_size_zero', 'MODEL:\n  SWIN:\n    PATCH_SIZE: 0\n', ['MODEL.SWIN.PATCH_SIZE', 'positive']),
    ('window_size_zero', 'MODEL:\n  SWIN:\n    WINDOW_SIZE: 0\n', ['MODEL.SWIN.WINDOW_SIZE', 'positive']),
    ('batch_size_zero', 'DATA:\n  BATCH_SIZE: 0\n', ['DATA.BATCH_SIZE', 'positive']),
    ('epochs_zero', 'TRAIN:\n  EPOCHS: 0\n', ['TRAIN.EPOCHS', 'positive']),
    ('drop_rate_one', 'MODEL:\n  DROP_RATE: 1.0\n', ['MODEL.DROP_RATE', '[0, 1)']),
    ('drop_rate_negative', 'MODEL:\n  DROP_RATE: -0.1\n', ['MODEL.DROP_RATE', '[0, 1)']),
    ('drop_path_one', 'MODEL:\n  DROP_PATH_RATE: 1.0\n', ['MODEL.DROP_PATH_RATE', '[0, 1)']),
    ('drop_path_negative', 'MODEL:\n  DROP_PATH_RATE: -0.1\n', ['MODEL.DROP_PATH_RATE', '[0, 1)']),
    ('depths_heads_mismatch', 'MODEL:\n  SWIN:\n    DEPTHS: [2, 2, 6]\n    NUM_HEADS: [3, 6, 12, 24]\n',
     ['MODEL.SWIN.DEPTHS', 'MODEL.SWIN.NUM_HEADS', 'stages']),
    ('heads_not_dividing', 'MODEL:\n  SWIN:\n    NUM_HEADS: [5, 6, 12, 24]\n',
     ['MODEL.SWIN.NUM_HEADS[0]', 'divide']),
    ('optimizer_near_miss', 'TRAIN:\n  OPTIMIZER:\n    NAME: adamww\n',
     ['TRAIN.OPTIMIZER.NAME', 'adamww', "did you mean 'adamw'"]),
    ('optimizer_unknown', 'TRAIN:\n  OPTIMIZER:\n    NAME: lion\n', ['TRAIN.OPTIMIZER.NAME', 'lion', 'not one of']),
    ('scheduler_near_miss', 'TRAIN:\n  LR_SCHEDULER:\n    NAME: cosin\n',
     ['TRAIN.LR_SCHEDULER.NAME', "did you mean 'cosine'"]),
    ('scheduler_unknown', 'TRAIN:\n  LR_SCHEDULER:\n    NAME: plateau\n',
     ['TRAIN.LR_SCHEDULER.NAME', 'plateau', 'not one of']),
    ('cache_mode_unknown', 'DATA:\n  CACHE_MODE: some\n', ['DATA.CACHE_MODE', 'not one of']),
    ('unparseable', 'DATA:\n  IMG_SIZE: [224\n', ['cannot parse YAML', 'bad.yaml', 'line']),
    ('bad_indentation', 'DATA:\n  IMG_SIZE: 224\n BATCH_SIZE: 3\n', ['cannot parse YAML', 'line 3']),
    ('not_a_mapping', '- a\n- b\n', ['mapping']),
]


@pytest.mark.parametrize('text,words', [c[1:] for c in YAML_ERRORS], ids=[c[0] for c in YAML_ERRORS])
def test_yaml_mistakes_are_config_errors(tmp_path, text, words):
    bad = write(tmp_path / 'bad.yaml', text)
    expect_error(lambda: load(bad), *words)
    # the same mistake reached through the command line is the same one-line ConfigError
    expect_error(lambda: parse('--cfg', str(bad)), *words)


def test_unknown_key_in_base_file_names_that_file(tmp_path):
    write(tmp_path / 'base.yaml', 'TRAIN:\n  EPOHCS: 3\n')
    child = write(tmp_path / 'sub' / 'child.yaml', "BASE: ['../base.yaml']\n")
    expect_error(lambda: load(child), 'base.yaml', 'TRAIN.EPOHCS', "'TRAIN.EPOCHS'")


def test_missing_cfg_file(tmp_path):
    missing = str(tmp_path / 'nope.yaml')
    expect_error(lambda: load(missing), 'nope.yaml', 'does not exist')
    expect_error(lambda: parse('--cfg', missing), 'nope.yaml', 'does not exist')


def test_cfg_is_required():
    expect_error(lambda: parse(), '--cfg')
    expect_error(lambda: config.get_config(argparse.Namespace(cfg='')), '--cfg')


@pytest.mark.parametrize('flag,suggestion', [
    ('--bach-size', '--batch-size'),
    ('--data_path', '--data-path'),
    ('--evall', '--eval'),
])
def test_unknown_flag_suggests_closest(flag, suggestion):
    message = expect_error(lambda: parse('--cfg', str(SWIN_T), flag, '8'), flag, 'unknown')
    assert f"'{suggestion}'" in message


def test_stray_positional_is_an_error():
    expect_error(lambda: parse('--cfg', str(SWIN_T), 'extra'), 'extra', 'unknown')


@pytest.mark.parametrize('flags,words', [
    (['--batch-size', 'abc'], ['--batch-size', 'abc']),
    (['--batch-size', '1.5'], ['--batch-size', '1.5']),
    (['--accumulation-steps', 'two'], ['--accumulation-steps', 'two']),
    (['--cache-mode', 'some'], ['--cache-mode', 'some']),
    (['--amp-opt-level', 'O4'], ['--amp-opt-level', 'O4']),
    (['--batch-size'], ['--batch-size']),
])
def test_bad_flag_values(flags, words):
    expect_error(lambda: parse('--cfg', str(SWIN_T), *flags), *words)


@pytest.mark.parametrize('flags,words', [
    (['--batch-size', '0'], ['DATA.BATCH_SIZE', 'positive']),
    (['--accumulation-steps', '0'], ['TRAIN.ACCUMULATION_STEPS', '>= 1']),
    (['--optim', 'adamww'], ['TRAIN.OPTIMIZER.NAME', "did you mean 'adamw'"]),
])
def test_flag_values_are_validated(flags, words):
    expect_error(lambda: parse('--cfg', str(SWIN_T), *flags), *words)


def test_main_turns_config_error_into_exit_code_2(capsys):
    assert main.main(['--cfg', str(SWIN_T), '--bach-size', '8']) == 2
    captured = capsys.readouterr()
    assert captured.out == ''
    assert captured.err == "error: unknown argument '--bach-size'; did you mean '--batch-size'?\n"


# ----------------------------------------------------------------------------- 7. user-facing CLI


# --------------------------------------------------------------------------- regressions

@pytest.mark.parametrize('opts,key,expected', [
    (['TAG', '1e-3'], 'TAG', '1e-3'),            # text keys keep the user's spelling
    (['MODEL.NAME', '0x10'], 'MODEL.NAME', '0x10'),
])
def test_text_values_are_not_rewritten(tmp_path, opts, key, expected):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('MODEL:\n  TYPE: swin\n')
    node = config.get_config(argparse.Namespace(cfg=str(cfg), opts=opts))
    for part in key.split('.'):
        node = node[part]
    assert node == expected


@pytest.mark.parametrize('opts,word', [
    (['TRAIN.CLIP_GRAD', '-1'], 'CLIP_GRAD'),
    (['TRAIN.BASE_LR', '-0.1'], 'BASE_LR'),
    (['TRAIN.BASE_LR', 'float("nan")'], 'BASE_LR'),
    (['TRAIN.WEIGHT_DECAY', '-1'], 'WEIGHT_DECAY'),
    (['TRAIN.MIN_LR', '-1.0'], 'MIN_LR'),
    (['MODEL.NAME', ''], 'MODEL.NAME'),
])
def test_negative_rates_and_empty_names_are_rejected(tmp_path, opts, word):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('MODEL:\n  TYPE: swin\n')
    with pytest.raises(ConfigError, match=word):
        config.get_config(argparse.Namespace(cfg=str(cfg), opts=opts))


def test_negative_exponent_value_gets_a_useful_message(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('MODEL:\n  TYPE: swin\n')
    with pytest.raises(ConfigError, match='negative number'):
        main.parse_option(['--cfg', str(cfg), '--opts', 'TRAIN.BASE_LR', '-1e-3'])

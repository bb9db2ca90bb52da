"""--pretrained: official, bare, our own and timm-format files, fitted to another window,
image size and class count, with the 22k-to-1k style class map; everything else an error."""
import argparse
import datetime
import logging

import pytest
import timm
import torch

from checkpoints.reading import load_pretrained
from models import weights
from models.adapt import is_timm_layout, resize_bias_table
from models.swin_transformer import SwinTransformer
from utils import CheckpointError

ARCH = dict(patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], drop_path_rate=0.0)


def _model(img_size=32, window_size=4, num_classes=5, **kw):
    return SwinTransformer(img_size=img_size, window_size=window_size, num_classes=num_classes,
                           **{**ARCH, **kw}).eval()


def _save(tmp_path, obj, name='weights.pth'):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO, logger='test-pretrained')
    return logging.getLogger('test-pretrained')


def _logits(model, size=32, seed=1):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize('wrap', ['official', 'bare', 'ddp_prefix', 'ours', 'timm_train'])
def test_every_container_format_loads_and_gives_equal_logits(tmp_path, log, wrap):
    source = _model()
    state = source.state_dict()
    obj = {'official': {'model': state}, 'bare': state,
           'ddp_prefix': {'model': {'module.' + k: v for k, v in state.items()}},
           'ours': {'model': state, 'optimizer': {}, 'epoch': 3, 'config': 'MODEL: {}'},
           'timm_train': {'state_dict': state, 'epoch': 3}}[wrap]
    target = _model()
    report = load_pretrained(target, _save(tmp_path, obj), log)
    assert report.head == 'kept' and not report.resized and report.source_format == 'official'
    torch.testing.assert_close(_logits(target), _logits(source), rtol=0, atol=0)


def test_files_are_read_with_weights_only(tmp_path, log):
    path = _save(tmp_path, {'model': _model().state_dict(), 'saved_at': datetime.datetime(2026, 1, 1)})
    with pytest.raises(CheckpointError, match='cannot be read|weights_only|unsupported'):
        load_pretrained(_model(), path, log)


def test_timm_train_checkpoint_with_its_arguments_loads(tmp_path, log):
    """timm's train.py saves an argparse.Namespace beside `state_dict`: plain values, allowed."""
    source = _model()
    path = _save(tmp_path, {'state_dict': source.state_dict(), 'args': argparse.Namespace(lr=1.0, model='swin')})
    target = _model()
    load_pretrained(target, path, log)
    torch.testing.assert_close(_logits(target), _logits(source), rtol=0, atol=0)


def test_window_and_image_size_change_resizes_tables_and_keeps_the_zero_offset(tmp_path, log, caplog):
    """A 32 px / window 4 file in a 48 px / window 6 model: every bias table goes from 7x7 to
    11x11 offsets and the absolute position embedding from 16x16 to 24x24 patches. Bicubic
    resampling with the grids' centres aligned keeps each head's zero-offset bias exactly."""
    source = _model(ape=True)
    target = _model(img_size=48, window_size=6, ape=True)
    report = load_pretrained(target, _save(tmp_path, {'model': source.state_dict()}), log)
    tables = [k for k in source.state_dict() if k.endswith('relative_position_bias_table')]
    assert len(report.resized) == len(tables) + 1
    assert any(r.startswith('absolute_pos_embed: 16x16 -> 24x24') for r in report.resized)
    for key in tables:
        old, new = source.state_dict()[key], target.state_dict()[key]
        assert new.shape == (11 * 11, old.shape[1])
        torch.testing.assert_close(new[(11 * 11) // 2], old[(7 * 7) // 2])  # offset (0, 0)
        torch.testing.assert_close(new, resize_bias_table(old, 11))
    assert 'window 4 -> 6' in caplog.text and 'resized absolute_pos_embed' in caplog.text
    assert report.head == 'kept' and _logits(target, 48).isfinite().all()


def test_resizing_to_the_same_size_changes_nothing():
    table = torch.randn(49, 3)
    torch.testing.assert_close(resize_bias_table(table, 7), table)


def test_other_class_count_reinitializes_the_head_and_says_so(tmp_path, log, caplog):
    source = _model(num_classes=7)
    target = _model(num_classes=3)
    report = load_pretrained(target, _save(tmp_path, {'model': source.state_dict()}), log)
    assert report.head == 'reinitialized'
    assert torch.count_nonzero(target.head.weight) == 0 and torch.count_nonzero(target.head.bias) == 0
    torch.testing.assert_close(target.layers[1].blocks[1].mlp.fc2.weight, source.layers[1].blocks[1].mlp.fc2.weight)
    assert 'classifier re-initialized' in caplog.text and 'file has 7 classes, the model 3' in caplog.text
    assert 'MODEL.PRETRAINED_CLASS_MAP' in caplog.text  # a larger head could be mapped instead


def test_class_map_selects_the_listed_rows(tmp_path, log):
    """As the official 22k-to-1k map: line i names the file's class for the model's class i."""
    source = _model(num_classes=9)
    mapping = [4, 0, 8, 4]
    class_map = tmp_path / 'map.txt'
    class_map.write_text('\n'.join(map(str, mapping)) + '\n')
    target = _model(num_classes=4)
    report = load_pretrained(target, _save(tmp_path, {'model': source.state_dict()}), log, str(class_map))
    assert report.head == 'mapped'
    torch.testing.assert_close(_logits(target), _logits(source)[:, mapping], rtol=0, atol=1e-6)


@pytest.mark.parametrize('lines,words', [
    (['1', '2'], 'lists 2 classes but the model has 4'),
    (['1', '2', '3', '9'], 'index 9, outside the 9 classes'),
    (['1', 'two', '3', '4'], 'one integer per line'),
    (None, 'cannot be read'),
])
def test_bad_class_maps_are_one_line(tmp_path, log, lines, words):
    class_map = tmp_path / 'map.txt'
    if lines is not None:
        class_map.write_text('\n'.join(lines))
    path = _save(tmp_path, {'model': _model(num_classes=9).state_dict()})
    with pytest.raises(CheckpointError, match=words):
        load_pretrained(_model(num_classes=4), path, log, str(class_map))


def test_class_map_for_a_file_without_classifier_is_an_error(tmp_path, log):
    class_map = tmp_path / 'map.txt'
    class_map.write_text('0\n1\n2\n')
    path = _save(tmp_path, {'model': _model(num_classes=0).state_dict()})
    with pytest.raises(CheckpointError, match='no classifier to select classes from'):
        load_pretrained(_model(num_classes=3), path, log, str(class_map))


def test_half_a_classifier_is_an_error(tmp_path, log):
    state = _model().state_dict()
    del state['head.bias']
    with pytest.raises(CheckpointError, match='has head.weight but not head.bias'):
        load_pretrained(_model(), _save(tmp_path, {'model': state}), log)


def test_evaluation_refuses_an_untrained_head(tmp_path, log):
    path = _save(tmp_path, {'model': _model(num_classes=7).state_dict()})
    with pytest.raises(CheckpointError, match='untrained head'):
        load_pretrained(_model(num_classes=3), path, log, allow_head_reinit=False)


def test_headless_model_says_the_head_is_not_used(tmp_path, log, caplog):
    path = _save(tmp_path, {'model': _model(num_classes=7).state_dict()})
    assert load_pretrained(_model(num_classes=0), path, log).head == 'dropped'
    assert 'is not used' in caplog.text


@pytest.mark.parametrize('change,words', [
    (lambda s: s.pop('layers.1.blocks.0.attn.qkv.weight'), 'missing layers.1.blocks.0.attn.qkv.weight'),
    (lambda s: s.update({'layers.2.blocks.0.norm1.weight': torch.ones(64)}), 'unexpected layers.2.blocks.0'),
    (lambda s: s.update({'norm.weight': torch.ones(48)}), r'norm.weight \(48,\) vs model \(32,\)'),
    (lambda s: s.update({'layers.0.blocks.0.attn.relative_position_bias_table': torch.ones(49, 5)}),
     r'relative_position_bias_table \(49, 5\) vs model \(49, 2\)'),
])
def test_anything_else_that_does_not_fit_is_an_error_naming_keys_and_shapes(tmp_path, log, change, words):
    state = _model().state_dict()
    change(state)
    with pytest.raises(CheckpointError, match=words):
        load_pretrained(_model(), _save(tmp_path, {'model': state}), log)


def test_another_feature_width_in_the_head_is_an_error(tmp_path, log):
    state = _model().state_dict()
    state['head.weight'] = torch.ones(5, 48)
    with pytest.raises(CheckpointError, match='head'):
        load_pretrained(_model(), _save(tmp_path, {'model': state}), log)


def _timm_swin(**kw):
    args = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), img_size=64, window_size=4, num_classes=5,
                drop_path_rate=0.0)
    return timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, **{**args, **kw}).eval()


def test_timm_state_dict_converts_and_gives_equal_logits(tmp_path, log):
    theirs = _timm_swin()
    state = theirs.state_dict()
    assert is_timm_layout(state) and 'layers.1.downsample.reduction.weight' in state
    ours = SwinTransformer(img_size=64, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                           window_size=4, num_classes=5, drop_path_rate=0.0).eval()
    report = load_pretrained(ours, _save(tmp_path, state), log)
    assert report.source_format == 'timm' and report.head == 'kept' and not report.resized
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_timm_state_dict_into_another_window_and_class_count(tmp_path, log):
    state = _timm_swin().state_dict()
    ours = SwinTransformer(img_size=96, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                           window_size=6, num_classes=2, drop_path_rate=0.0).eval()
    report = load_pretrained(ours, _save(tmp_path, {'state_dict': state}), log)
    assert report.source_format == 'timm' and report.head == 'reinitialized' and len(report.resized) == 4
    torch.testing.assert_close(ours.layers[0].downsample.reduction.weight,
                               state['layers.1.downsample.reduction.weight'])


def test_official_layout_is_not_mistaken_for_timm():
    assert not is_timm_layout(_model().state_dict())
    assert not is_timm_layout(SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=[2], num_heads=[2],
                                              window_size=4, num_classes=0).state_dict())


# --------------------------------------------------------------------------- models.weights

def test_derived_buffer_names_are_those_the_models_hold():
    from models.swin_transformer_v2 import SwinTransformerV2
    held = {name.rsplit('.', 1)[-1] for cls in (SwinTransformer, SwinTransformerV2)
            for name, _ in cls(img_size=32, window_size=4, **ARCH).named_buffers()}
    assert weights.DERIVED_BUFFERS == held == {'relative_position_index', 'attn_mask', 'relative_coords_table'}
    assert weights.is_derived('layers.0.blocks.1.attn_mask') and weights.is_derived('relative_coords_table')
    assert not weights.is_derived('layers.0.blocks.1.attn.relative_position_bias_table')


def test_load_model_weights_is_strict_with_one_line_and_ignores_derived_buffers():
    state = _model().state_dict()
    state['layers.0.blocks.1.attn_mask'] = torch.zeros(3, 16, 16)  # made at another resolution
    del state['layers.0.blocks.0.attn.relative_position_index']     # or not carried at all
    target = _model()
    weights.load_model_weights(target, state, 'file.pth')
    assert torch.equal(target.head.weight, state['head.weight'])
    bad = dict(state, **{'norm.weight': torch.ones(48), 'extra.bias': torch.ones(1)})
    del bad['head.bias']
    with pytest.raises(CheckpointError) as err:
        weights.load_model_weights(_model(), bad, 'file.pth')
    assert str(err.value) == ("'file.pth' does not fit this model (another architecture or config?): missing "
                              "head.bias; unexpected extra.bias; shape mismatch norm.weight (48,) vs model (32,)")


def test_mismatch_lists_the_first_names_and_check_fits_takes_shapes():
    assert weights.mismatch_error('f', [], [], []) is None
    error = weights.mismatch_error('f', ['a', 'b', 'c', 'd', 'e'], [], ['x (1,) vs model (2,)', 'y', 'z'])
    assert str(error).endswith('missing a, b, c and 2 more; shape mismatch x (1,) vs model (2,), y and 1 more')
    own = {'w': (2, 3), 'blk.attn_mask': (4, 9, 9)}
    weights.check_fits(own, {'w': (2, 3), 'blk.attn_mask': (1, 9, 9)}, 'f')
    weights.check_fits(own, {'w': None}, 'f')  # an entry that is not a tensor: no shape to compare
    with pytest.raises(CheckpointError, match=r'shape mismatch w \(3, 2\) vs model \(2, 3\)'):
        weights.check_fits(own, {'w': (3, 2)}, 'f')

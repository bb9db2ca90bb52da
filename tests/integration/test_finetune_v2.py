"""Swin V2 fine-tuning through main.py: another window, a frozen stage, layer decay."""
import math
import re

import pytest
import torch

import main
from helpers.models import randomize
from helpers.runs import read_metrics
from models.swin_transformer_v2 import SwinTransformerV2

# the training tests' tiny config, as Swin V2
TINY_V2_OPTS = ['MODEL.TYPE', 'swinv2', 'MODEL.NAME', 'tinyv2', 'MODEL.DROP_PATH_RATE', '0.1', 'TRAIN.EPOCHS', '1',
                'MODEL.SWINV2.EMBED_DIM', '16', 'MODEL.SWINV2.DEPTHS', '[2, 2]', 'MODEL.SWINV2.NUM_HEADS', '[2, 4]',
                'MODEL.SWINV2.WINDOW_SIZE', '4', 'MODEL.SWINV2.PRETRAINED_WINDOW_SIZES', '[2, 2]']


def test_finetune_through_main_with_frozen_stage_and_layer_decay(cfg_file, tmp_path):
    """A window-2 file into the window-4 model (pretrained windows [2, 2]), stage 0 frozen,
    layer decay 0.9 by block (ids 0..5; the frozen ids 0-2 have no trainable group)."""
    source = randomize(SwinTransformerV2(img_size=32, window_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                         num_classes=3))
    path = tmp_path / 'w2.pth'
    torch.save({'model': source.state_dict()}, path)
    assert main.main(['--cfg', cfg_file, '--output', str(tmp_path / 'out'), '--pretrained', str(path),
                      '--opts', *TINY_V2_OPTS, 'TRAIN.FREEZE_STAGES', '1', 'TRAIN.LAYER_DECAY', '0.9']) == 0
    run_dir = tmp_path / 'out' / 'tinyv2' / 'default'
    log = (run_dir / 'log_rank0.txt').read_text()
    assert 'window 2 -> 4: coordinate tables rebuilt, bias MLP carried over (pretrained window sizes [2, 2])' in log
    assert 'frozen (not trained, kept in eval mode)' in log
    base = 0.05 * 8 / 512
    peaks = {int(m.group(1)): float(m.group(2))
             for m in re.finditer(r'param group: layer_(\d)_(?:no_)?decay: .* peak lr ([0-9.e-]+)', log)}
    assert sorted(peaks) == [3, 4, 5]
    for layer_id, lr in peaks.items():
        assert lr == pytest.approx(base * 0.9 ** (5 - layer_id), rel=1e-3)
    after = torch.load(run_dir / 'ckpt_epoch_0.pth', map_location='cpu', weights_only=True)['model']
    for key, before in source.state_dict().items():
        if key.endswith(('relative_position_index', 'attn_mask', 'relative_coords_table')):
            continue
        assert torch.equal(after[key], before) == key.startswith(('patch_embed.', 'layers.0.')), key
    (metrics,) = read_metrics(run_dir)
    assert math.isfinite(metrics['train_loss']) and metrics['epoch'] == 0

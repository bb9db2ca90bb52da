"""Fine-tuning through main.py: --pretrained into one's own folder, freezing, layer-wise LR
decay shown per group, and model EMA (arithmetic, validation, checkpoints, exact resume,
--eval of the EMA weights)."""
import logging
import re
import shutil

import pytest
import torch
from timm.utils import ModelEmaV3

import main
from engine import trainer
from helpers.runs import N_VAL, read_metrics
from models.swin_transformer import SwinTransformer

TINY_ARCH = dict(img_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], drop_path_rate=0.0)


def _run(cfg, out, *args, opts=()):
    return main.main(['--cfg', cfg, '--output', str(out), *args] + (['--opts', *opts] if opts else []))


def _pretrained_file(tmp_path, window_size=4, num_classes=5, seed=3):
    torch.manual_seed(seed)
    model = SwinTransformer(window_size=window_size, num_classes=num_classes, **TINY_ARCH)
    path = tmp_path / f'pretrained_w{window_size}_c{num_classes}.pth'
    torch.save({'model': model.state_dict()}, path)
    return str(path), model.state_dict()


def _final(run_dir, epoch):
    return torch.load(run_dir / f'ckpt_epoch_{epoch}.pth', map_location='cpu', weights_only=True)


def test_finetune_to_own_folder_needs_only_pretrained_and_data_path(cfg_file, data_root, tmp_path):
    """A 5-class, window-2 file into the 3-class folder's window-4 model: tables resized, head
    re-initialized, everything else loaded, and training runs."""
    path, source = _pretrained_file(tmp_path, window_size=2)
    assert _run(cfg_file, tmp_path / 'out', '--pretrained', path, '--data-path', data_root,
                opts=['TRAIN.EPOCHS', '1']) == 0
    run_dir = tmp_path / 'out' / 'tiny' / 'default'
    log = (run_dir / 'log_rank0.txt').read_text()
    assert 'classifier re-initialized' in log and 'file has 5 classes, the model 3' in log
    assert len(re.findall(r'pretrained: resized layers\.\d\.blocks\.\d\.attn\.relative_position_bias_table: '
                          r'3x3 -> 7x7', log)) == 4
    assert 'classifier reinitialized' in log and 'tensors loaded from official-format weights' in log
    assert read_metrics(run_dir)[0]['n_images'] == 3 * N_VAL


@pytest.mark.parametrize('opts,frozen_prefixes', [
    (['TRAIN.FREEZE_STAGES', '1'], ('patch_embed.', 'layers.0.')),
    (['TRAIN.LINEAR_PROBE', 'True'], ('patch_embed.', 'layers.', 'norm.')),
])
def test_frozen_parts_do_not_change_and_the_rest_trains(cfg_file, tmp_path, opts, frozen_prefixes):
    path, source = _pretrained_file(tmp_path, num_classes=3)
    assert _run(cfg_file, tmp_path / 'out', '--pretrained', path,
                opts=['TRAIN.EPOCHS', '1', 'MODEL.DROP_PATH_RATE', '0.2', *opts]) == 0
    run_dir = tmp_path / 'out' / 'tiny' / 'default'
    after = _final(run_dir, 0)['model']
    for key, before in source.items():
        if key.endswith(('relative_position_index', 'attn_mask')):
            continue
        same = torch.equal(after[key], before)
        assert same == key.startswith(frozen_prefixes), key
    assert 'frozen (not trained, kept in eval mode)' in (run_dir / 'log_rank0.txt').read_text()


def test_frozen_stages_stay_in_eval_mode_without_stochastic_depth():
    model = SwinTransformer(window_size=4, num_classes=3, **{**TINY_ARCH, 'drop_path_rate': 0.5})
    assert model.freeze(stages=1) == ['patch_embed', 'pos_drop', 'layers.0']
    model.train()
    assert not model.layers[0].training and model.layers[1].training and model.head.training
    assert not any(p.requires_grad for p in model.layers[0].parameters())
    assert all(p.requires_grad for p in model.layers[1].parameters())
    x = torch.randn(2, 16 * 4, 16)
    block = model.layers[0].blocks[1]
    torch.testing.assert_close(block(x), block(x))  # no random drop path in a frozen stage


def test_freeze_stages_beyond_the_model_is_a_config_error(cfg_file, tmp_path, capsys):
    assert _run(cfg_file, tmp_path / 'out', opts=['TRAIN.FREEZE_STAGES', '3']) == 2
    assert 'TRAIN.FREEZE_STAGES must be in [0, 2]' in capsys.readouterr().err


def test_layer_decay_lr_per_group_in_the_log_and_in_training(cfg_file, tmp_path):
    """TRAIN.LAYER_DECAY 0.5 on 2 + 2 blocks: ids 0 (patch embedding) to 5 (head), peak LR
    BASE_LR x 0.5^(5 - id); the scheduler keeps every group at its share of the LR."""
    assert _run(cfg_file, tmp_path / 'out', opts=['TRAIN.EPOCHS', '1', 'TRAIN.LAYER_DECAY', '0.5']) == 0
    run_dir = tmp_path / 'out' / 'tiny' / 'default'
    log = (run_dir / 'log_rank0.txt').read_text()
    base = 0.05 * 8 / 512  # linear scaling of the config's BASE_LR
    peaks = {int(m.group(1)): float(m.group(2))
             for m in re.finditer(r'param group: layer_(\d)_decay: .* peak lr ([0-9.e-]+)', log)}
    assert sorted(peaks) == [0, 1, 2, 3, 4, 5]
    for layer_id, lr in peaks.items():
        assert lr == pytest.approx(base * 0.5 ** (5 - layer_id), rel=1e-3)
    final = _final(run_dir, 0)
    groups, sched = final['optimizer']['param_groups'], final['lr_scheduler']
    assert len({g['lr_scale'] for g in groups}) == 6
    for g in groups:  # each group on its own curve: peak BASE_LR x lr_scale, WARMUP_LR and MIN_LR unscaled
        peak, t, warmup = sched['base_lr'] * g['lr_scale'], sched['num_updates'], sched['warmup_steps']
        assert 0 < t < warmup  # the tiny run warms up for its whole epoch
        assert g['lr'] == pytest.approx(sched['warmup_lr'] + t * (peak - sched['warmup_lr']) / warmup, rel=1e-9)


def test_ema_update_arithmetic_follows_the_config():
    """First update copies the weights; then ema = d * ema + (1 - d) * model, with d the
    DECAY, or with WARMUP min(DECAY, 1 - (1 + t)^(-2/3)) at the t-th update after the first."""
    model = torch.nn.Linear(2, 1)
    for warmup in (False, True):
        config = _config({'TRAIN.EMA.ENABLE': True, 'TRAIN.EMA.DECAY': 0.9, 'TRAIN.EMA.WARMUP': warmup})
        ema = trainer.build_ema(config, model, logging.getLogger('t'))
        expected = None
        for step in range(1, 6):
            with torch.no_grad():
                model.weight.fill_(float(step * step))
            ema.update(model, step=step)
            if step == 1:
                expected = 1.0
            else:
                d = min(0.9, 1 - (1 + (step - 1)) ** (-2 / 3)) if warmup else 0.9
                expected = d * expected + (1 - d) * step * step
            assert ema.module.weight.flatten()[0].item() == pytest.approx(expected, rel=1e-6)


def _config(values):
    from config import default_config, set_key
    config = default_config()
    for key, value in values.items():
        set_key(config, key, value)
    config.freeze()
    return config


EMA_OPTS = ['TRAIN.EMA.ENABLE', 'True', 'TRAIN.EMA.DECAY', '0.8', 'SAVE_KEEP_LAST', '0']


def test_ema_is_updated_each_update_validated_saved_and_resumed_exactly(cfg_file, tmp_path, monkeypatch):
    steps = []
    original = ModelEmaV3.update
    monkeypatch.setattr(ModelEmaV3, 'update', lambda self, model, step=None: (steps.append(step),
                                                                                original(self, model, step)))
    assert _run(cfg_file, tmp_path / 'whole', opts=['TRAIN.EPOCHS', '3', *EMA_OPTS]) == 0
    assert steps == list(range(1, 3 * 6 + 1))  # the global update count, 6 updates per epoch
    whole = tmp_path / 'whole' / 'tiny' / 'default'
    lines = read_metrics(whole)
    assert all({'ema_acc1', 'ema_acc5', 'ema_val_loss', 'max_ema_acc1'} <= set(m) for m in lines)
    end = _final(whole, 2)
    assert set(end['model_ema']) == set(end['model'])
    assert not torch.equal(end['model_ema']['head.weight'], end['model']['head.weight'])
    assert end['max_ema_accuracy'] == max(m['ema_acc1'] for m in lines)
    assert 'Accuracy of the EMA model' in (whole / 'log_rank0.txt').read_text()

    resumed = tmp_path / 'resumed' / 'tiny' / 'default'
    resumed.mkdir(parents=True)
    shutil.copy(whole / 'ckpt_epoch_0.pth', resumed)
    assert _run(cfg_file, tmp_path / 'resumed', opts=['TRAIN.EPOCHS', '3', *EMA_OPTS]) == 0
    again = _final(resumed, 2)
    for key, value in end['model_ema'].items():
        assert torch.equal(value, again['model_ema'][key]), key
    assert [m['ema_acc1'] for m in read_metrics(resumed)] == [m['ema_acc1'] for m in lines[1:]]
    assert 'model EMA restored from' in (resumed / 'log_rank0.txt').read_text()

    # --eval scores the EMA weights beside the model's, with the numbers training reported
    assert _run(cfg_file, tmp_path / 'eval', '--eval', '--resume', str(whole / 'ckpt_epoch_2.pth')) == 0
    (scored,) = read_metrics(tmp_path / 'eval' / 'tiny' / 'default')
    assert scored['mode'] == 'eval'
    assert scored['acc1'] == lines[-1]['acc1'] and scored['ema_acc1'] == lines[-1]['ema_acc1']


def test_eval_of_a_pretrained_file_with_another_class_count_is_refused(cfg_file, tmp_path, capsys):
    path, _ = _pretrained_file(tmp_path, num_classes=5)
    assert _run(cfg_file, tmp_path / 'out', '--eval', '--pretrained', path) == 2
    err = capsys.readouterr().err
    assert 'untrained head' in err and 'Traceback' not in err



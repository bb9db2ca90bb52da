"""Swin-MLP (MODEL.TYPE swin_mlp) through main.py: trains, checkpoints with the official keys,
and `--eval` of that checkpoint scores what the run's last validation scored."""
from helpers.runs import read_metrics, read_weights, run_main

MLP = ['MODEL.TYPE', 'swin_mlp', 'MODEL.SWIN_MLP.EMBED_DIM', '16', 'MODEL.SWIN_MLP.DEPTHS', '[2, 2]',
       'MODEL.SWIN_MLP.NUM_HEADS', '[2, 4]', 'MODEL.SWIN_MLP.WINDOW_SIZE', '4', 'SAVE_KEEP_LAST', '0']


def test_swin_mlp_trains_and_evaluates_through_the_cli(cfg_file, tmp_path):
    assert run_main(cfg_file, tmp_path / 'train', '--opts', 'TRAIN.EPOCHS', '2', *MLP) == 0
    run_dir = tmp_path / 'train' / 'tiny' / 'default'
    metrics = read_metrics(run_dir)
    assert [m['epoch'] for m in metrics] == [0, 1] and metrics[-1]['n_images'] == 21
    weights = read_weights(run_dir / 'ckpt_epoch_1.pth')
    assert weights['layers.0.blocks.1.spatial_mlp.weight'].shape == (2 * 16, 16, 1)  # heads x window^2
    assert not any('attn' in key for key in weights)
    assert 'TYPE: swin_mlp' in (run_dir / 'config.yaml').read_text()
    assert run_main(cfg_file, tmp_path / 'eval', '--eval', '--resume', str(run_dir / 'ckpt_epoch_1.pth'),
                    '--opts', *MLP) == 0
    evaluation = read_metrics(tmp_path / 'eval' / 'tiny' / 'default')[-1]
    assert evaluation['mode'] == 'eval' and evaluation['n_images'] == 21
    assert evaluation['acc1'] == metrics[-1]['acc1']

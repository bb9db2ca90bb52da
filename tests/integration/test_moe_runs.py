"""Swin-MoE (MODEL.TYPE swin_moe) through main.py: one process holding every expert, and two
torchrun processes holding one expert each (tokens exchanged by all-to-all, the rest DDP):
training with the auxiliary loss, checkpoints holding all experts in one file, a resumed run
equal to the uninterrupted one bit for bit, and --eval scoring what the last validation did."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from helpers.runs import ROOT, free_port, one_line_error, read_metrics, run_main

sys.path.insert(0, os.path.join(ROOT, 'tools'))  # the tools import their sibling modules as a script does
import consolidate_checkpoint
import export_onnx
import predict

MOE = ['MODEL.TYPE', 'swin_moe', 'MODEL.SWIN_MOE.EMBED_DIM', '16', 'MODEL.SWIN_MOE.DEPTHS', '[2, 2]',
       'MODEL.SWIN_MOE.NUM_HEADS', '[2, 4]', 'MODEL.SWIN_MOE.WINDOW_SIZE', '4',
       'MODEL.SWIN_MOE.MOE_BLOCKS', '[[1], [1]]', 'MODEL.SWIN_MOE.TOP_VALUE', '2', 'SAVE_KEEP_LAST', '0',
       'MODEL.DROP_PATH_RATE', '0.1']
EXPERT = 'layers.0.blocks.1.mlp._moe_layer.experts.batched_fc1_w'


def _torchrun(cfg_file, out, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           '--master_port', str(free_port()), os.path.join(ROOT, 'main.py'),
                           '--cfg', cfg_file, '--output', str(out), *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(cwd))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_one_process_holds_every_expert_and_evaluates_its_checkpoint(cfg_file, data_root, tmp_path, capsys):
    experts = ['MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS', '2']
    assert run_main(cfg_file, tmp_path / 'train', '--opts', 'TRAIN.EPOCHS', '2', *MOE, *experts) == 0
    run_dir = tmp_path / 'train' / 'tiny' / 'default'
    metrics = read_metrics(run_dir)
    assert [m['epoch'] for m in metrics] == [0, 1] and metrics[-1]['n_images'] == 21
    weights = torch.load(run_dir / 'ckpt_epoch_1.pth', weights_only=True)['model']
    assert weights[EXPERT].shape == (2, 64, 16)
    assert run_main(cfg_file, tmp_path / 'eval', '--eval', '--resume', str(run_dir / 'ckpt_epoch_1.pth'),
                    '--opts', *MOE, *experts) == 0
    assert read_metrics(tmp_path / 'eval' / 'tiny' / 'default')[-1]['acc1'] == metrics[-1]['acc1']
    capsys.readouterr()
    assert export_onnx.main(['--checkpoint', str(run_dir / 'ckpt_epoch_1.pth'), '--output',
                             str(tmp_path / 'moe.onnx')]) == 2
    assert 'Swin-MoE' in one_line_error(capsys)
    image = sorted(Path(data_root).rglob('*.jpg'))[0]
    assert predict.main(['--checkpoint', str(run_dir / 'ckpt_epoch_1.pth'), str(image)]) == 0
    assert '1. class' in capsys.readouterr().out  # the top class, read from the logits of (logits, aux)
    # the same file in a model placing another number of experts: one line naming the misfit
    capsys.readouterr()
    assert run_main(cfg_file, tmp_path / 'other', '--eval', '--resume', str(run_dir / 'ckpt_epoch_1.pth'),
                    '--opts', *MOE) == 2
    assert 'batched_fc1_w' in one_line_error(capsys)


def test_experts_over_two_processes_checkpoint_resume_and_evaluate(cfg_file, tmp_path):
    first = tmp_path / 'first'
    _torchrun(cfg_file, first, '--opts', 'TRAIN.EPOCHS', '2', *MOE, cwd=tmp_path)
    run_dir = first / 'tiny' / 'default'
    end = torch.load(run_dir / 'ckpt_epoch_1.pth', weights_only=True)
    assert end['model'][EXPERT].shape == (2, 64, 16)  # both ranks' expert, in one file
    assert not torch.equal(end['model'][EXPERT][0], end['model'][EXPERT][1])
    moments = [v for s in end['optimizer']['state'].values() for v in s.values() if torch.is_tensor(v)]
    assert any(m.shape == (2, 64, 16) for m in moments)

    resumed = tmp_path / 'resumed' / 'tiny' / 'default'
    resumed.mkdir(parents=True)
    shutil.copy(run_dir / 'ckpt_epoch_0.pth', resumed)
    (resumed / 'metrics.jsonl').write_text((run_dir / 'metrics.jsonl').read_text())
    _torchrun(cfg_file, tmp_path / 'resumed', '--opts', 'TRAIN.EPOCHS', '2', *MOE, cwd=tmp_path)
    again = torch.load(resumed / 'ckpt_epoch_1.pth', weights_only=True)['model']
    assert all(torch.equal(value, again[key]) for key, value in end['model'].items())
    assert read_metrics(resumed)[-1]['train_loss'] == read_metrics(run_dir)[-1]['train_loss']

    _torchrun(cfg_file, tmp_path / 'eval', '--eval', '--resume', str(run_dir / 'ckpt_epoch_1.pth'), '--opts', *MOE,
              cwd=tmp_path)
    line = read_metrics(tmp_path / 'eval' / 'tiny' / 'default')[-1]
    assert line['n_images'] == 21 and line['acc1'] == read_metrics(run_dir)[-1]['acc1']


def test_official_per_rank_files_consolidate_into_one(cfg_file, tmp_path, capsys):
    """The official layout: PREFIX.rank{r} with each rank's experts, PREFIX.master with the
    rest; merged in rank order into one file that --eval reads like our own."""
    experts = ['MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS', '2']
    assert run_main(cfg_file, tmp_path / 'train', '--opts', 'TRAIN.EPOCHS', '1', *MOE, *experts) == 0
    run_dir = tmp_path / 'train' / 'tiny' / 'default'
    full = torch.load(run_dir / 'ckpt_epoch_0.pth', weights_only=True)['model']
    prefix = tmp_path / 'official' / 'ckpt_epoch_final.pth'
    prefix.parent.mkdir()
    dense = {k: v for k, v in full.items() if '._moe_layer.experts.' not in k}
    torch.save({'model': dense}, f'{prefix}.master')
    for rank in range(2):
        torch.save({'model': {k: v[rank:rank + 1] for k, v in full.items() if k not in dense}}, f'{prefix}.rank{rank}')
    out = tmp_path / 'one.pth'
    assert consolidate_checkpoint.main(['--checkpoint', str(prefix), '--output', str(out)]) == 0
    merged = torch.load(out, weights_only=True)['model']
    assert merged.keys() == full.keys() and all(torch.equal(v, merged[k]) for k, v in full.items())
    assert run_main(cfg_file, tmp_path / 'eval', '--eval', '--resume', str(out), '--opts', *MOE, *experts) == 0
    assert read_metrics(tmp_path / 'eval' / 'tiny' / 'default')[-1]['acc1'] == read_metrics(run_dir)[-1]['acc1']
    # a gap in the rank files is one line
    (tmp_path / 'official' / 'ckpt_epoch_final.pth.rank1').rename(tmp_path / 'official' / 'ckpt_epoch_final.pth.rank2')
    capsys.readouterr()
    assert consolidate_checkpoint.main(['--checkpoint', str(prefix), '--output', str(out)]) == 2
    assert 'rank2' in one_line_error(capsys)

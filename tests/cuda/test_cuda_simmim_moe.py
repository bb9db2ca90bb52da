"""SimMIM pre-training and Swin-MoE on the GPU: main.py runs in bf16 autocast (the default
precision of a GPU run) over the tiny generated JPEG set, and the MoE layer's all-to-all
dispatch over nccl in a group of one against the in-process dispatch."""
from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from PIL import Image

from helpers.runs import free_port, read_metrics, run_main
from models.moe_layer import AllToAllDispatch, LocalDispatch, MoELayer

AMP_BF16 = ('AMP_ENABLE', 'True', 'AMP_DTYPE', 'bf16')
MOE = ('MODEL.TYPE', 'swin_moe', 'MODEL.SWIN_MOE.EMBED_DIM', '16', 'MODEL.SWIN_MOE.DEPTHS', '[2, 2]',
       'MODEL.SWIN_MOE.NUM_HEADS', '[2, 4]', 'MODEL.SWIN_MOE.WINDOW_SIZE', '4',
       'MODEL.SWIN_MOE.MOE_BLOCKS', '[[1], [1]]', 'MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS', '2',
       'MODEL.SWIN_MOE.TOP_VALUE', '2')


def test_simmim_pretraining_in_bf16(cfg_file, tmp_path, device):
    assert run_main(cfg_file, tmp_path, '--simmim-pretrain', '--opts', 'TRAIN.EPOCHS', '2',
                    'DATA.MASK_PATCH_SIZE', '8', *AMP_BF16) == 0
    run_dir = tmp_path / 'tiny' / 'default'
    metrics = read_metrics(run_dir)
    assert all(math.isfinite(m['train_loss']) and math.isfinite(m['val_loss']) for m in metrics)
    with Image.open(run_dir / 'reconstruction_epoch001.png') as picture:
        assert picture.size == (3 * 128, 8 * 128)
    assert f'device {device.type}' in (run_dir / 'log_rank0.txt').read_text()


def test_swin_moe_trains_in_bf16(cfg_file, tmp_path, device):
    assert run_main(cfg_file, tmp_path, '--opts', 'TRAIN.EPOCHS', '1', *MOE, *AMP_BF16) == 0
    run_dir = tmp_path / 'tiny' / 'default'
    (line,) = read_metrics(run_dir)
    assert math.isfinite(line['train_loss']) and line['n_images'] == 21
    state = torch.load(run_dir / 'ckpt_epoch_0.pth', map_location='cpu', weights_only=True)['model']
    assert state['layers.0.blocks.1.mlp._moe_layer.experts.batched_fc1_w'].shape == (2, 64, 16)


def test_all_to_all_dispatch_in_a_group_of_one_equals_the_local_one(device):
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()))
    dist.init_process_group(backend, rank=0, world_size=1, **({'device_id': device} if backend == 'nccl' else {}))
    try:
        torch.manual_seed(0)
        local = MoELayer(16, 32, num_local_experts=2, top_k=2, capacity_factor=1.0, dispatch=LocalDispatch()).to(device)
        exchanged = MoELayer(16, 32, num_local_experts=2, top_k=2, capacity_factor=1.0,
                             dispatch=AllToAllDispatch()).to(device)
        exchanged.load_state_dict(local.state_dict())
        x = torch.randn(2, 24, 16, device=device, requires_grad=True)
        local.eval(), exchanged.eval()
        (a, aux_a), (b, aux_b) = local(x), exchanged(x)
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(aux_a, aux_b)
        grad_a, = torch.autograd.grad(a.square().sum(), x)
        grad_b, = torch.autograd.grad(b.square().sum(), x)
        assert torch.allclose(grad_a, grad_b, atol=1e-5)
    finally:
        dist.destroy_process_group()

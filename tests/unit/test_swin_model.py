"""Swin V1 model: window ops, a naive reference block, SDPA vs plain path, checkpointing,
published sizes, official state_dict keys and checkpoint loading, odd input sizes, timm parity."""
import argparse
import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import checkpoint_filter_fn
from torch.utils.flop_counter import FlopCounterMode

from config import get_config, model_arch
from helpers.models import rel_err, set_fused
from helpers.runs import ROOT
from models import build_model, logits_of
from models.swin_transformer import SwinTransformer, SwinTransformerBlock, window_partition, window_reverse

TINY = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24])
# A small model with every feature of the real ones (shifted and unshifted stages, one-window stage).
MICRO = dict(img_size=112, embed_dim=24, depths=[2, 2, 2, 2], num_heads=[1, 2, 3, 4], window_size=7,
             num_classes=10)


# --------------------------------------------------------------------------- window ops

def test_window_partition_reverse_round_trip():
    x = torch.randn(2, 14, 21, 5)
    windows = window_partition(x, 7)
    assert windows.shape == (2 * 2 * 3, 7, 7, 5)
    # windows are ordered batch-major, then row-major over the window grid
    assert torch.equal(windows[4], x[0, 7:14, 7:14])
    assert torch.equal(windows[6 + 2], x[1, 0:7, 14:21])
    assert torch.equal(window_reverse(windows, 7, 14, 21), x)


# --------------------------------------------------------------------------- naive reference

def naive_block(blk: SwinTransformerBlock, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Swin block written from the paper, one window and one head at a time: roll the
    normalized map, split it into windows, attend with the relative position bias, and
    forbid attention between tokens that the cyclic shift wrapped from opposite borders."""
    B, L, C = x.shape
    ws, s, nh = blk.window_size, (blk.shift_size if min(H, W) > blk.window_size else 0), blk.num_heads
    hd = C // nh
    n = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps).view(B, H, W, C)
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    n = F.pad(n, (0, 0, 0, Wp - W, 0, Hp - H))
    n = torch.roll(n, (-s, -s), (1, 2))
    table = blk.attn.relative_position_bias_table
    wq, wk, wv = blk.attn.qkv.weight.chunk(3)
    bq, bk, bv = blk.attn.qkv.bias.chunk(3)
    out = torch.zeros_like(n)
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing='ij')
    ys, xs = ys.flatten(), xs.flatten()
    for b in range(B):
        for r0 in range(0, Hp, ws):
            for c0 in range(0, Wp, ws):
                tokens = n[b, r0:r0 + ws, c0:c0 + ws].reshape(ws * ws, C)
                wrapped_r = (r0 + ys) >= Hp - s if s else torch.zeros_like(ys, dtype=torch.bool)
                wrapped_c = (c0 + xs) >= Wp - s if s else torch.zeros_like(xs, dtype=torch.bool)
                blocked = (wrapped_r[:, None] != wrapped_r[None, :]) | (wrapped_c[:, None] != wrapped_c[None, :])
                heads = []
                for h in range(nh):
                    sl = slice(h * hd, (h + 1) * hd)
                    q = tokens @ wq[sl].T + bq[sl]
                    k = tokens @ wk[sl].T + bk[sl]
                    v = tokens @ wv[sl].T + bv[sl]
                    logits = (q @ k.T) * blk.attn.scale
                    idx = (ys[:, None] - ys[None, :] + ws - 1) * (2 * ws - 1) + (xs[:, None] - xs[None, :] + ws - 1)
                    logits = logits + table[idx, h]
                    logits = logits.masked_fill(blocked, float('-inf'))
                    heads.append(logits.softmax(-1) @ v)
                y = torch.cat(heads, -1) @ blk.attn.proj.weight.T + blk.attn.proj.bias
                out[b, r0:r0 + ws, c0:c0 + ws] = y.view(ws, ws, C)
    out = torch.roll(out, (s, s), (1, 2))[:, :H, :W].reshape(B, H * W, C)
    x = x + out
    m = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
    return x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(m)))


def _random_block(dim=32, heads=4, res=(14, 14), ws=7, shift=3) -> SwinTransformerBlock:
    blk = SwinTransformerBlock(dim, res, heads, window_size=ws, shift_size=shift).double().eval()
    with torch.no_grad():  # a non-trivial bias table so a wrong index would show
        blk.attn.relative_position_bias_table.normal_(0, 0.5)
        blk.norm1.weight.normal_(1, 0.1)
    return blk


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('shift', [3, 0])
def test_block_matches_naive_reference(fused, shift):
    blk = _random_block(shift=shift)
    set_fused(blk, fused)
    x = torch.randn(2, 14 * 14, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(blk(x, 14, 14), naive_block(blk, x, 14, 14)) < 1e-10


@pytest.mark.parametrize('H,W', [(10, 13), (9, 23), (5, 6)])
def test_block_pads_odd_sizes_like_reference(H, W):
    """Maps that are not whole windows are padded after norm1 (official backbone rule);
    a map no larger than the window gets one window and no shift."""
    blk = _random_block()
    x = torch.randn(2, H * W, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(blk(x, H, W), naive_block(blk, x, H, W)) < 1e-10


def test_window_layout_is_built_once_per_resolution():
    blk = _random_block()
    x = torch.randn(1, 21 * 21, 32, dtype=torch.float64)
    with torch.no_grad():
        blk(x, 21, 21)
        first = blk.window_layout(21, 21, 3, x.device)
        blk(x, 21, 21)
    assert blk.window_layout(21, 21, 3, x.device) is first
    assert blk.window_layout(14, 14, 3, x.device)[2] is blk.attn_mask  # construction size: the buffer


# --------------------------------------------------------------------------- fused vs plain

def test_sdpa_path_equals_plain_path_fp32():
    model = SwinTransformer(**MICRO, drop_path_rate=0.0)
    x = torch.randn(2, 3, 112, 112)
    outs, grads = [], []
    for fused in (True, False):
        set_fused(model, fused)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert rel_err(outs[0], outs[1]) < 1e-5
    assert rel_err(grads[0], grads[1]) < 1e-5


def test_autocast_bf16_runs_and_stays_close():
    model = SwinTransformer(**MICRO).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert rel_err(low.float(), ref) < 5e-2


# --------------------------------------------------------------------------- checkpointing

def test_activation_checkpointing_gives_identical_gradients():
    model = SwinTransformer(**MICRO, drop_path_rate=0.3).train()
    x = torch.randn(2, 3, 112, 112)
    grads = []
    for use_ckpt in (False, True):
        model.set_grad_checkpointing(use_ckpt)
        model.zero_grad()
        torch.manual_seed(123)  # same drop-path draws in both runs
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)


def test_build_model_from_config_honours_use_checkpoint(tmp_path):
    args = argparse.Namespace(cfg=os.path.join(ROOT, 'configs', 'swin_tiny_patch4_window7_224.yaml'),
                              use_checkpoint=True, output=str(tmp_path))
    model = build_model(get_config(args))
    assert all(layer.use_checkpoint for layer in model.layers)
    assert sum(p.numel() for p in model.parameters()) == 28_288_354


# --------------------------------------------------------------------------- sizes

@pytest.mark.parametrize('kwargs,params_m,gflops', [
    (TINY, 28.29, 4.5),
    (dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24]), 49.61, 8.7),
    (dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]), 87.77, 15.4),
    (dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48]), 196.53, 34.5),
    (dict(img_size=384, window_size=12, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]), 87.90, 47.0),
    (dict(img_size=384, window_size=12, embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48]), 196.74, 103.9),
])
def test_published_parameter_counts_and_flops(kwargs, params_m, gflops):
    with torch.device('meta'):
        model = SwinTransformer(**kwargs)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params_m
    assert abs(model.flops() / 1e9 - gflops) < 0.05 * (1 + gflops / 20)


def test_flops_agree_with_counted_matmuls():
    """The analytic count (multiply-adds, as the official code reports) matches what torch
    counts in a real forward (2 FLOPs per multiply-add) within the norms it leaves out."""
    model = SwinTransformer(**TINY).eval()
    set_fused(model, False)  # torch's counter does not count the CPU flash-attention kernel
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(1, 3, 224, 224))
    counted_macs = counter.get_total_flops() / 2
    assert abs(counted_macs / model.flops() - 1) < 0.02


# --------------------------------------------------------------------------- state dict

def official_tiny_keys() -> set[str]:
    """The key set of the official swin_tiny_patch4_window7_224 checkpoint, from its naming rules."""
    keys = {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'patch_embed.norm.weight',
            'patch_embed.norm.bias', 'norm.weight', 'norm.bias', 'head.weight', 'head.bias'}
    for i, depth in enumerate([2, 2, 6, 2]):
        for j in range(depth):
            p = f'layers.{i}.blocks.{j}.'
            keys |= {p + k for k in ('norm1.weight', 'norm1.bias', 'attn.relative_position_bias_table',
                                     'attn.relative_position_index', 'attn.qkv.weight', 'attn.qkv.bias',
                                     'attn.proj.weight', 'attn.proj.bias', 'norm2.weight', 'norm2.bias',
                                     'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias')}
            if j % 2 == 1 and i < 3:  # the 7x7 last stage is one window: no shift, no mask
                keys.add(p + 'attn_mask')
        if i < 3:
            keys |= {f'layers.{i}.downsample.{k}' for k in ('reduction.weight', 'norm.weight', 'norm.bias')}
    return keys


def test_state_dict_has_the_official_keys_and_shapes():
    sd = SwinTransformer(**TINY).state_dict()
    assert set(sd) == official_tiny_keys()
    shapes = {
        'patch_embed.proj.weight': (96, 3, 4, 4),
        'layers.0.blocks.1.attn.relative_position_bias_table': (169, 3),
        'layers.0.blocks.1.attn.relative_position_index': (49, 49),
        'layers.0.blocks.1.attn_mask': (64, 49, 49),
        'layers.2.blocks.5.attn_mask': (4, 49, 49),
        'layers.0.blocks.0.attn.qkv.weight': (288, 96),
        'layers.0.downsample.reduction.weight': (192, 384),
        'layers.0.downsample.norm.weight': (384,),
        'layers.3.blocks.1.mlp.fc1.weight': (3072, 768),
        'norm.weight': (768,),
        'head.weight': (1000, 768),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_official_checkpoint_loads_strictly(tmp_path):
    src = SwinTransformer(**MICRO).eval()
    path = tmp_path / 'official.pth'
    torch.save({'model': src.state_dict(), 'epoch': 299}, path)
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    dst = SwinTransformer(**MICRO).eval()
    dst.load_state_dict(ckpt['model'], strict=True)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def test_buffers_in_files_are_optional_and_never_hide_a_missing_parameter():
    src = SwinTransformer(**MICRO).state_dict()
    # timm-style files carry no index/mask buffers: still a strict load
    no_buffers = {k: v for k, v in src.items() if 'relative_position_index' not in k and 'attn_mask' not in k}
    SwinTransformer(**MICRO).load_state_dict(no_buffers, strict=True)
    # a mask made at another resolution is accepted; the model keeps its own
    odd = dict(src)
    odd['layers.0.blocks.1.attn_mask'] = torch.zeros(3, 49, 49)
    model = SwinTransformer(**MICRO)
    expected = model.layers[0].blocks[1].attn_mask.clone()
    model.load_state_dict(odd, strict=True)
    assert torch.equal(model.layers[0].blocks[1].attn_mask, expected)
    # a real parameter missing is still an error, even with every buffer present
    missing = dict(src)
    del missing['layers.1.blocks.1.attn.qkv.weight']
    with pytest.raises(RuntimeError, match='layers.1.blocks.1.attn.qkv.weight'):
        SwinTransformer(**MICRO).load_state_dict(missing, strict=True)
    # and a key the model does not have is an error too
    extra = dict(src)
    extra['layers.0.blocks.0.attn.bogus'] = torch.zeros(1)
    with pytest.raises(RuntimeError, match='bogus'):
        SwinTransformer(**MICRO).load_state_dict(extra, strict=True)


# --------------------------------------------------------------------------- sizes at run time

def test_any_input_size_runs_and_stage_maps_have_padded_shapes():
    model = SwinTransformer(**TINY).eval()
    x = torch.randn(1, 3, 225, 301)
    with torch.no_grad():
        assert model(x).shape == (1, 1000)
        stages = model.forward_features(x, return_stages=True)
    assert [tuple(s.shape) for s in stages] == [(1, 96, 57, 76), (1, 192, 29, 38), (1, 384, 15, 19),
                                                 (1, 768, 8, 10)]


def test_small_input_and_absolute_position_embedding_resize():
    model = SwinTransformer(**MICRO, ape=True).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 80)).shape == (2, 10)
        assert model(torch.randn(1, 3, 130, 97)).shape == (1, 10)


def test_stage_no_larger_than_window_uses_one_window_and_no_shift():
    model = SwinTransformer(img_size=192, window_size=7, **TINY)
    last = model.layers[3].blocks[1]
    assert (last.window_size, last.shift_size, last.attn_mask) == (6, 0, None)
    assert model.layers[3].blocks[1].attn.relative_position_bias_table.shape == (11 * 11, 24)
    assert model.layers[2].blocks[1].shift_size == 3


def test_forward_features_pooled_and_stage_outputs_are_consistent():
    model = SwinTransformer(**MICRO).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        pooled = model.forward_features(x)
        last = model.forward_features(x, return_stages=True)[-1]
    expect = model.norm(last.flatten(2).transpose(1, 2)).mean(1)
    torch.testing.assert_close(pooled, expect, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- init and decay sets

def test_weight_decay_exclusions_and_official_init():
    model = SwinTransformer(**TINY, ape=True)
    assert model.no_weight_decay() == {'absolute_pos_embed'}
    assert model.no_weight_decay_keywords() == {'relative_position_bias_table'}
    fc = model.layers[2].blocks[0].mlp.fc1
    assert abs(fc.weight.std().item() - 0.02) < 0.002  # official trunc_normal_(std=.02), bounds +-2
    assert torch.count_nonzero(fc.bias) == 0
    assert torch.all(model.norm.weight == 1) and torch.count_nonzero(model.norm.bias) == 0
    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    assert abs(table.std().item() - 0.02) < 0.005


# --------------------------------------------------------------------------- timm parity

def test_logits_match_timm_on_the_same_weights():
    ours = SwinTransformer(**TINY).eval()
    theirs = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False).eval()
    theirs.load_state_dict(checkpoint_filter_fn(ours.state_dict(), theirs), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(ours(x), theirs(x)) < 1e-5


def _shipped_configs() -> list[str]:
    """Every config file once: the official folders, the demo ones and the flat files that
    are not links into the folders."""
    configs = os.path.join(ROOT, 'configs')
    flat = [p for p in os.listdir(configs) if p.endswith('.yaml') and not os.path.islink(os.path.join(configs, p))]
    folders = [f'{d}/{p}' for d in ('swin', 'swinv2', 'swinmlp', 'swinmoe', 'simmim', 'demo')
               for p in os.listdir(os.path.join(configs, d)) if p.endswith('.yaml')]
    # the official MoE files that share one expert over several GPUs (-4, -2) build too: at
    # world size 1 the one process holds a whole expert
    return sorted(flat + folders)


@pytest.mark.parametrize('cfg', _shipped_configs())
def test_every_config_builds_its_model(cfg, tmp_path):
    """Full size on the meta device (the section MODEL.TYPE names: MODEL.SWIN, MODEL.SWINV2
    or MODEL.SWIN_MLP; and the SimMIM model of the pre-training files), then a forward at the
    config's image and window sizes with narrow, shallow stages."""
    path = os.path.join(ROOT, 'configs', cfg)
    config = get_config(argparse.Namespace(cfg=path, output=str(tmp_path)))
    with torch.device('meta'):
        model = build_model(config)
        if 'simmim_pretrain' in cfg:
            assert {'encoder.mask_token', 'decoder.0.weight'} <= set(build_model(config, is_pretrain=True).state_dict())
    s, section = model_arch(config)
    assert model.embed_dim == s.EMBED_DIM and len(model.layers) == len(s.DEPTHS)
    assert model.patch_embed.img_size == (config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)
    assert model.layers[0].blocks[0].window_size == min(s.WINDOW_SIZE, config.DATA.IMG_SIZE // s.PATCH_SIZE)
    if config.MODEL.TYPE == 'swinv2':
        assert model.pretrained_window_sizes == list(s.PRETRAINED_WINDOW_SIZES)

    stages = len(s.DEPTHS)
    small = get_config(argparse.Namespace(cfg=path, output=str(tmp_path), opts=[
        f'{section}.EMBED_DIM', '16', f'{section}.NUM_HEADS', str([2 ** i for i in range(stages)]),
        f'{section}.DEPTHS', str([min(d, 2) for d in s.DEPTHS]), 'MODEL.NUM_CLASSES', '5']))
    model = build_model(small).eval()
    with torch.no_grad():
        out = logits_of(model(torch.randn(1, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)))
    assert out.shape == (1, 5) and out.isfinite().all()


def test_joined_mask_is_reused_in_inference_and_rebuilt_when_weights_change():
    blk = _random_block().float()
    attn = blk.attn
    mask = blk.window_layout(14, 14, 3, torch.device('cpu'))[2]
    with torch.no_grad():
        first = attn.joined_mask(mask)
        assert attn.joined_mask(mask) is first  # same weights, same resolution: reused
        assert attn.joined_mask(None) is not first
        again = attn.joined_mask(mask)
        attn.relative_position_bias_table.add_(1.0)  # an optimizer step, a load_state_dict
        changed = attn.joined_mask(mask)
    assert changed is not again and torch.allclose(changed, again + 1.0)
    assert attn.joined_mask(mask).requires_grad  # with gradients on, always joined anew


@pytest.mark.parametrize('v2', [False, True])
def test_reused_joined_mask_follows_weights_changed_without_a_version_bump(v2):
    """Fused optimizers change weights without bumping their version counter: inference right
    after such a step, with no mode switch between, must use the new bias."""
    from models.swin_transformer_v2 import SwinTransformerV2
    cls = SwinTransformerV2 if v2 else SwinTransformer
    model = cls(img_size=64, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2], num_classes=3).eval()
    blk = model.layers[0].blocks[1]
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        model(x)
        first = blk.attn.joined_mask(blk.attn_mask)
        assert blk.attn.joined_mask(blk.attn_mask) is first
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    versions = [t._version for t in blk.attn.bias_sources()]
    opt.step()
    assert [t._version for t in blk.attn.bias_sources()] == versions  # the step left no trace
    with torch.inference_mode():
        after = model(x)
        changed = blk.attn.joined_mask(blk.attn_mask)
    assert not torch.equal(changed, first)
    torch.testing.assert_close(after, model(x).detach(), rtol=1e-4, atol=1e-5)  # with gradients: never reused


def test_fsdp_units_are_the_blocks():
    model = SwinTransformer(**MICRO)
    units = model.fsdp_units()
    assert units == [blk for layer in model.layers for blk in layer.blocks]
    assert len(units) == sum(MICRO['depths']) and all(isinstance(u, SwinTransformerBlock) for u in units)


@pytest.mark.parametrize('v2', [False, True])
def test_training_after_inference_mode_with_a_frozen_stage(v2):
    """Validation runs under inference_mode; layouts and joined masks it caches are inference
    tensors, which a later training step (a frozen stage reuses cached masks) must not save."""
    from models.swin_transformer_v2 import SwinTransformerV2
    cls = SwinTransformerV2 if v2 else SwinTransformer
    model = cls(img_size=64, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2], num_classes=3)
    model.freeze(stages=1)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).sum().backward()
    with torch.inference_mode():
        model.eval()(x)
    assert model.head.weight.grad is not None


@pytest.mark.parametrize('v2', [False, True])
@pytest.mark.parametrize('optimizer', ['adamw', 'sgd'])
def test_validation_after_fused_optimizer_steps_sees_the_new_bias(v2, optimizer):
    """Fused optimizer kernels change weights without bumping their version counter, so the
    joined-mask cache must not outlive a train/eval switch: after steps, validation logits
    equal a fresh copy's (whose cache is empty)."""
    import copy

    from config import default_config, set_key
    from models.swin_transformer_v2 import SwinTransformerV2
    from optimizer import build_optimizer
    cls = SwinTransformerV2 if v2 else SwinTransformer
    model = cls(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                num_classes=3, drop_path_rate=0.0)
    config = default_config()
    set_key(config, 'TRAIN.OPTIMIZER.NAME', optimizer)
    set_key(config, 'TRAIN.BASE_LR', 0.5)
    opt = build_optimizer(config, model)
    assert opt.defaults.get('fused')
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):  # validate, then train a step, as the epochs do
        with torch.inference_mode():
            model.eval()(x)
        model.train()(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.inference_mode():
        seen = model.eval()(x)
        fresh = copy.deepcopy(model).eval()(x)
    torch.testing.assert_close(seen, fresh, rtol=0, atol=0)


def test_weights_made_under_inference_mode_run():
    """Inference tensors have no version counter: such a model runs without the cache."""
    with torch.inference_mode():
        model = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=[2, 2],
                                num_heads=[2, 4], num_classes=3).eval()
        assert model(torch.randn(1, 3, 32, 32)).isfinite().all()

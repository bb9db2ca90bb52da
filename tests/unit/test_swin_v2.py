"""Swin V2 model: published sizes, timm parity, a naive per-window reference block, the SDPA
path against the official formula, official keys and strict loading, half-precision autocast,
every V2 config, fine-tuning to another window through --pretrained, and training through
main.py (freezing, layer decay)."""
import argparse
import logging
import math
import os
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import checkpoint_filter_fn

from checkpoints.reading import load_pretrained
from config import ConfigError, get_config
from helpers.models import randomize, rel_err, set_fused
from helpers.runs import ROOT
from models import build_model
from models.swin_transformer_v2 import (
    LOGIT_SCALE_MAX,
    SwinTransformerBlock,
    SwinTransformerV2,
    WindowAttention,
    log_spaced_coords,
    scaled_unit,
)
from optimizer import build_param_groups

TINY = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24])
SMALL = dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24])
BASE = dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])
# Every feature of the real models at 64 px: shifted and unshifted stages, a one-window stage.
MICRO = dict(img_size=64, window_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4], num_classes=7,
             drop_path_rate=0.0)
V2_CONFIGS = ['swinv2_tiny_patch4_window8_256.yaml', 'swinv2_tiny_patch4_window16_256.yaml',
              'swinv2_small_patch4_window8_256.yaml', 'swinv2_small_patch4_window16_256.yaml',
              'swinv2_base_patch4_window8_256.yaml', 'swinv2_base_patch4_window16_256.yaml',
              'swinv2_base_patch4_window12_192_22k.yaml', 'swinv2_large_patch4_window12_192_22k.yaml',
              'swinv2_base_patch4_window12to16_192to256_22kto1k_ft.yaml',
              'swinv2_base_patch4_window12to24_192to384_22kto1k_ft.yaml',
              'swinv2_large_patch4_window12to16_192to256_22kto1k_ft.yaml',
              'swinv2_large_patch4_window12to24_192to384_22kto1k_ft.yaml']


# --------------------------------------------------------------------------- sizes

@pytest.mark.parametrize('arch,window,params_m,gflops', [
    (TINY, 8, 28.35, 5.9), (TINY, 16, 28.35, 6.6),
    (SMALL, 8, 49.73, 11.5), (SMALL, 16, 49.73, 12.6),
    (BASE, 8, 87.92, 20.3), (BASE, 16, 87.92, 21.8),
])
def test_published_parameter_counts_and_flops(arch, window, params_m, gflops):
    with torch.device('meta'):
        model = SwinTransformerV2(img_size=256, window_size=window, **arch)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params_m
    assert round(model.flops() / 1e9, 1) == gflops


# --------------------------------------------------------------------------- timm parity

@pytest.mark.parametrize('size', ['reduced', 'full'])
def test_logits_match_timm_on_the_same_weights(size):
    """timm's swinv2_tiny_window8_256 (reduced: the same structure at 64 px, window 4, narrow
    stages) with our weights converted by timm's own checkpoint_filter_fn."""
    if size == 'reduced':
        kw = dict(img_size=64, window_size=4, embed_dim=24, depths=[2, 2, 2, 2], num_heads=[1, 2, 3, 4], num_classes=10)
        ours = randomize(SwinTransformerV2(**kw)).eval()
        theirs = timm.create_model('swinv2_tiny_window8_256', **{**kw, 'depths': (2, 2, 2, 2),
                                                                'num_heads': (1, 2, 3, 4)}).eval()
    else:
        ours = randomize(SwinTransformerV2(img_size=256, window_size=8, **TINY)).eval()
        theirs = timm.create_model('swinv2_tiny_window8_256').eval()
    theirs.load_state_dict(checkpoint_filter_fn(ours.state_dict(), theirs), strict=True)
    x = torch.randn(2 if size == 'reduced' else 1, 3, ours.patch_embed.img_size[0], ours.patch_embed.img_size[1])
    with torch.no_grad():
        expected = theirs(x)
        assert rel_err(ours(x), expected) < 1e-5
        set_fused(ours, False)
        assert rel_err(ours(x), expected) < 1e-5


def test_timm_format_file_loads_through_pretrained(tmp_path):
    """A timm-trained V2 file (downsampling at stage starts, head.fc, no buffers) loads with
    --pretrained and gives timm's logits."""
    kw = dict(img_size=64, window_size=4, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 4), num_classes=10)
    theirs = randomize(timm.create_model('swinv2_tiny_window8_256', **kw)).eval()
    path = tmp_path / 'timm.pth'
    torch.save(theirs.state_dict(), path)
    ours = SwinTransformerV2(**{**kw, 'depths': [2, 2, 2, 2], 'num_heads': [1, 2, 3, 4]}).eval()
    report = load_pretrained(ours, str(path), logging.getLogger('test'))
    assert report.source_format == 'timm' and report.head == 'kept' and not report.rebuilt
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(ours(x), theirs(x)) < 1e-5


# --------------------------------------------------------------------------- naive reference

def naive_block(blk: SwinTransformerBlock, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Swin V2 block written from the paper, one window and one head at a time: pad and roll
    the map, cosine similarity of q and k times the clamped logit scale, plus 16 * sigmoid of
    the bias MLP at the log-spaced offset, -100 between tokens the shift wrapped from opposite
    borders (the official mask value); then residual post-normalization."""
    B, L, C = x.shape
    ws, nh = blk.window_size, blk.num_heads
    s = blk.shift_size if min(H, W) > ws else 0
    hd = C // nh
    attn = blk.attn
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    n = F.pad(x.view(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H))
    n = torch.roll(n, (-s, -s), (1, 2))
    wq, wk, wv = attn.qkv.weight.chunk(3)
    scale = torch.exp(torch.clamp(attn.logit_scale.flatten(), max=math.log(100.0)))
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing='ij')
    ys, xs = ys.flatten(), xs.flatten()
    norm_by = (attn.pretrained_window_size[0] or ws) - 1

    def log_coord(d):  # in fp32, the dtype of the official (persistent) coordinate table
        c = d.float() / norm_by * 8
        return torch.sign(c) * torch.log2(c.abs() + 1) / 3

    coords = torch.stack([log_coord(ys[:, None] - ys[None, :]), log_coord(xs[:, None] - xs[None, :])], -1)
    hidden = F.relu(coords.to(x.dtype) @ attn.cpb_mlp[0].weight.T + attn.cpb_mlp[0].bias)
    bias = 16 * torch.sigmoid(hidden @ attn.cpb_mlp[2].weight.T)  # (N, N, heads)
    out = torch.zeros_like(n)
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
                    q = tokens @ wq[sl].T + attn.q_bias[sl]
                    k = tokens @ wk[sl].T  # no k bias in V2
                    v = tokens @ wv[sl].T + attn.v_bias[sl]
                    cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T
                    logits = cos * scale[h] + bias[..., h] - 100.0 * blocked
                    heads.append(logits.softmax(-1) @ v)
                y = torch.cat(heads, -1) @ attn.proj.weight.T + attn.proj.bias
                out[b, r0:r0 + ws, c0:c0 + ws] = y.view(ws, ws, C)
    out = torch.roll(out, (s, s), (1, 2))[:, :H, :W].reshape(B, H * W, C)
    x = x + F.layer_norm(out, (C,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    m = blk.mlp.fc2(F.gelu(blk.mlp.fc1(x)))
    return x + F.layer_norm(m, (C,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)


def _random_block(dim=16, heads=2, res=(12, 12), ws=6, shift=3, pretrained=4) -> SwinTransformerBlock:
    blk = SwinTransformerBlock(dim, res, heads, window_size=ws, shift_size=shift, pretrained_window_size=pretrained)
    return randomize(blk.double().eval())


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('shift', [3, 0])
def test_block_matches_naive_reference(fused, shift):
    blk = _random_block(shift=shift)
    set_fused(blk, fused)
    x = torch.randn(2, 12 * 12, 16, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(blk(x, 12, 12), naive_block(blk, x, 12, 12)) < 1e-10


@pytest.mark.parametrize('H,W', [(10, 13), (9, 23), (5, 6)])
def test_block_pads_odd_sizes_like_reference(H, W):
    """Maps that are not whole windows are zero-padded (V1's rule); a map no larger than the
    window gets one window and no shift. Padded keys are all-zero: no NaN from normalizing them."""
    blk = _random_block(pretrained=0)
    x = torch.randn(2, H * W, 16, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(blk(x, H, W), naive_block(blk, x, H, W)) < 1e-10


def test_small_map_gets_one_window_and_no_shift():
    """The official V2 rule: a stage no larger than the window uses window = resolution, no shift."""
    model = SwinTransformerV2(img_size=256, window_size=16, **TINY)
    assert [(b.window_size, b.shift_size) for b in model.layers[2].blocks] == [(16, 0)] * 6
    assert [(b.window_size, b.shift_size) for b in model.layers[3].blocks] == [(8, 0)] * 2
    assert model.layers[1].blocks[1].shift_size == 8 and model.layers[1].blocks[1].attn_mask.shape == (4, 256, 256)


# --------------------------------------------------------------------------- fused vs plain

def test_sdpa_path_equals_official_formula_in_forward_and_gradients():
    model = randomize(SwinTransformerV2(**MICRO)).train()
    x = torch.randn(2, 3, 64, 64)
    outs, grads = [], []
    for fused in (True, False):
        set_fused(model, fused)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert rel_err(outs[0], outs[1]) < 1e-5
    flat = [torch.cat([g.flatten() for g in gs.values()]) for gs in grads]
    assert rel_err(flat[0], flat[1]) < 1e-5
    for name in grads[1]:  # each tensor too (a clamped logit scale has no gradient in either)
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6 * flat[1].abs().max().item())
    assert all(grads[0][n].abs().sum() > 0 for n in grads[0] if 'cpb_mlp' in n)
    assert sum(grads[0][n].abs().sum() for n in grads[0] if 'logit_scale' in n) > 0


def test_joined_mask_is_reused_in_inference_and_rebuilt_when_the_mlp_changes():
    blk = _random_block().float()
    attn = blk.attn
    mask = blk.window_layout(12, 12, 3, torch.device('cpu'))[2]
    with torch.no_grad():
        first = attn.joined_mask(mask)
        assert attn.joined_mask(mask) is first
        attn.cpb_mlp[2].weight.mul_(2.0)  # an optimizer step or a load
        changed = attn.joined_mask(mask)
    assert changed is not first and not torch.equal(changed, first)
    assert attn.joined_mask(mask).requires_grad  # with gradients on, joined anew each call


def test_fsdp_units_are_the_v2_blocks():
    model = SwinTransformerV2(**MICRO)
    assert model.fsdp_units() == [blk for layer in model.layers for blk in layer.blocks]
    assert all(isinstance(u, SwinTransformerBlock) for u in model.fsdp_units())


def test_bias_mlp_runs_once_per_block_in_a_training_step():
    model = SwinTransformerV2(**MICRO).train()
    calls = []
    for m in model.modules():
        if isinstance(m, WindowAttention):
            m.cpb_mlp.register_forward_hook(lambda *a: calls.append(1))
    model(torch.randn(4, 3, 64, 64)).sum().backward()
    assert len(calls) == sum(MICRO['depths'])


def test_activation_checkpointing_gives_identical_gradients():
    model = randomize(SwinTransformerV2(**{**MICRO, 'drop_path_rate': 0.3})).train()
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for use_ckpt in (False, True):
        model.set_grad_checkpointing(use_ckpt)
        model.zero_grad()
        torch.manual_seed(123)
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- half precision

def test_cosine_normalization_is_safe_in_half_precision():
    """F.normalize's eps (1e-12) is 0 in fp16: an all-zero key would be 0 / 0. Ours gives 0,
    and stays finite for tiny vectors even with the largest logit scale folded in."""
    t = torch.zeros(3, 8, dtype=torch.float16)
    t[1] = 1e-6
    t[2] = torch.randn(8).half()
    out = scaled_unit(t, torch.tensor(100.0))
    assert out.isfinite().all() and torch.count_nonzero(out[0]) == 0
    torch.testing.assert_close(out[2].float(), 100 * F.normalize(t[2].float(), dim=-1), rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(scaled_unit(t[2:].float()), F.normalize(t[2:].float(), dim=-1))


def test_logit_scale_clamp_is_a_plain_number():
    attn = WindowAttention(16, (4, 4), 2)
    with torch.no_grad():
        attn.logit_scale.fill_(10.0)
    assert isinstance(LOGIT_SCALE_MAX, float)
    torch.testing.assert_close(attn.logit_scale_value(), torch.full((2, 1, 1), 100.0))


@pytest.mark.parametrize('dtype,tol', [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize('train', [False, True])
def test_autocast_stays_finite_and_close_to_fp32(dtype, tol, train):
    """60 px: every stage is padded, so padded (all-zero) keys meet the half-precision path;
    some logit scales sit above the clamp."""
    model = randomize(SwinTransformerV2(**MICRO)).train(train)
    x = torch.randn(2, 3, 60, 60)
    ref = model(x)
    with torch.autocast('cpu', dtype=dtype):
        low = model(x)
    assert low.dtype == dtype and low.isfinite().all()
    assert rel_err(low.float(), ref.detach()) < tol
    if train:
        low.float().square().mean().backward()
        assert all(p.grad.isfinite().all() for p in model.parameters())


# --------------------------------------------------------------------------- state dict

def official_tiny_keys() -> set[str]:
    """The key set of the official swinv2_tiny_patch4_window8_256 checkpoint, buffers included."""
    keys = {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'patch_embed.norm.weight',
            'patch_embed.norm.bias', 'norm.weight', 'norm.bias', 'head.weight', 'head.bias'}
    for i, depth in enumerate([2, 2, 6, 2]):
        for j in range(depth):
            p = f'layers.{i}.blocks.{j}.'
            keys |= {p + k for k in ('norm1.weight', 'norm1.bias', 'attn.logit_scale', 'attn.q_bias', 'attn.v_bias',
                                     'attn.relative_coords_table', 'attn.relative_position_index',
                                     'attn.cpb_mlp.0.weight', 'attn.cpb_mlp.0.bias', 'attn.cpb_mlp.2.weight',
                                     'attn.qkv.weight', 'attn.proj.weight', 'attn.proj.bias', 'norm2.weight',
                                     'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias')}
            if j % 2 == 1 and i < 3:  # the 8x8 last stage is one window: no shift, no mask
                keys.add(p + 'attn_mask')
        if i < 3:
            keys |= {f'layers.{i}.downsample.{k}' for k in ('reduction.weight', 'norm.weight', 'norm.bias')}
    return keys


def test_state_dict_has_the_official_keys_and_shapes():
    sd = SwinTransformerV2(img_size=256, window_size=8, **TINY).state_dict()
    assert set(sd) == official_tiny_keys()
    shapes = {
        'layers.0.blocks.1.attn.logit_scale': (3, 1, 1),
        'layers.0.blocks.1.attn.cpb_mlp.0.weight': (512, 2),
        'layers.0.blocks.1.attn.cpb_mlp.0.bias': (512,),
        'layers.0.blocks.1.attn.cpb_mlp.2.weight': (3, 512),
        'layers.0.blocks.1.attn.relative_coords_table': (1, 15, 15, 2),
        'layers.0.blocks.1.attn.relative_position_index': (64, 64),
        'layers.0.blocks.1.attn.q_bias': (96,),
        'layers.0.blocks.1.attn.qkv.weight': (288, 96),
        'layers.0.blocks.1.attn_mask': (64, 64, 64),
        'layers.2.blocks.5.attn_mask': (4, 64, 64),
        'layers.0.downsample.reduction.weight': (192, 384),
        'layers.0.downsample.norm.weight': (192,),  # post-norm over 2C
        'layers.3.blocks.1.attn.cpb_mlp.2.weight': (24, 512),
        'head.weight': (1000, 768),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert sd['layers.0.blocks.0.attn.relative_coords_table'].dtype == torch.float32


def test_coordinate_table_follows_the_official_formula():
    table = log_spaced_coords((8, 8))
    assert table.shape == (1, 15, 15, 2)
    torch.testing.assert_close(table[0, 0, 0], torch.full((2,), -math.log2(9) / 3))  # offset -7 -> -8
    torch.testing.assert_close(table[0, 7, 7], torch.zeros(2))
    # normalized by the pretrained window: offsets keep the values they had at that window
    torch.testing.assert_close(log_spaced_coords((16, 16), (8, 8))[0, 8:23, 8:23], table[0])


def test_official_checkpoint_loads_strictly_and_buffers_are_optional(tmp_path):
    src = randomize(SwinTransformerV2(**MICRO)).eval()
    path = tmp_path / 'official.pth'
    torch.save({'model': src.state_dict(), 'epoch': 29}, path)
    state = torch.load(path, map_location='cpu', weights_only=True)['model']
    dst = SwinTransformerV2(**MICRO).eval()
    dst.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    # files without the derived buffers (timm's) still load strictly
    bare = {k: v for k, v in state.items()
            if not k.endswith(('relative_coords_table', 'relative_position_index', 'attn_mask'))}
    SwinTransformerV2(**MICRO).load_state_dict(bare, strict=True)
    # a coordinate table made for another window is accepted; the model keeps its own
    odd = dict(state)
    odd['layers.0.blocks.0.attn.relative_coords_table'] = torch.zeros(1, 3, 3, 2)
    model = SwinTransformerV2(**MICRO)
    own = model.layers[0].blocks[0].attn.relative_coords_table.clone()
    model.load_state_dict(odd, strict=True)
    assert torch.equal(model.layers[0].blocks[0].attn.relative_coords_table, own)
    # V1's qkv.bias is not a V2 key, and a missing parameter is still an error
    extra = dict(state)
    extra['layers.0.blocks.0.attn.qkv.bias'] = torch.zeros(48)
    with pytest.raises(RuntimeError, match='qkv.bias'):
        SwinTransformerV2(**MICRO).load_state_dict(extra, strict=True)
    missing = dict(state)
    del missing['layers.1.blocks.1.attn.cpb_mlp.0.weight']
    with pytest.raises(RuntimeError, match='cpb_mlp.0.weight'):
        SwinTransformerV2(**MICRO).load_state_dict(missing, strict=True)


def test_weight_decay_exclusions_and_official_init():
    model = SwinTransformerV2(img_size=64, window_size=4, ape=True, **TINY)
    assert model.no_weight_decay() == {'absolute_pos_embed'}
    assert model.no_weight_decay_keywords() == {'cpb_mlp', 'logit_scale', 'relative_position_bias_table'}
    blk = model.layers[2].blocks[0]
    for norm in (blk.norm1, blk.norm2):  # residual post-norms start at zero (official)
        assert torch.count_nonzero(norm.weight) == 0 and torch.count_nonzero(norm.bias) == 0
    assert torch.all(model.norm.weight == 1) and torch.all(model.layers[0].downsample.norm.weight == 1)
    torch.testing.assert_close(blk.attn.logit_scale, torch.full((12, 1, 1), math.log(10)))
    assert abs(blk.attn.cpb_mlp[0].weight.std().item() - 0.02) < 0.005  # trunc_normal_(std=.02) on every Linear
    assert torch.count_nonzero(blk.attn.q_bias) == 0 and torch.count_nonzero(blk.attn.v_bias) == 0


def test_optimizer_groups_exempt_the_bias_mlp_and_logit_scales():
    config = get_config(argparse.Namespace(cfg=os.path.join(ROOT, 'configs', V2_CONFIGS[0]), output='/tmp'))
    model = SwinTransformerV2(**MICRO)
    groups = build_param_groups(config, model)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g['weight_decay'] == 0 for p in g['params']}
    decay = {names[id(p)] for g in groups if g['weight_decay'] > 0 for p in g['params']}
    assert {'layers.0.blocks.0.attn.cpb_mlp.0.weight', 'layers.0.blocks.0.attn.cpb_mlp.2.weight',
            'layers.0.blocks.0.attn.logit_scale', 'layers.0.blocks.0.attn.q_bias'} <= no_decay
    assert {'layers.0.blocks.0.attn.qkv.weight', 'layers.0.downsample.reduction.weight'} <= decay


# --------------------------------------------------------------------------- configs

@pytest.mark.parametrize('name', V2_CONFIGS)
def test_official_config_loads_builds_and_runs_reduced(name, tmp_path):
    path = os.path.join(ROOT, 'configs', name)
    config = get_config(argparse.Namespace(cfg=path, output=str(tmp_path)))
    s = config.MODEL.SWINV2
    assert config.MODEL.TYPE == 'swinv2'
    # the name says it: window<pretrained>to<window>_<pretrained size>to<size>
    w0, w1, size0, size1 = re.search(r'window(\d+)(?:to(\d+))?_(\d+)(?:to(\d+))?', name).groups()
    assert s.WINDOW_SIZE == int(w1 or w0) and config.DATA.IMG_SIZE == int(size1 or size0)
    assert list(s.PRETRAINED_WINDOW_SIZES) == ([12, 12, 12, 6] if w1 else [0, 0, 0, 0])
    with torch.device('meta'):
        model = build_model(config)
    assert type(model) is SwinTransformerV2 and model.pretrained_window_sizes == list(s.PRETRAINED_WINDOW_SIZES)
    params = {96: {6: 28.35, 18: 49.73}, 128: {18: 87.92}, 192: {18: 196.74}}[s.EMBED_DIM][s.DEPTHS[2]]
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params
    # the same image, window and pretrained windows with narrow, shallow stages
    small = get_config(argparse.Namespace(cfg=path, output=str(tmp_path), opts=[
        'MODEL.SWINV2.EMBED_DIM', '16', 'MODEL.SWINV2.NUM_HEADS', '[1, 2, 4, 8]', 'MODEL.SWINV2.DEPTHS', '[2, 2, 2, 2]',
        'MODEL.NUM_CLASSES', '5']))
    model = build_model(small).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE))
    assert out.shape == (1, 5) and out.isfinite().all()


def test_config_validates_the_section_of_the_model_type(tmp_path):
    path = os.path.join(ROOT, 'configs', V2_CONFIGS[0])

    def cfg(*opts):
        return get_config(argparse.Namespace(cfg=path, output=str(tmp_path), opts=list(opts)))

    with pytest.raises(ConfigError, match='MODEL.SWINV2.NUM_HEADS'):
        cfg('MODEL.SWINV2.NUM_HEADS', '[3, 6, 12]')
    with pytest.raises(ConfigError, match='MODEL.SWINV2.PRETRAINED_WINDOW_SIZES has 3 entries'):
        cfg('MODEL.SWINV2.PRETRAINED_WINDOW_SIZES', '[8, 8, 8]')
    with pytest.raises(ConfigError, match=r'TRAIN.FREEZE_STAGES must be in \[0, 2\]'):
        cfg('MODEL.SWINV2.DEPTHS', '[2, 2]', 'MODEL.SWINV2.NUM_HEADS', '[3, 6]',
            'MODEL.SWINV2.PRETRAINED_WINDOW_SIZES', '[0, 0]', 'TRAIN.FREEZE_STAGES', '3')
    # the V1 section is not what a V2 model reads: its values do not matter here
    assert cfg('MODEL.SWIN.NUM_HEADS', '[5]').MODEL.TYPE == 'swinv2'
    assert cfg('MODEL.TYPE', 'SwinV2').MODEL.TYPE == 'swinv2'


# --------------------------------------------------------------------------- fine-tuning to another window

def test_window_change_through_pretrained_keeps_the_bias_mlp(tmp_path, caplog):
    """A window-4 file into a window-6 model pretrained at window 4: the bias MLP is loaded as
    is, the coordinate tables are the model's, offsets both windows have keep their bias."""
    arch = dict(patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], num_classes=5, drop_path_rate=0.0)
    source = randomize(SwinTransformerV2(img_size=32, window_size=4, **arch)).eval()
    path = tmp_path / 'w4.pth'
    torch.save({'model': source.state_dict()}, path)
    target = SwinTransformerV2(img_size=48, window_size=6, pretrained_window_sizes=[4, 4], **arch).eval()
    own_tables = {k: v.clone() for k, v in target.state_dict().items() if k.endswith('relative_coords_table')}
    logger = logging.getLogger('test-v2-pretrained')
    caplog.set_level(logging.INFO, logger=logger.name)
    report = load_pretrained(target, str(path), logger)
    assert report.rebuilt == ['window 4 -> 6: coordinate tables rebuilt, bias MLP carried over '
                              '(pretrained window sizes [4, 4])']
    assert 'window 4 -> 6: coordinate tables rebuilt, bias MLP carried over' in caplog.text
    assert report.head == 'kept' and not report.resized
    src, dst = source.state_dict(), target.state_dict()
    for key in src:
        if 'cpb_mlp' in key or key.endswith(('logit_scale', 'q_bias', 'qkv.weight')):
            assert torch.equal(src[key], dst[key]), key
    for key, table in own_tables.items():
        assert torch.equal(dst[key], table)
    target.load_state_dict(dst, strict=True)
    # offsets -3..3 exist in both windows and, normalized by the same window, get the same bias
    for s_blk, t_blk in zip(source.layers[0].blocks, target.layers[0].blocks):
        with torch.no_grad():
            old = s_blk.attn.bias_table().view(7, 7, -1)
            new = t_blk.attn.bias_table().view(11, 11, -1)[2:9, 2:9]
        torch.testing.assert_close(new, old)
    with torch.no_grad():
        assert target(torch.randn(2, 3, 48, 48)).isfinite().all()


def test_window_change_without_pretrained_window_sizes_says_how_to_keep_the_scale(tmp_path, caplog):
    arch = dict(patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], num_classes=5)
    path = tmp_path / 'w4.pth'
    torch.save({'model': SwinTransformerV2(img_size=32, window_size=4, **arch).state_dict()}, path)
    target = SwinTransformerV2(img_size=48, window_size=6, pretrained_window_sizes=[0, 0], **arch)
    report = load_pretrained(target, str(path), logging.getLogger('test'))
    assert 'PRETRAINED_WINDOW_SIZES is 0' in report.rebuilt[0]


# --------------------------------------------------------------------------- training through main.py



def test_official_22k_to_1k_window_change_is_one_line_per_load(tmp_path):
    """The official recipe: 192 px / window 12 (last stage 6) into 256 px / window 16 (last 8)."""
    arch = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8])
    path = tmp_path / '22k.pth'
    torch.save({'model': SwinTransformerV2(img_size=192, window_size=12, num_classes=11, **arch).state_dict()}, path)
    target = SwinTransformerV2(img_size=256, window_size=16, pretrained_window_sizes=[12, 12, 12, 6], num_classes=11,
                               **arch)
    report = load_pretrained(target, str(path), logging.getLogger('test'))
    assert report.rebuilt == ['window 12 -> 16 (stages 0, 1, 2), 6 -> 8 (stage 3): coordinate tables rebuilt, '
                              'bias MLP carried over (pretrained window sizes [12, 12, 12, 6])']

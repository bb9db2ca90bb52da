"""Swin-MLP: official state_dict keys and shapes from the naming rules, a naive per-window
reference block (shifted, unshifted, sizes that are not whole windows), forward / backward,
drop path, activation checkpointing, the official FLOP formula, strict reloads, the optimizer."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers.configs import group_of, make_config
from helpers.models import randomize
from models.swin_mlp import SwinMLP, SwinMLPBlock
from models.weights import load_model_weights
from optimizer import build_optimizer
from utils import CheckpointError

# Two stages of 8x8 and 4x4 tokens, window 4: a shifted stage and a one-window stage.
TINY = dict(img_size=32, patch_size=4, embed_dim=8, depths=[2, 2], num_heads=[2, 4], window_size=4, num_classes=5)
# Three stages of 16, 8, 4 tokens with window 6: windows that do not tile the map, a last
# stage smaller than the window (window shrinks to 4), fractional official window counts.
ODD = dict(img_size=64, patch_size=4, embed_dim=8, depths=[2, 2, 2], num_heads=[1, 2, 2], window_size=6,
           num_classes=3, mlp_ratio=2.)


# --------------------------------------------------------------------------- state_dict keys

def official_shapes(img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
                    num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4., ape=False, patch_norm=True):
    """Ordered (key, shape) pairs of the official SwinMLP, from its naming rules."""
    res = img_size // patch_size
    out = [('absolute_pos_embed', (1, res * res, embed_dim))] if ape else []
    out += [('patch_embed.proj.weight', (embed_dim, in_chans, patch_size, patch_size)),
            ('patch_embed.proj.bias', (embed_dim,))]
    if patch_norm:
        out += [('patch_embed.norm.weight', (embed_dim,)), ('patch_embed.norm.bias', (embed_dim,))]
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        dim, side = embed_dim * 2 ** i, res // 2 ** i
        n, hidden = min(window_size, side) ** 2, int(dim * mlp_ratio)
        for j in range(depth):
            p = f'layers.{i}.blocks.{j}.'
            out += [(p + 'norm1.weight', (dim,)), (p + 'norm1.bias', (dim,)),
                    (p + 'spatial_mlp.weight', (heads * n, n, 1)), (p + 'spatial_mlp.bias', (heads * n,)),
                    (p + 'norm2.weight', (dim,)), (p + 'norm2.bias', (dim,)),
                    (p + 'mlp.fc1.weight', (hidden, dim)), (p + 'mlp.fc1.bias', (hidden,)),
                    (p + 'mlp.fc2.weight', (dim, hidden)), (p + 'mlp.fc2.bias', (dim,))]
        if i < len(depths) - 1:
            p = f'layers.{i}.downsample.'
            out += [(p + 'reduction.weight', (2 * dim, 4 * dim)), (p + 'norm.weight', (4 * dim,)),
                    (p + 'norm.bias', (4 * dim,))]
    features = embed_dim * 2 ** (len(depths) - 1)
    return out + [('norm.weight', (features,)), ('norm.bias', (features,)),
                  ('head.weight', (num_classes, features)), ('head.bias', (num_classes,))]


@pytest.mark.parametrize('kwargs', [TINY, {**TINY, 'ape': True}, {**TINY, 'patch_norm': False}, ODD],
                         ids=['tiny', 'ape', 'no_patch_norm', 'odd_window'])
def test_state_dict_keys_and_shapes_follow_the_official_rules(kwargs):
    model = SwinMLP(**kwargs)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == official_shapes(**kwargs)


def test_default_model_has_the_official_spatial_mlp_shapes():
    shapes = {k: tuple(v.shape) for k, v in SwinMLP().state_dict().items()}
    assert shapes['layers.0.blocks.0.spatial_mlp.weight'] == (3 * 49, 49, 1)
    assert shapes['layers.3.blocks.1.spatial_mlp.weight'] == (24 * 49, 49, 1)
    assert shapes['layers.3.blocks.1.spatial_mlp.bias'] == (24 * 49,)
    assert list(shapes.items()) == official_shapes()


# --------------------------------------------------------------------------- naive reference

def naive_block(blk: SwinMLPBlock, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """A Swin-MLP block one window and one head at a time: zero-pad the normalized map
    (window - shift zeros before it and shift after it when shifted, as the official code pads,
    then up to whole windows), multiply each head's window tokens by that head's N x N matrix
    and add its bias, crop, add the residual; then the channel MLP with its residual."""
    B, L, C = x.shape
    ws, heads = blk.window_size, blk.num_heads
    shift = blk.shift_size if min(H, W) > ws else 0
    hd, n = C // heads, ws * ws
    normed = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps).view(B, H, W, C)
    before = ws - shift if shift else 0
    Hp, Wp = math.ceil((before + H + shift) / ws) * ws, math.ceil((before + W + shift) / ws) * ws
    padded = x.new_zeros(B, Hp, Wp, C)
    padded[:, before:before + H, before:before + W] = normed
    weight, bias = blk.spatial_mlp.weight[:, :, 0], blk.spatial_mlp.bias
    mixed = torch.zeros_like(padded)
    for b in range(B):
        for r in range(0, Hp, ws):
            for c in range(0, Wp, ws):
                tokens = padded[b, r:r + ws, c:c + ws].reshape(n, C)
                for h in range(heads):
                    rows, chans = slice(h * n, (h + 1) * n), slice(h * hd, (h + 1) * hd)
                    out = weight[rows] @ tokens[:, chans] + bias[rows, None]
                    mixed[b, r:r + ws, c:c + ws, chans] = out.view(ws, ws, hd)
    y = x + mixed[:, before:before + H, before:before + W].reshape(B, L, C)
    z = F.layer_norm(y, (C,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
    z = F.linear(F.gelu(F.linear(z, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return y + z


# Window 5, shift 2: window - shift (3) zeros go before the map, shift (2) after it.
@pytest.mark.parametrize('resolution,run_at,shift', [
    ((10, 10), None, 0), ((10, 10), None, 2),  # the official case: whole windows
    ((12, 7), None, 0), ((12, 7), None, 2),    # not whole windows, not square
    ((10, 10), (8, 11), 2),                    # another size at run time than at construction
    ((10, 10), (5, 9), 2),                     # a side no longer than the window: no shift
])
@torch.no_grad()
def test_block_matches_naive_per_window_reference(resolution, run_at, shift):
    blk = randomize(SwinMLPBlock(dim=8, input_resolution=resolution, num_heads=2, window_size=5,
                                 shift_size=shift, mlp_ratio=2.)).eval()
    H, W = run_at or resolution
    x = torch.randn(2, H * W, 8)
    out = blk(x, H, W) if run_at else blk(x)
    torch.testing.assert_close(out, naive_block(blk, x, H, W), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_shift_changes_the_output_and_a_small_map_shrinks_the_window():
    blk = randomize(SwinMLPBlock(dim=8, input_resolution=(8, 8), num_heads=2, window_size=4, shift_size=2)).eval()
    x = torch.randn(1, 64, 8)
    shifted = blk(x)
    blk.shift_size = 0
    assert not torch.allclose(shifted, blk(x), atol=1e-3)
    small = SwinMLPBlock(dim=8, input_resolution=(3, 5), num_heads=2, window_size=4, shift_size=2)
    assert (small.window_size, small.shift_size) == (3, 0)
    assert small.spatial_mlp.weight.shape == (2 * 9, 9, 1)
    x = torch.randn(2, 15, 8)
    torch.testing.assert_close(randomize(small).eval()(x), naive_block(small, x, 3, 5), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='multiple of num_heads'):
        SwinMLPBlock(dim=8, input_resolution=(8, 8), num_heads=3)


# --------------------------------------------------------------------------- model

def test_forward_backward_reach_every_parameter():
    model = SwinMLP(**TINY, ape=True)
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 16)
    out = model(x)
    assert out.shape == (2, 5)
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert model(torch.randn(1, 3, 44, 36)).shape == (1, 5)  # not whole windows nor the built size


def test_drop_path_rates_and_randomness_in_training_only():
    model = SwinMLP(**TINY, drop_path_rate=0.6)
    rates = [blk.drop_path_prob for layer in model.layers for blk in layer.blocks]
    assert rates == pytest.approx([0.0, 0.2, 0.4, 0.6])
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    plain = SwinMLP(**TINY, drop_path_rate=0.)
    torch.testing.assert_close(plain.train()(x), plain.eval()(x))


def test_use_checkpoint_recomputes_blocks_with_the_same_outputs_and_gradients():
    ref = SwinMLP(**TINY, drop_path_rate=0.3)
    ckpt = SwinMLP(**TINY, drop_path_rate=0.3, use_checkpoint=True)
    ckpt.load_state_dict(ref.state_dict())
    calls = []
    ckpt.layers[0].blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    results = []
    for model in (ref, ckpt):
        torch.manual_seed(1)
        out = model.train()(x)
        out.square().sum().backward()
        results.append((out, [p.grad for p in model.parameters()]))
    assert len(calls) == 2  # forward, then the recomputation in backward
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_spatial_mlp_is_initialized_as_officially():
    """Truncated normal (std 0.02) weights and zero biases, as for the Linear layers; the
    Conv1d default (uniform, fan-in bound) would be about 7x wider at these sizes."""
    model = SwinMLP(**TINY)
    convs = [blk.spatial_mlp for layer in model.layers for blk in layer.blocks]
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert 0.017 < weights.std().item() < 0.023
    assert all(not c.bias.any() for c in convs)


# --------------------------------------------------------------------------- FLOPs

def official_flops(img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
                   window_size=7, mlp_ratio=4., patch_norm=True, **_):
    """The official count: patch embedding, per block two norms, the spatial MLP over its
    windows (a shifted block counts one more row and column of windows) and the channel MLP,
    patch merging, final norm and head."""
    side = img_size // patch_size
    total = side * side * embed_dim * in_chans * patch_size ** 2 + (side * side * embed_dim if patch_norm else 0)
    for i, depth in enumerate(depths):
        dim, h = embed_dim * 2 ** i, side // 2 ** i
        ws = min(window_size, h)
        for j in range(depth):
            windows = (h / ws + 1) ** 2 if j % 2 and h > window_size else h * h / ws / ws
            total += 2 * dim * h * h + windows * dim * ws ** 4 + 2 * h * h * dim * dim * mlp_ratio
        if i < len(depths) - 1:
            total += h * h * dim + (h // 2) ** 2 * 4 * dim * 2 * dim
    features = embed_dim * 2 ** (len(depths) - 1)
    return total + features * side * side // 2 ** len(depths) + features * num_classes


@pytest.mark.parametrize('kwargs', [TINY, {**ODD, 'patch_norm': False}], ids=['tiny', 'odd_window'])
def test_flops_follow_the_official_formula(kwargs):
    assert math.isclose(SwinMLP(**kwargs).flops(), official_flops(**kwargs), rel_tol=1e-12)


def test_flops_and_size_of_published_swin_mlp_t_c24():
    """swin_mlp_tiny_c24_patch4_window8_256: 20M parameters, 4.0G FLOPs in the official table."""
    kwargs = dict(img_size=256, window_size=8, num_heads=[4, 8, 16, 32])
    model = SwinMLP(**kwargs)
    assert math.isclose(model.flops(), official_flops(**kwargs), rel_tol=1e-12)
    assert round(model.flops() / 1e9, 1) == 4.0
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 20


# --------------------------------------------------------------------------- loading, optimizer

@torch.no_grad()
def test_loads_its_own_state_dict_strictly_and_rejects_another_window():
    source = randomize(SwinMLP(**TINY, ape=True)).eval()
    target = SwinMLP(**TINY, ape=True).eval()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(source(x), target(x))
    load_model_weights(target, source.state_dict(), 'own.pth')
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match='spatial_mlp.weight'):
        load_model_weights(SwinMLP(**{**TINY, 'window_size': 2}, ape=True), source.state_dict(), 'w2.pth')


def test_build_optimizer_groups_by_decay_and_steps():
    model = SwinMLP(**TINY, ape=True)
    opt = build_optimizer(make_config(), model)
    assert isinstance(opt, torch.optim.AdamW)
    params, group = dict(model.named_parameters()), group_of(opt)
    assert sorted(id(p) for g in opt.param_groups for p in g['params']) == sorted(map(id, params.values()))
    assert group[id(params['layers.0.blocks.1.spatial_mlp.weight'])]['weight_decay'] > 0
    for name in ('absolute_pos_embed', 'layers.0.blocks.1.spatial_mlp.bias', 'layers.1.blocks.0.norm1.weight'):
        assert group[id(params[name])]['weight_decay'] == 0, name
    before = params['layers.0.blocks.1.spatial_mlp.weight'].detach().clone()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert not torch.equal(before, params['layers.0.blocks.1.spatial_mlp.weight'])


def test_layer_decay_follows_the_models_own_blocks():
    model = SwinMLP(**TINY)  # 4 blocks (the config's demo model has 8): layer ids 0..5
    group = group_of(build_optimizer(make_config('TRAIN.LAYER_DECAY', '0.5'), model))
    params = dict(model.named_parameters())
    expected = {'patch_embed.proj.weight': 0.5 ** 5, 'layers.0.blocks.0.spatial_mlp.weight': 0.5 ** 4,
                'layers.0.downsample.reduction.weight': 0.5 ** 3, 'layers.1.blocks.1.spatial_mlp.weight': 0.5,
                'head.weight': 1.0}
    assert {k: group[id(params[k])]['lr_scale'] for k in expected} == pytest.approx(expected)


def test_freeze_stages_as_v1():
    model = SwinMLP(**TINY)
    assert model.freeze(stages=1) == ['patch_embed', 'pos_drop', 'layers.0']
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(('patch_embed', 'layers.0.')) for n in trainable)
    assert 'layers.1.blocks.0.spatial_mlp.weight' in trainable

"""SimMIM: the official state_dict keys, what the mask hides from the encoder, the loss on
masked pixels only, normalized targets against a direct computation, the official masks, and
the optimizer grouping of official pre-training."""
import logging

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from checkpoints.reading import load_pretrained
from data.simmim import MaskGenerator
from helpers.configs import make_config
from models.adapt import fit_weights
from models.simmim import SimMIM, SwinTransformerForSimMIM, SwinTransformerV2ForSimMIM, normalized_targets
from models.simmim_weights import geometric_resize_bias_table
from models.swin_transformer import SwinTransformer
from models.swin_transformer_v2 import SwinTransformerV2
from models.weights import is_derived
from optimizer import build_param_groups

TINY = dict(img_size=64, patch_size=4, in_chans=3, num_classes=0, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
            window_size=4, drop_path_rate=0.0)


def _simmim(encoder_class=SwinTransformerForSimMIM, **options) -> SimMIM:
    torch.manual_seed(0)
    encoder = encoder_class(**TINY)
    return SimMIM(encoder, encoder_stride=8, in_chans=3, patch_size=4, **options).eval()


def _mask(batch: int = 2, seed: int = 0) -> torch.Tensor:
    np.random.seed(seed)
    generator = MaskGenerator(input_size=64, mask_patch_size=16, model_patch_size=4, mask_ratio=0.6)
    return torch.from_numpy(np.stack([generator() for _ in range(batch)]))


@pytest.mark.parametrize('encoder_class', [SwinTransformerForSimMIM, SwinTransformerV2ForSimMIM])
def test_official_keys_no_head_and_a_mask_token(encoder_class):
    model = _simmim(encoder_class)
    keys = set(model.state_dict())
    assert {'encoder.mask_token', 'decoder.0.weight', 'decoder.0.bias', 'encoder.patch_embed.proj.weight',
            'encoder.norm.weight'} <= keys
    assert not any(k.startswith('encoder.head') for k in keys)
    assert all(k.startswith(('encoder.', 'decoder.0.')) for k in keys)
    assert model.encoder.mask_token.shape == (1, 1, 16)
    # 1x1 convolution from the last stage's 32 channels to stride^2 x 3 channels
    assert model.decoder[0].weight.shape == (8 * 8 * 3, 32, 1, 1)
    with pytest.raises(ValueError, match='num_classes 0'):
        encoder_class(**dict(TINY, num_classes=10))


@pytest.mark.parametrize('encoder_class', [SwinTransformerForSimMIM, SwinTransformerV2ForSimMIM])
def test_masked_pixels_do_not_reach_the_encoder(encoder_class):
    model = _simmim(encoder_class)
    images, mask = torch.randn(2, 3, 64, 64), _mask()
    pixel_mask = model.pixel_mask(mask).bool().expand(-1, 3, -1, -1)
    changed = images.clone()
    changed[pixel_mask] = torch.randn(int(pixel_mask.sum()))
    with torch.no_grad():
        features = model.encoder(images, mask)
        assert features.shape == (2, 32, 8, 8)
        assert torch.equal(features, model.encoder(changed, mask))
        # the unmasked pixels do reach it
        visible = images.clone()
        visible[~pixel_mask] += 1.0
        assert not torch.allclose(features, model.encoder(visible, mask))


def test_loss_is_the_l1_error_on_masked_pixels_only():
    model = _simmim()
    images, mask = torch.randn(2, 3, 64, 64), _mask()
    with torch.no_grad():
        loss = model(images, mask)
        predicted = model(images, mask, reconstruct=True)
    assert predicted.shape == images.shape and loss.dim() == 0
    keep = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).bool()  # (B, H, W)
    errors = (predicted - images).abs().permute(0, 2, 3, 1)[keep]  # (masked pixels, 3)
    assert torch.allclose(loss, errors.mean(), rtol=1e-5)
    # a wrong prediction where nothing is masked costs nothing
    with torch.no_grad():
        model.decoder[0].bias.add_(5.0)
        shifted = model(images, mask, reconstruct=True)
        assert torch.allclose(model(images, mask), (shifted - images).abs().permute(0, 2, 3, 1)[keep].mean())


def test_loss_backpropagates_to_encoder_decoder_and_mask_token():
    model = _simmim().train()
    model(torch.randn(2, 3, 64, 64), _mask()).backward()
    for name in ('encoder.mask_token', 'decoder.0.weight', 'encoder.patch_embed.proj.weight'):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_normalized_targets_against_a_direct_computation():
    torch.manual_seed(1)
    images = torch.randn(1, 2, 9, 7, dtype=torch.float64)
    k = 5
    out = normalized_targets(images, k)
    expected = torch.empty_like(images)
    for c in range(2):
        for i in range(9):
            for j in range(7):
                window = images[0, c, max(0, i - 2):i + 3, max(0, j - 2):j + 3].flatten()
                std = (window.var(unbiased=True) + 1e-6) ** 0.5
                expected[0, c, i, j] = (images[0, c, i, j] - window.mean()) / std
    assert torch.allclose(out, expected, atol=1e-10)
    with pytest.raises(ValueError, match='odd'):
        normalized_targets(images, 4)


def test_norm_target_option_changes_the_target():
    images, mask = torch.randn(2, 3, 64, 64), _mask()
    plain, normed = _simmim(), _simmim(norm_target=True, norm_target_patch_size=7)
    with torch.no_grad():
        predicted = normed(images, mask, reconstruct=True)
        keep = plain.pixel_mask(mask).expand(-1, 3, -1, -1).bool()
        expected = (predicted - normalized_targets(images, 7))[keep].abs().mean()
        assert torch.allclose(normed(images, mask), expected, rtol=1e-5)
        assert not torch.allclose(normed(images, mask), plain(images, mask))


def test_mask_generator_follows_the_official_rule():
    generator = MaskGenerator(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    np.random.seed(3)
    masks = [generator() for _ in range(20)]
    for mask in masks:
        assert mask.shape == (48, 48) and set(np.unique(mask)) <= {0, 1}
        squares = mask[::8, ::8]
        assert squares.sum() == 22  # ceil(36 x 0.6)
        assert np.array_equal(mask, squares.repeat(8, 0).repeat(8, 1))  # whole 32 px squares
    assert len({m.tobytes() for m in masks}) == 20
    np.random.seed(3)
    assert np.array_equal(generator(), masks[0])  # NumPy's generator, reseeded per sample by the loader
    with pytest.raises(ValueError, match='multiple'):
        MaskGenerator(input_size=200, mask_patch_size=32)


def test_no_weight_decay_names_are_prefixed_like_the_official_pretraining():
    model = _simmim(SwinTransformerV2ForSimMIM)
    assert 'encoder.mask_token' in model.no_weight_decay()
    assert model.no_weight_decay_keywords() == {'encoder.cpb_mlp', 'encoder.logit_scale',
                                                'encoder.relative_position_bias_table'}


# --- fine-tuning from a SimMIM checkpoint ---------------------------------------------------

def _fine_tune_model(window_size=4, encoder_class=SwinTransformer):
    torch.manual_seed(5)
    return encoder_class(**dict(TINY, num_classes=7, window_size=window_size))


@pytest.mark.parametrize('pair', [(SwinTransformerForSimMIM, SwinTransformer),
                                  (SwinTransformerV2ForSimMIM, SwinTransformerV2)])
def test_simmim_checkpoint_loads_its_encoder_and_keeps_the_new_head(tmp_path, pair):
    pretrain_class, classifier_class = pair
    pretrained = _simmim(pretrain_class)
    path = str(tmp_path / 'simmim.pth')
    torch.save({'model': pretrained.state_dict(), 'epoch': 99}, path)
    model = _fine_tune_model(encoder_class=classifier_class)
    head_before = model.head.weight.detach().clone()
    report = load_pretrained(model, path, logging.getLogger('test'))
    assert report.source_format == 'simmim' and report.head == 'initialized'
    assert sorted(report.dropped) == ['decoder.0.bias', 'decoder.0.weight', 'encoder.mask_token']
    assert torch.equal(model.head.weight, head_before) and head_before.abs().sum() > 0  # not zeros
    for key, value in model.state_dict().items():
        if not key.startswith('head.') and not is_derived(key):
            assert torch.equal(value, pretrained.state_dict()['encoder.' + key]), key


def _geometric_positions(old_side: int, new_side: int) -> np.ndarray:
    """The official rule's source offsets, found here by root finding instead of bisection."""
    n, half = old_side // 2, new_side // 2
    q = brentq(lambda r: (1 - r ** n) / (1 - r) - half, 1.0001, 2.0)
    steps = np.cumsum([q ** i for i in range(n)])
    return np.concatenate([-steps[::-1], [0.0], steps])


def test_bias_tables_of_another_window_follow_the_geometric_rule():
    old_side, new_side = 7, 9  # window 4 -> 5 (the official q stays inside its search range 1.01..1.5)
    pos = _geometric_positions(old_side, new_side)
    y, x = np.meshgrid(pos, pos, indexing='ij')
    # a cubic polynomial of the offsets: the interpolating bicubic spline reproduces it
    cubic = lambda a, b: 0.3 + 0.2 * a - 0.1 * b + 0.05 * a * b + 0.01 * a ** 3 - 0.02 * b ** 2  # noqa: E731
    table = torch.tensor(np.stack([cubic(y, x), -cubic(x, y)], axis=-1).reshape(-1, 2), dtype=torch.float32)
    out = geometric_resize_bias_table(table, new_side)
    t = np.arange(-4.0, 4.1, 1.0)
    ty, tx = np.meshgrid(t, t, indexing='ij')
    expected = np.stack([cubic(ty, tx), -cubic(tx, ty)], axis=-1).reshape(-1, 2)
    assert out.shape == (new_side ** 2, 2)
    assert np.allclose(out.numpy(), expected, atol=1e-3), np.abs(out.numpy() - expected).max()
    # through a fine-tuning load: the file's tables are resized, the rest copied
    pretrained = _simmim()
    torch.manual_seed(5)
    model = SwinTransformer(**dict(TINY, img_size=80, num_classes=7, window_size=5))
    report = fit_weights(model, pretrained.state_dict(), 'simmim.pth', logging.getLogger('test'))
    key = 'layers.0.blocks.0.attn.relative_position_bias_table'
    assert any(r.startswith(key) and r.endswith('geometric') for r in report.resized)
    expected_table = geometric_resize_bias_table(pretrained.state_dict()['encoder.' + key], 9)
    assert torch.equal(model.state_dict()[key], expected_table)


def test_pretraining_param_groups_are_the_official_ones():
    """As the official pre-training groups them: 1-D tensors, biases and encoder.mask_token
    undecayed; the prefixed keywords match nothing, so bias tables are decayed."""
    model = _simmim()
    groups = {g['name']: {id(p) for p in g['params']} for g in build_param_groups(make_config(), model)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[i] for i in groups['no_decay']}
    decay = {names[i] for i in groups['decay']}
    assert 'encoder.mask_token' in no_decay and 'decoder.0.bias' in no_decay
    assert 'decoder.0.weight' in decay and 'encoder.layers.0.blocks.0.attn.relative_position_bias_table' in decay
    assert all(model.get_parameter(n).ndim == 1 or n.endswith('.bias') or n == 'encoder.mask_token' for n in no_decay)

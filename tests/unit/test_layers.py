"""The building blocks compute exactly what their plain forms compute, on the CPU through the
kernels of models.cpu_kernels, whose reused buffers change no result."""
import pytest
import torch
import torch.nn.functional as F

from models.layers import Mlp, add_drop_path, permute_tokens


def plain_mlp(mlp: Mlp, x: torch.Tensor) -> torch.Tensor:
    return mlp.fc2(F.gelu(mlp.fc1(x)))


def grads_of(fn, params, x, g):
    for p in params:
        p.grad = None
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out.backward(g)
    return out.detach(), x.grad, [p.grad.clone() for p in params]


@pytest.mark.parametrize('shape', [(2, 5, 8), (7, 8)])
def test_mlp_forward_and_gradients_equal_the_plain_ops(shape):
    mlp = Mlp(8, 24).double().train()
    x = torch.randn(*shape, dtype=torch.float64)
    g = torch.randn(*shape, dtype=torch.float64)
    out, gx, gp = grads_of(mlp, list(mlp.parameters()), x, g)
    ref, rx, rp = grads_of(lambda t: plain_mlp(mlp, t), list(mlp.parameters()), x, g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    for a, b in zip(gp, rp):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_mlp_under_bf16_autocast_matches_autocast_of_the_plain_ops():
    mlp = Mlp(16, 64).train()
    x = torch.randn(4, 10, 16)
    g = torch.randn(4, 10, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, gx, gp = grads_of(mlp, list(mlp.parameters()), x, g)
        ref, rx, rp = grads_of(lambda t: plain_mlp(mlp, t), list(mlp.parameters()), x, g)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert gx.dtype == torch.float32 and all(p.dtype == torch.float32 for p in gp)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rx, rtol=2e-2, atol=2e-3)
    for a, b in zip(gp, rp):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_mlp_frozen_parameters_get_no_gradient():
    mlp = Mlp(8, 16)
    mlp.fc1.requires_grad_(False)
    x = torch.randn(3, 8, requires_grad=True)
    mlp(x).sum().backward()
    assert mlp.fc1.weight.grad is None and mlp.fc2.weight.grad is not None and x.grad is not None


def test_mlp_inference_and_dropout_paths():
    mlp = Mlp(8, 16, drop=0.5)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(mlp.eval()(x), plain_mlp(mlp, x))
    mlp.train()
    torch.manual_seed(1)
    a = mlp(x)
    torch.manual_seed(1)
    b = mlp.drop(mlp.fc2(mlp.drop(F.gelu(mlp.fc1(x)))))
    torch.testing.assert_close(a, b)


def test_mlp_second_backward_through_reused_buffers_is_refused():
    mlp = Mlp(8, 16)
    out = mlp(torch.randn(3, 8, requires_grad=True)).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        out.backward()


def test_token_permutation_gradcheck():
    index = torch.randperm(6)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(6)
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.equal(permute_tokens(x, index, inverse), x[:, index])
    assert torch.autograd.gradcheck(lambda t: permute_tokens(t, index, inverse), (x,))


def test_add_drop_path_keeps_or_drops_whole_samples():
    x = torch.zeros(2000, 3, 4)
    branch = torch.ones(2000, 3, 4)
    out = add_drop_path(x, branch, 0.25, training=True)
    per_sample = out.view(2000, -1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1))
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.04
    assert torch.equal(add_drop_path(x, branch, 0.25, training=False), x + branch)


# --------------------------------------------------------------------------- window attention

def naive_window_attention(qkv, attn_mask, heads, windows, scale):
    BW, N, C3 = qkv.shape
    C, d = C3 // 3, C3 // 3 // heads
    q, k, v = qkv.view(BW, N, 3, heads, d).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-1, -2)) * scale  # (BW, heads, N, N)
    mask = attn_mask.view(windows, heads, N, N)
    logits = (logits.view(BW // windows, windows, heads, N, N) + mask).view(BW, heads, N, N)
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(BW, N, C)


@pytest.mark.parametrize('windows', [1, 4])
def test_window_attention_with_learnable_mask_matches_naive(windows):
    from models.layers import window_attention
    heads, N, C = 2, 9, 8
    qkv = torch.randn(3 * windows, N, 3 * C, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(1, windows * heads, N, N, dtype=torch.float64, requires_grad=True)
    out = window_attention(qkv, mask, heads, windows, 0.3)
    ref = naive_window_attention(qkv, mask, heads, windows, 0.3)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (qkv, mask), g)
    want = torch.autograd.grad(ref, (qkv, mask), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_window_attention_runs_through_sdpa(monkeypatch):
    import models.layers as layers
    calls = []
    real = layers.F.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, 'scaled_dot_product_attention', lambda *a, **k: calls.append(1) or real(*a, **k))
    qkv = torch.randn(4, 9, 24, requires_grad=True)
    mask = torch.randn(1, 4 * 2, 9, 9, requires_grad=True)
    layers.window_attention(qkv, mask, 2, 4, 0.5).sum().backward()  # learnable mask (CPU backward of ours)
    with torch.no_grad():
        layers.window_attention(qkv, mask, 2, 4, 0.5)
    assert len(calls) == 2 and qkv.grad is not None and mask.grad is not None


def test_window_attention_bf16_gradients_follow_their_inputs():
    from models.layers import window_attention
    qkv = torch.randn(8, 49, 96, requires_grad=True)
    mask = torch.randn(1, 4 * 4, 49, 49, requires_grad=True)
    ref = naive_window_attention(qkv, mask, 4, 4, 32 ** -0.5)
    gq_ref, gm_ref = torch.autograd.grad(ref.sum(), (qkv, mask))
    low = qkv.detach().bfloat16().requires_grad_()
    out = window_attention(low, mask, 4, 4, 32 ** -0.5)
    gq, gm = torch.autograd.grad(out.float().sum(), (low, mask))
    assert out.dtype == gq.dtype == torch.bfloat16 and gm.dtype == torch.float32
    assert ((out.float() - ref).norm() / ref.norm()) < 2e-2
    assert ((gq.float() - gq_ref).norm() / gq_ref.norm()) < 3e-2
    assert ((gm - gm_ref).norm() / gm_ref.norm()) < 3e-2


def test_mlp_reuses_its_buffers_across_steps_without_changing_results():
    import copy
    mlp = Mlp(8, 32).double().train()
    params = list(mlp.parameters())
    seen = set()
    for _ in range(3):
        x = torch.randn(5, 8, dtype=torch.float64)
        g = torch.randn(5, 8, dtype=torch.float64)
        out, gx, gp = grads_of(mlp, params, x, g)
        ref, rx, rp = grads_of(lambda t: plain_mlp(mlp, t), params, x, g)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(gx, rx)
        for a, b in zip(gp, rp):
            torch.testing.assert_close(a, b)
        seen |= {b.data_ptr() for b in mlp.spares._free}
    assert len(mlp.spares._free) == 2 and len(seen) == 2  # the same two buffers every step
    assert copy.deepcopy(mlp).spares._free == []
    mlp.eval()
    assert mlp.spares._free == []


def test_spare_buffers_keep_the_newest_and_match_by_size():
    from models.cpu_kernels import SpareBuffers
    spares = SpareBuffers(capacity=2)
    a, b, c = torch.empty(6), torch.empty(6), torch.empty(3)
    spares.give(a, b, c, torch.empty(4, 4).t())  # the non-contiguous one is refused
    assert [t.data_ptr() for t in spares._free] == [b.data_ptr(), c.data_ptr()]
    got = spares.take((2, 3), torch.float32, torch.device('cpu'))
    assert got.shape == (2, 3) and got.data_ptr() == b.data_ptr()
    assert spares.take((2, 3), torch.float64, torch.device('cpu')).dtype == torch.float64  # no match: new
    none = SpareBuffers(capacity=0)
    none.give(a)
    assert none._free == []


def test_window_attention_reuses_its_buffers_across_steps():
    from models.cpu_kernels import SpareBuffers
    from models.layers import window_attention
    spares = SpareBuffers(capacity=6)
    qkv = torch.randn(8, 9, 24, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(1, 4 * 2, 9, 9, dtype=torch.float64, requires_grad=True)
    ref = naive_window_attention(qkv, mask, 2, 4, 0.4)
    want = torch.autograd.grad(ref.square().sum(), (qkv, mask))
    for _ in range(3):
        out = window_attention(qkv, mask, 2, 4, 0.4, spares=spares)
        got = torch.autograd.grad(out.square().sum(), (qkv, mask))
        torch.testing.assert_close(out, ref)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    assert len(spares._free) >= 4


@pytest.mark.parametrize('batch', [3, 700])
def test_sum_over_batch_accumulates_in_the_wider_dtype(batch):
    from models.cpu_kernels import _sum_over_batch
    x = torch.randn(batch, 2, 40, 40).bfloat16()
    got = _sum_over_batch(x, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (1, 2, 40, 40)
    torch.testing.assert_close(got, x.float().sum(0, keepdim=True), rtol=1e-5, atol=1e-4)


def test_spare_buffers_are_released_in_eval_and_start_empty_in_copies():
    import copy
    import pickle

    from models.swin_transformer import SwinTransformer
    model = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=[2], num_heads=[2],
                            num_classes=3).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    spares = [m for name, m in model.named_modules() if name.endswith('spares')]
    assert len(spares) == 4 and all(s._free for s in spares)  # attention and MLP of both blocks
    assert model.state_dict().keys() == SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16,
                                                        depths=[2], num_heads=[2], num_classes=3).state_dict().keys()
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other.training and all(not m._free for name, m in other.named_modules() if name.endswith('spares'))
    model.eval()
    assert all(not s._free for s in spares)


def test_cpu_kernels_run_only_for_cpu_tensors_in_eager_mode():
    from models import cpu_kernels
    assert cpu_kernels.applies_to(torch.ones(1))
    assert not cpu_kernels.applies_to(torch.ones(1, device='meta'))
    mlp = Mlp(8, 16)
    out = mlp.to('meta')(torch.ones(3, 8, device='meta', requires_grad=True))  # plain ops off the CPU
    assert out.shape == (3, 8) and 'GeluMlp' not in out.grad_fn.name()


def test_mlp_dropout_applies_in_training_mode_without_gradients():
    mlp = Mlp(8, 16, drop=0.5).train()
    x = torch.randn(3, 8)
    torch.manual_seed(1)
    with torch.no_grad():
        a = mlp(x)
    torch.manual_seed(1)
    torch.testing.assert_close(a, mlp.drop(mlp.fc2(mlp.drop(F.gelu(mlp.fc1(x))))))

"""Swin-MoE in one process: routing (top-k, capacity, drops, batch-prioritized order), the
auxiliary losses, gates, the MoE layer against a per-token reference and a dense MLP, and the
model's outputs, keys and FLOPs."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from models.layers import Mlp
from models.moe_layer import (
    FusedExperts,
    LocalDispatch,
    MoELayer,
    capacity_of,
    gshard_loss,
    load_importance_loss,
    route,
)
from models.swin_transformer_moe import SwinTransformerMoE

TINY_MOE = dict(img_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                num_classes=5, drop_path_rate=0., dispatch=LocalDispatch())


def layer(**kw) -> MoELayer:
    options = dict(model_dim=8, hidden_dim=12, num_local_experts=4, dispatch=LocalDispatch())
    return MoELayer(**{**options, **kw})


def test_route_takes_the_top_k_experts_with_their_scores():
    scores = torch.randn(10, 5).softmax(1)
    r = route(scores, top_k=2, capacity_factor=0.)  # factor 0: room for every choice
    expected = scores.argsort(1, descending=True)[:, :2]
    assert torch.equal(r.experts, expected)
    assert torch.allclose(r.gates, scores.gather(1, expected))  # not normalized by default
    assert r.kept.all()
    normalized = route(scores, top_k=2, capacity_factor=0., normalize_gate=True)
    assert torch.allclose(normalized.gates.sum(1), torch.ones(10))
    single = route(scores, top_k=1, capacity_factor=0., normalize_gate=True)  # Tutel: only for k > 1
    assert torch.allclose(single.gates[:, 0], scores.max(1).values)


def test_capacity_rule():
    assert capacity_of(10, 4, 2, 1.25, slots_needed=0) == 2 * int(1.25 * 3)
    assert capacity_of(10, 4, 1, 0., slots_needed=7) == 7
    assert capacity_of(10, 4, 1, -1., slots_needed=7) == 3  # min(needed, the factor's share)
    assert capacity_of(10, 4, 1, -1., slots_needed=2) == 2
    # the capacity is a share of `num_tokens` when given (ranks agreeing on their largest count)
    assert route(torch.rand(10, 4).softmax(1), 1, 1.0, num_tokens=16).capacity == 4
    assert route(torch.rand(10, 4).softmax(1), 1, 1.0).capacity == 3


def test_choices_beyond_capacity_are_dropped_in_token_order():
    scores = torch.tensor([[0.9, 0.1]] * 8)  # every token wants expert 0
    r = route(scores, top_k=1, capacity_factor=1.)  # capacity 4
    assert r.capacity == 4
    assert r.slots[:, 0].tolist() == list(range(8))
    assert r.kept[:, 0].tolist() == [True] * 4 + [False] * 4


def test_batch_prioritized_routing_keeps_the_highest_scores():
    top = torch.tensor([0.6, 0.9, 0.7, 0.95, 0.55, 0.8, 0.65, 0.85])
    scores = torch.stack([top, 1 - top], dim=1)
    r = route(scores, top_k=1, capacity_factor=1., batch_prioritized=True)
    kept = r.kept[:, 0].nonzero().flatten().tolist()
    assert sorted(kept) == top.argsort(descending=True)[:4].sort().values.tolist()
    assert r.slots[3, 0] == 0 and r.slots[1, 0] == 1  # 0.95 first, then 0.9


def test_second_choices_queue_after_all_first_choices():
    scores = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]])
    r = route(scores, top_k=2, capacity_factor=0.)
    # expert 0: first choices of tokens 0 and 2 (slots 0, 1), then token 1's second choice (slot 2)
    assert r.experts.tolist() == [[0, 1], [1, 0], [0, 1]]
    assert r.slots.tolist() == [[0, 1], [0, 2], [1, 2]]


def test_gshard_loss_is_the_balance_formula_and_minimal_when_uniform():
    scores = torch.randn(12, 4).softmax(1)
    top1 = scores.argmax(1)
    fraction = torch.bincount(top1, minlength=4).float() / 12
    assert torch.allclose(gshard_loss(scores, top1), 4 * (scores.mean(0) * fraction).sum())
    uniform = torch.full((12, 4), 0.25)
    assert torch.allclose(gshard_loss(uniform, torch.arange(12) % 4), torch.tensor(1.))
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 12)
    assert gshard_loss(skewed, torch.zeros(12, dtype=torch.long)) > 2.5


def test_load_importance_loss_matches_the_normal_cdf_formula():
    logits = torch.randn(16, 4)
    noisy = logits + 0.3 * torch.randn(16, 4)
    clean = logits.softmax(1)
    topk = noisy.topk(2, dim=1).values
    importance = clean.sum(0)
    normal = torch.distributions.Normal(0., 1.0 / 4)
    load = normal.cdf(clean - topk[:, -1:]).sum(0)
    expected = (importance.var() / importance.mean() ** 2 + load.var() / load.mean() ** 2) / 2
    assert torch.allclose(load_importance_loss(clean, topk, gate_noise=1.0), expected, atol=1e-6)


def test_gate_noise_only_in_training():
    moe = layer(gate_noise=1.0)
    x = torch.randn(6, 8)
    moe.eval()
    clean = moe.scores_and_loss(x)[0]
    assert torch.equal(clean, moe.scores_and_loss(x)[0])
    assert torch.allclose(clean, F.linear(x, moe.gates[0].wg.weight).softmax(1))
    moe.train()
    assert not torch.allclose(moe.scores_and_loss(x)[0], clean)
    assert torch.allclose(layer(gate_noise=0.).train().scores_and_loss(x)[0].sum(1), torch.ones(6))


def test_cosine_router_logits():
    moe = layer(cosine_router=True, cosine_router_dim=6, cosine_router_init_t=0.5).eval()
    gate = moe.gates[0]
    x = torch.randn(5, 8)
    proj = gate.cosine_projector(x)
    cos = (proj / proj.norm(dim=1, keepdim=True)) @ (gate.sim_matrix / gate.sim_matrix.norm(dim=0))
    assert torch.allclose(gate(x), cos * 2.0, atol=1e-6)  # exp(log(1 / 0.5))
    with torch.no_grad():
        gate.temperature.fill_(10.)  # clamped at log(100)
    assert torch.allclose(gate(x), cos * 100., atol=1e-4)
    assert set(dict(moe.named_parameters())) >= {'gates.0.temperature', 'gates.0.cosine_projector.weight',
                                                 'gates.0.sim_matrix'}


def per_token_reference(moe: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Each token alone: the gate-weighted sum of its kept experts' MLPs."""
    scores, _ = moe.scores_and_loss(x)
    r = route(scores, moe.top_k, moe.capacity_factor, moe.batch_prioritized_routing, moe.normalize_gate)
    e = moe.experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(r.experts.shape[1]):
            if r.kept[t, k]:
                i = r.experts[t, k]
                h = F.gelu(x[t] @ e.batched_fc1_w[i].T + e.batched_fc1_bias[i])
                out[t] += r.gates[t, k] * (h @ e.batched_fc2_w[i] + e.batched_fc2_bias[i])
    return out


@pytest.mark.parametrize('top_k,factor,bpr', [(1, 1.0, True), (2, 0.5, False), (2, 1.25, True), (1, -0.5, False)])
def test_moe_layer_equals_the_per_token_reference(top_k, factor, bpr):
    moe = layer(top_k=top_k, capacity_factor=factor, batch_prioritized_routing=bpr, normalize_gate=True).eval()
    with torch.no_grad():
        moe.experts.batched_fc1_bias.normal_()
        moe.experts.batched_fc2_bias.normal_()
    x = torch.randn(2, 9, 8)
    y, _ = moe(x)
    expected = per_token_reference(moe, x.view(-1, 8)).view_as(x)
    assert torch.allclose(y, expected, atol=1e-6)
    dropped = ~route(moe.scores_and_loss(x.view(-1, 8))[0], top_k, factor, bpr).kept.any(1)
    assert torch.equal(y.view(-1, 8)[dropped], torch.zeros_like(y.view(-1, 8)[dropped]))  # the residual carries them


def test_one_expert_with_room_for_all_is_the_dense_mlp():
    moe = layer(num_local_experts=1, capacity_factor=0.).eval()
    dense = Mlp(8, 12)
    e = moe.experts
    with torch.no_grad():
        e.batched_fc1_bias.normal_()
        e.batched_fc2_bias.normal_()
        dense.fc1.weight.copy_(e.batched_fc1_w[0])
        dense.fc1.bias.copy_(e.batched_fc1_bias[0])
        dense.fc2.weight.copy_(e.batched_fc2_w[0].T)
        dense.fc2.bias.copy_(e.batched_fc2_bias[0])
    x = torch.randn(3, 7, 8)
    assert torch.allclose(moe(x)[0], dense(x), atol=1e-6)


def test_model_forward_backward_and_aux_loss():
    model = SwinTransformerMoE(**TINY_MOE, moe_blocks=[[1], [0, 1]], num_local_experts=4, top_value=2)
    logits, l_aux = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 5) and l_aux.ndim == 0 and l_aux > 0
    (logits.sum() + l_aux).backward()
    gate = model.layers[1].blocks[0].mlp._moe_layer.gates[0].wg.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    dense = SwinTransformerMoE(**TINY_MOE)
    assert dense(torch.randn(1, 3, 32, 32))[1].item() == 0.
    # the weighted sum of the blocks' losses (eval: no noise, so a second pass is the same)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    _, weighted = model(x)
    _, raw = model.forward_features(x)
    blocks = [model.layers[0].blocks[1], model.layers[1].blocks[0], model.layers[1].blocks[1]]
    assert all(blk.is_moe for blk in blocks) and not model.layers[0].blocks[0].is_moe
    assert raw > 0 and torch.allclose(weighted, 0.01 * raw)


def test_gradient_checkpointing_keeps_the_aux_loss_and_gradients():
    torch.manual_seed(1)
    model = SwinTransformerMoE(**TINY_MOE, moe_blocks=[[1], [1]], num_local_experts=2)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        torch.manual_seed(2)  # same gate noise
        logits, l_aux = model(x)
        (logits.sum() + 100 * l_aux).backward()
        grads.append(model.layers[1].blocks[1].mlp._moe_layer.gates[0].wg.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_state_dict_keys_follow_the_official_names():
    model = SwinTransformerMoE(**TINY_MOE, moe_blocks=[[-1], [1]], num_local_experts=3, mlp_fc2_bias=False)
    sd = model.state_dict()
    moe = 'layers.1.blocks.1.mlp._moe_layer.'
    assert {k for k in sd if k.startswith('layers.1.blocks.1.mlp.')} == {
        moe + '_num_global_experts', moe + 'gates.0.wg.weight', moe + 'experts.batched_fc1_w',
        moe + 'experts.batched_fc2_w', moe + 'experts.batched_fc1_bias', moe + 'experts.batched_fc2_bias'}
    assert sd[moe + 'experts.batched_fc1_w'].shape == (3, 128, 32)
    assert sd[moe + 'experts.batched_fc2_bias'].shape == (3, 32)
    assert not model.layers[1].blocks[1].mlp._moe_layer.experts.batched_fc2_bias.requires_grad
    assert {k for k in sd if k.startswith('layers.0.blocks.1.mlp.')} == {
        'layers.0.blocks.1.mlp.fc1.weight', 'layers.0.blocks.1.mlp.fc1.bias', 'layers.0.blocks.1.mlp.fc2.weight'}
    attn = {k.split('attn.')[1] for k in sd if k.startswith('layers.0.blocks.0.attn.')}
    assert attn == {'relative_position_index', 'relative_coords_table', 'cpb_mlp.0.weight', 'cpb_mlp.0.bias',
                    'cpb_mlp.2.weight', 'qkv.weight', 'qkv.bias', 'proj.weight', 'proj.bias'}
    # files of older Tutel lack the expert count: they still load strictly
    del sd[moe + '_num_global_experts']
    model.load_state_dict(sd)
    assert model._ddp_params_and_buffers_to_ignore == []  # one process: experts are ordinary weights
    assert all(getattr(p, 'skip_allreduce', False) for n, p in model.named_parameters() if 'experts.' in n)


def test_flops_count_moe_blocks_as_capacity_times_k_mlps():
    dense = SwinTransformerMoE(**TINY_MOE)
    moe = SwinTransformerMoE(**TINY_MOE, moe_blocks=[[0], [-1]], top_value=2, capacity_factor=1.25)
    H = W = 8
    mlp = 2 * H * W * 16 * 16 * 4
    assert math.isclose(moe.flops() - dense.flops(), mlp * (1.25 * 2 - 1))


class FakeRanks(LocalDispatch):
    """A dispatch that reports a world of several ranks: enough to build (not run) a layer."""

    def __init__(self, world_size: int, rank: int):
        self.world_size, self.rank = world_size, rank


@pytest.mark.parametrize('n,rank', [(2, 3), (4, 1)])
def test_sharded_experts_hold_tutels_per_rank_shapes(n, rank):
    """-n: one expert over n ranks; each rank holds slice rank % n of its hidden layer and of
    fc2's bias (Tutel's shapes, so official per-rank checkpoints load), outside DDP."""
    moe = layer(num_local_experts=-n, dispatch=FakeRanks(4, rank))  # dim 8, hidden 12
    assert moe.num_global_experts == 4 // n and moe.shards == n and moe.experts.shard_index == rank % n
    shapes = {name: tuple(p.shape) for name, p in moe.experts.named_parameters()}
    assert shapes == {'batched_fc1_w': (1, 12 // n, 8), 'batched_fc2_w': (1, 12 // n, 8),
                      'batched_fc1_bias': (1, 12 // n), 'batched_fc2_bias': (1, 8 // n)}
    assert all(getattr(p, 'skip_allreduce', False) for p in moe.experts.parameters())
    model = SwinTransformerMoE(**{**TINY_MOE, 'dispatch': FakeRanks(4, rank)}, moe_blocks=[[1], [1]],
                               num_local_experts=-n)
    experts = [name for name, _ in model.named_parameters() if '.experts.' in name]
    assert len(experts) == 8 and sorted(model._ddp_params_and_buffers_to_ignore) == sorted(experts)


def test_sharded_experts_need_a_world_size_multiple_of_n():
    with pytest.raises(ValueError, match=r'NUM_LOCAL_EXPERTS -3 .* world size 4 is not a multiple of 3'):
        layer(num_local_experts=-3, dispatch=FakeRanks(4, 0))
    with pytest.raises(ValueError, match='hidden size 12 cannot be split into 8'):
        layer(num_local_experts=-8, dispatch=FakeRanks(8, 0))
    with pytest.raises(ValueError, match='NUM_LOCAL_EXPERTS must not be 0'):
        layer(num_local_experts=0)


def test_one_process_holds_a_whole_sharded_expert():
    """World size 1 (building or evaluating an official -4 config in one process): nothing to
    shard over, the process holds the whole expert."""
    moe = layer(num_local_experts=-4)
    assert moe.num_global_experts == 1 and moe.shards == 1
    assert moe.experts.batched_fc1_w.shape == (1, 12, 8) and moe.experts.batched_fc2_bias.shape == (1, 8)


@pytest.mark.parametrize('n', [2, 3])
def test_shard_outputs_sum_to_the_whole_expert(n):
    """The partial outputs of an expert's n hidden slices add up to the expert's output, fc2's
    bias once (each shard adds its own slice; with 3 shards of dim 8 the last is padded)."""
    whole = FusedExperts(2, 8, 12)
    with torch.no_grad():
        whole.batched_fc1_bias.normal_()
        whole.batched_fc2_bias.normal_()
    x = torch.randn(2, 5, 8)
    width = -(-8 // n)
    total = 0
    for s in range(n):
        shard = FusedExperts(2, 8, 12, shards=n, shard_index=s)
        hidden = slice(s * 12 // n, (s + 1) * 12 // n)
        bias = F.pad(whole.batched_fc2_bias.detach(), (0, n * width - 8))[:, s * width:(s + 1) * width]
        shard.load_state_dict({'batched_fc1_w': whole.batched_fc1_w[:, hidden], 'batched_fc2_w':
                               whole.batched_fc2_w[:, hidden], 'batched_fc1_bias': whole.batched_fc1_bias[:, hidden],
                               'batched_fc2_bias': bias})
        total = total + shard(x)
    torch.testing.assert_close(total, whole(x), rtol=1e-5, atol=1e-5)


def test_load_importance_loss_of_a_single_expert_is_zero_not_nan():
    scores = torch.ones(5, 1)
    loss = load_importance_loss(scores, torch.randn(5, 1), gate_noise=1.0)
    assert loss.item() == 0.0


def test_a_copied_model_shares_its_dispatch():
    """The EMA deep-copies the model; the process group the dispatch holds cannot be copied,
    and the copy must exchange tokens over the same ranks."""
    model = SwinTransformerMoE(**TINY_MOE, moe_blocks=[[1], [1]], num_local_experts=2)
    clone = copy.deepcopy(model)
    assert clone.dispatch is model.dispatch
    assert clone.layers[0].blocks[1].mlp._moe_layer.dispatch is model.dispatch
    assert clone.layers[0].blocks[1].mlp._moe_layer.experts.batched_fc1_w is not \
        model.layers[0].blocks[1].mlp._moe_layer.experts.batched_fc1_w

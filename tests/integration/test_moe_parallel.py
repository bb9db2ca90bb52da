"""Expert parallelism on 2 gloo processes: each rank holds half the experts, tokens travel by
all-to-all, and outputs, auxiliary losses and gradients equal those of one process holding all
experts with the same weights, run on each rank's half of the batch. Likewise for one expert
shared by both ranks (NUM_LOCAL_EXPERTS -2), each holding half its hidden layer: each rank's
shard gradients equal the matching slices of the one-process gradients.

This file is both the test and, run under torch.distributed.run, the worker."""
import json
import os
import subprocess
import sys

CONFIGS = {
    # top-2, capacity for half the choices (tokens are dropped), batch-prioritized, GShard loss
    'top2_drops': dict(top_value=2, capacity_factor=0.5, use_bpr=True, is_gshard_loss=True, normalize_gate=True),
    # top-1, capacity agreed over the ranks (factor 0), cosine router, importance + load loss
    'top1_cosine': dict(top_value=1, capacity_factor=0., use_bpr=False, is_gshard_loss=False, cosine_router=True,
                        cosine_router_dim=8),
}
GLOBAL_EXPERTS = 4


def test_expert_parallel_equals_one_process(tmp_path):
    from helpers.runs import ROOT, free_port
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                             '--master_port', str(free_port()), os.path.abspath(__file__), str(tmp_path)],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    for r, outcome in enumerate(ranks):
        assert outcome.pop('uneven_eval') == {'shape': [1 + r, 5], 'finite': True}
        assert set(outcome) == set(CONFIGS) | {'sharded'}, outcome
        for name, diffs in outcome.items():
            assert diffs['compared_grads'] > 20, (r, name)
            for what in ('logits', 'l_aux', 'grads', 'expert_grads'):
                assert diffs[what] < 1e-5, (r, name, what, diffs)
            assert diffs['l_aux_value'] > 0


# --- the worker ------------------------------------------------------------------------------

def _build(options: dict, local_experts: int, dispatch):
    from models.swin_transformer_moe import SwinTransformerMoE
    return SwinTransformerMoE(img_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                              window_size=4, num_classes=5, drop_path_rate=0., moe_blocks=[[1], [0, 1]],
                              num_local_experts=local_experts, gate_noise=1.0, dispatch=dispatch, **options)


def _loss(model, x, head_weight, seed):
    import torch
    torch.manual_seed(seed)  # the same gate noise in both models
    logits, l_aux = model(x)
    return logits, l_aux, (logits * head_weight).sum() + 10 * l_aux


def _reference_run(reference, halves, head_weight, rank: int):
    """The one-process model on each rank's half in turn (capacity is per rank's tokens, as in
    parallel): its gradients (experts' summed over the halves) and its outputs on ours."""
    grads, ref_out = {}, None
    for r in range(len(halves)):
        reference.zero_grad()
        logits, l_aux, loss = _loss(reference, halves[r], head_weight, seed=100 + r)
        loss.backward()
        for n, p in reference.named_parameters():
            if p.grad is not None:
                key = (n, r if '.experts.' not in n else 'sum')
                grads[key] = grads.get(key, 0) + p.grad.clone()
        if r == rank:
            ref_out = (logits.detach(), l_aux.detach())
    return grads, ref_out


def _diffs(parallel, x, head_weight, rank: int, grads: dict, ref_out, mine) -> dict:
    """The parallel model's outputs and gradients against the reference's; `mine(name, tensor)`
    is this rank's part of a reference expert tensor."""
    logits, l_aux, loss = _loss(parallel, x, head_weight, seed=100 + rank)
    loss.backward()
    diff = {'logits': (logits - ref_out[0]).abs().max().item(), 'l_aux': (l_aux - ref_out[1]).abs().item(),
            'l_aux_value': l_aux.item(), 'grads': 0., 'expert_grads': 0., 'compared_grads': 0}
    for n, p in parallel.named_parameters():
        if p.grad is None:
            continue
        expert = '.experts.' in n
        expected = mine(n, grads[(n, 'sum')]) if expert else grads[(n, rank)]
        key = 'expert_grads' if expert else 'grads'
        diff[key] = max(diff[key], (p.grad - expected).abs().max().item())
        diff['compared_grads'] += 1
    return diff


def _compare(options: dict, rank: int, world: int) -> dict:
    """One config: the reference (all experts here) on each half, the expert-parallel model on ours."""
    import torch

    from models.moe_layer import AllToAllDispatch, LocalDispatch
    torch.manual_seed(0)
    reference = _build(options, GLOBAL_EXPERTS, LocalDispatch()).train()
    parallel = _build(options, GLOBAL_EXPERTS // world, AllToAllDispatch()).train()
    local = GLOBAL_EXPERTS // world
    rows = slice(rank * local, (rank + 1) * local)
    parallel.load_state_dict({k: (v[rows] if '.experts.' in k else v) for k, v in reference.state_dict().items()})
    x, head_weight = torch.randn(2 * world, 3, 32, 32), torch.randn(5)
    halves = x.chunk(world)
    grads, ref_out = _reference_run(reference, halves, head_weight, rank)
    return _diffs(parallel, halves[rank], head_weight, rank, grads, ref_out, lambda n, t: t[rows])


def _shard_of(tensor, rank: int, world: int):
    """Rank's slice of one whole expert tensor: of the hidden dimension (dim 1), or of the
    output columns for fc2's bias."""
    width = tensor.shape[1] // world
    return tensor[:, rank * width:(rank + 1) * width]


def _compare_sharded(options: dict, rank: int, world: int) -> dict:
    """NUM_LOCAL_EXPERTS -world: one expert shared by every rank, each holding a slice of its
    hidden layer, against one process holding the whole expert with the same weights."""
    import torch

    from models.moe_layer import AllToAllDispatch, LocalDispatch
    torch.manual_seed(0)
    reference = _build(options, 1, LocalDispatch()).train()
    with torch.no_grad():  # biases that are not 0, so that fc2's is seen to be added once
        for n, p in reference.named_parameters():
            if '.experts.' in n and 'bias' in n:
                p.normal_()
    parallel = _build(options, -world, AllToAllDispatch()).train()
    state = {k: (_shard_of(v, rank, world) if '.experts.' in k else v) for k, v in reference.state_dict().items()}
    parallel.load_state_dict(state)
    assert parallel.layers[0].blocks[1].mlp._moe_layer.experts.batched_fc1_w.shape == (1, 64 // world, 16)
    x, head_weight = torch.randn(2 * world, 3, 32, 32), torch.randn(5)
    halves = x.chunk(world)
    grads, ref_out = _reference_run(reference, halves, head_weight, rank)
    return _diffs(parallel, halves[rank], head_weight, rank, grads, ref_out,
                  lambda n, t: _shard_of(t, rank, world))


def _uneven_eval(rank: int, world: int) -> dict:
    """A last validation batch of a different size per rank: the ranks agree on one capacity
    (else the all-to-all splits differ and the exchange fails or hangs)."""
    import torch

    from models.moe_layer import AllToAllDispatch
    torch.manual_seed(0)
    model = _build(CONFIGS['top2_drops'], GLOBAL_EXPERTS // world, AllToAllDispatch()).eval()
    with torch.no_grad():
        logits, l_aux = model(torch.randn(1 + rank, 3, 32, 32))
    return {'shape': list(logits.shape), 'finite': bool(torch.isfinite(logits).all() and torch.isfinite(l_aux))}


def _worker(out_dir: str) -> None:
    import torch.distributed as dist

    # imported before the group starts, as main.py does: imported after, timm's import chain
    # keeps a reference to the default group past destroy_process_group, its gloo threads then
    # live into interpreter exit and the process may abort ('terminate called without an
    # active exception') after a correct run
    import models.swin_transformer_moe  # noqa: F401
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    outcome = {name: _compare(options, rank, world) for name, options in CONFIGS.items()}
    outcome['sharded'] = _compare_sharded(CONFIGS['top2_drops'], rank, world)
    outcome['uneven_eval'] = _uneven_eval(rank, world)
    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(outcome, f)
    dist.destroy_process_group()


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    _worker(sys.argv[1])

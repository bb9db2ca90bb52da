"""Expert parallelism on 2 gloo processes: each rank holds half the experts, tokens travel by
all-to-all, and outputs, auxiliary losses and gradients equal those of one process holding all
experts with the same weights, run on each rank's half of the batch.

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
        assert set(outcome) == set(CONFIGS), outcome
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


def _compare(options: dict, rank: int, world: int) -> dict:
    """One config: the reference (all experts here) on each half, the expert-parallel model on ours."""
    import torch

    from models.moe_layer import AllToAllDispatch, LocalDispatch
    torch.manual_seed(0)
    reference = _build(options, GLOBAL_EXPERTS, LocalDispatch()).train()
    parallel = _build(options, GLOBAL_EXPERTS // world, AllToAllDispatch()).train()
    local = GLOBAL_EXPERTS // world
    mine = slice(rank * local, (rank + 1) * local)
    state = {k: (v[mine] if '.experts.' in k else v) for k, v in reference.state_dict().items()}
    parallel.load_state_dict(state)
    x, head_weight = torch.randn(2 * world, 3, 32, 32), torch.randn(5)
    halves = x.chunk(world)

    grads, ref_out = {}, None
    for r in range(world):  # one half at a time: capacity is per rank's tokens, as in parallel
        reference.zero_grad()
        logits, l_aux, loss = _loss(reference, halves[r], head_weight, seed=100 + r)
        loss.backward()
        for n, p in reference.named_parameters():
            if p.grad is not None:
                key = (n, r if '.experts.' not in n else 'sum')
                grads[key] = grads.get(key, 0) + p.grad.clone()
        if r == rank:
            ref_out = (logits.detach(), l_aux.detach())

    logits, l_aux, loss = _loss(parallel, halves[rank], head_weight, seed=100 + rank)
    loss.backward()
    diff = {'logits': (logits - ref_out[0]).abs().max().item(), 'l_aux': (l_aux - ref_out[1]).abs().item(),
            'l_aux_value': l_aux.item(), 'grads': 0., 'expert_grads': 0., 'compared_grads': 0}
    for n, p in parallel.named_parameters():
        if p.grad is None:
            continue
        expert = '.experts.' in n
        expected = grads[(n, 'sum')][mine] if expert else grads[(n, rank)]
        key = 'expert_grads' if expert else 'grads'
        diff[key] = max(diff[key], (p.grad - expected).abs().max().item())
        diff['compared_grads'] += 1
    return diff


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
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    outcome = {name: _compare(options, rank, world) for name, options in CONFIGS.items()}
    outcome['uneven_eval'] = _uneven_eval(rank, world)
    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(outcome, f)
    dist.destroy_process_group()


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    _worker(sys.argv[1])

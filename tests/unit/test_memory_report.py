"""The start-up memory estimate: exact parameter, gradient and optimizer-state bytes for
each parallelism, the activation estimate (fake tensors at batch 1 and 2, extrapolated)
against what a real CPU forward at the target batch saves for backward, and the log lines."""
import math
import types

import pytest
import torch

import models
from config import default_config
from distributed import memory_report as mr

IMG = 32


def tiny_config(model_type='swin', batch=6, parallel='ddp', optimizer='adamw', checkpoint=False, freeze=0):
    c = default_config()
    c.defrost()
    c.MODEL.TYPE = model_type
    c.DATA.IMG_SIZE = IMG
    c.DATA.BATCH_SIZE = batch
    c.MODEL.NUM_CLASSES = 10
    c.MODEL.DROP_PATH_RATE = 0.0
    arch = c.MODEL.SWIN if model_type == 'swin' else c.MODEL.SWINV2
    arch.EMBED_DIM = 16
    arch.DEPTHS = [2, 4]
    arch.NUM_HEADS = [2, 4]
    arch.WINDOW_SIZE = 4
    c.TRAIN.PARALLEL = parallel
    c.TRAIN.OPTIMIZER.NAME = optimizer
    c.TRAIN.USE_CHECKPOINT = checkpoint
    c.TRAIN.FREEZE_STAGES = freeze
    return c


def build(config):
    model = models.build_model(config)
    model.freeze(config.TRAIN.FREEZE_STAGES, config.TRAIN.LINEAR_PROBE)
    return model.train()


def blocks_of(model):
    return [blk for layer in model.layers for blk in layer.blocks]


def real_saved_bytes(model, batch, amp_dtype=None, per_block=False):
    """What a real CPU forward at `batch` keeps for backward, counted once per storage:
    the tensors autograd saves (seen by saved_tensors_hooks) plus, for checkpointed blocks,
    the block inputs the checkpoint keeps to recompute from. With `per_block`, also the
    bytes first saved inside each block (for the recomputation peak)."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen, held = {}, []
    where = [None]
    inside = [dict() for _ in blocks_of(model)]
    inputs = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own and s.data_ptr() not in seen:
            seen[s.data_ptr()] = s.nbytes()
            if where[0] is not None:
                inside[where[0]][s.data_ptr()] = s.nbytes()
        held.append(t)
        return t

    handles = []
    for i, blk in enumerate(blocks_of(model)):
        def enter(m, args, i=i):
            where[0] = i
            inputs[args[0].untyped_storage().data_ptr()] = args[0].untyped_storage().nbytes()
            held.append(args[0])
        handles.append(blk.register_forward_pre_hook(enter))
        handles.append(blk.register_forward_hook(lambda m, a, o: where.__setitem__(0, None)))
    x = torch.randn(batch, 3, IMG, IMG)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast('cpu', dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        model(x).sum()
    for h in handles:
        h.remove()
    if any(layer.use_checkpoint for layer in model.layers):
        seen.update(inputs)  # kept alive by the checkpoints, not by saved_tensors_hooks
    total = sum(seen.values())
    if per_block:
        return total, [sum(v for k, v in b.items() if k not in inputs) for b in inside]
    return total


def within(estimate, reference, tol=0.15):
    return abs(estimate - reference) <= tol * reference


# ---------------------------------------------------------------------------------------
# (1) parameters, gradients, optimizer state: exact arithmetic

@pytest.mark.parametrize('optimizer,k', [('adamw', 2), ('sgd', 1)])
@pytest.mark.parametrize('parallel', ['ddp', 'zero', 'fsdp'])
def test_state_bytes_are_exact(parallel, optimizer, k):
    config = tiny_config(parallel=parallel, optimizer=optimizer, freeze=1)
    model = build(config)
    params = list(model.parameters())
    P = sum(p.numel() for p in params) * 4
    T = sum(p.numel() for p in params if p.requires_grad) * 4
    assert 0 < T < P  # stage 0 and the patch embedding are frozen
    est = mr.estimate_memory(model, config, 2, None)
    if parallel == 'ddp':
        assert (est.params, est.grads, est.optimizer_state) == (P, T, k * T)
    elif parallel == 'zero':
        assert (est.params, est.grads, est.optimizer_state) == (P, T, math.ceil(k * T / 2))
    else:
        def shard(p):
            return math.ceil(p.shape[0] / 2) * math.prod(p.shape[1:]) * 4 if p.dim() else 4
        units = [sum(q.numel() for q in blk.parameters()) for blk in blocks_of(model)]
        root = sum(p.numel() for p in params) - sum(units)
        gathered = (root + sum(sorted(units)[-2:])) * 4
        sharded_grads = sum(shard(p) for p in params if p.requires_grad)
        assert est.params == sum(shard(p) for p in params) + gathered
        assert (est.grads, est.optimizer_state) == (sharded_grads, k * sharded_grads)
        assert est.params < P
    assert est.total == est.params + est.grads + est.optimizer_state + est.activations
    assert (est.parallel, est.world_size, est.optimizer, est.batch) == (parallel, 2, optimizer, 6)


def test_fsdp_offload_and_mixed_precision():
    config = tiny_config(parallel='fsdp', freeze=0)
    model = build(config)
    units = [sum(q.numel() for q in blk.parameters()) for blk in blocks_of(model)]
    root = sum(p.numel() for p in model.parameters()) - sum(units)
    plain = mr.estimate_memory(model, config, 4, torch.bfloat16)
    config.TRAIN.FSDP.CPU_OFFLOAD = True
    off = mr.estimate_memory(model, config, 4, torch.bfloat16)
    gathered = (root + sum(sorted(units)[-2:])) * 2  # gathered in bf16
    assert off.params == gathered and off.grads == 0 and off.optimizer_state == 0
    assert off.host_bytes == plain.params - gathered + plain.grads + plain.optimizer_state
    assert off.total < plain.total
    assert any('offload' in n for n in off.notes)


def test_sgd_without_momentum_and_ema():
    config = tiny_config(optimizer='sgd')
    config.TRAIN.OPTIMIZER.MOMENTUM = 0.0
    config.TRAIN.OPTIMIZER.NESTEROV = False
    config.TRAIN.EMA.ENABLE = True
    model = build(config)
    est = mr.estimate_memory(model, config, 1, None)
    assert est.optimizer_state == 0
    assert est.ema == est.params and est.total == 2 * est.params + est.grads + est.activations


# ---------------------------------------------------------------------------------------
# (2) activations against a real forward at the target batch

@pytest.mark.parametrize('model_type,amp', [('swin', None), ('swin', torch.bfloat16), ('swinv2', None)])
def test_activations_match_a_real_forward(model_type, amp):
    batch = 6
    config = tiny_config(model_type, batch=batch)
    model = build(config)
    est = mr.estimate_memory(model, config, 1, amp)
    real = real_saved_bytes(model, batch, amp)
    assert within(est.activations, real), (est.activations, real)
    assert est.activations_recompute == 0 and est.activation_bytes == (2 if amp else 4)


def test_checkpointing_matches_and_saves_memory():
    batch = 6
    plain_cfg, ckpt_cfg = tiny_config(batch=batch), tiny_config(batch=batch, checkpoint=True)
    plain, ckpt = build(plain_cfg), build(ckpt_cfg)
    ckpt.load_state_dict(plain.state_dict())
    full = mr.estimate_memory(plain, plain_cfg, 1, None)
    est = mr.estimate_memory(ckpt, ckpt_cfg, 1, None)
    kept = real_saved_bytes(ckpt, batch)                 # the checkpointed model's own forward
    _, per_block = real_saved_bytes(plain, batch, per_block=True)
    assert within(est.activations_saved, kept), (est.activations_saved, kept)
    assert within(est.activations_recompute, max(per_block)), (est.activations_recompute, max(per_block))
    assert within(est.activations, kept + max(per_block))
    assert est.activations * 2 < full.activations, (est.activations, full.activations)


def test_frozen_stages_save_less():
    config, frozen_cfg = tiny_config(), tiny_config(freeze=1)
    full = mr.estimate_memory(build(config), config, 1, None)
    frozen_model = build(frozen_cfg)
    frozen = mr.estimate_memory(frozen_model, frozen_cfg, 1, None)
    assert frozen.activations < full.activations
    assert within(frozen.activations, real_saved_bytes(frozen_model, 6))


# ---------------------------------------------------------------------------------------
# (3) the log lines

def test_report_lines_name_every_part():
    config = tiny_config(parallel='zero', checkpoint=True)
    est = mr.estimate_memory(build(config), config, 2, None)
    lines = mr.report_lines(est, torch.device('cpu'))
    assert 2 <= len(lines) <= 4
    text = '\n'.join(lines)
    for word in ('parameters', 'gradients', 'optimizer state (adamw)', 'activations', 'zero',
                 'world size 2', 'checkpointing on', 'batch 6', 'total', 'GiB'):
        assert word in text, word
    assert f'{est.total / 2**30:.2f} GiB' in text
    assert not any(line.startswith('WARNING') for line in lines)


def _estimate(total):
    return mr.MemoryEstimate(params=total // 4, grads=total // 4, optimizer_state=total // 4,
                             activations=total - 3 * (total // 4), total=total, parallel='fsdp', world_size=8,
                             batch=128, checkpointing=False, optimizer='adamw', activation_bytes=2)


def test_report_warns_above_ninety_percent(monkeypatch):
    gpu = types.SimpleNamespace(total_memory=80 * 2**30, name='Test GPU')
    monkeypatch.setattr(torch.cuda, 'get_device_properties', lambda device: gpu)
    ok = mr.report_lines(_estimate(40 * 2**30), torch.device('cuda', 0))
    assert 'fits' in ok[1] and '50%' in ok[1] and 'Test GPU' in ok[1]
    tight = mr.report_lines(_estimate(75 * 2**30), torch.device('cuda', 0))
    assert tight[1].startswith('WARNING') and '94%' in tight[1] and 'fsdp' in tight[0]
    ram = mr._capacity(torch.device('cpu'))[0]
    assert mr.report_lines(_estimate(2 * ram), torch.device('cpu'))[1].startswith('WARNING')


# ---------------------------------------------------------------------------------------
# (4) scaling with the batch

def test_activations_scale_with_the_batch():
    model = build(tiny_config())
    acts = {b: mr.estimate_memory(model, tiny_config(batch=b), 1, None) for b in (4, 8, 16)}
    a = {b: e.activations for b, e in acts.items()}
    assert a[4] < a[8] < a[16]
    assert a[16] - a[8] == pytest.approx(2 * (a[8] - a[4]), rel=1e-6)  # linear in the batch
    assert a[16] < 4 * a[4] * 1.01                                     # with a fixed part (masks)
    assert all(e.params == acts[4].params and e.optimizer_state == acts[4].optimizer_state for e in acts.values())
    assert within(a[16], real_saved_bytes(model, 16))


def test_fallback_to_a_real_forward(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError('no fake tensors here')
    monkeypatch.setattr(mr, '_fake_measure', broken)
    config = tiny_config(batch=6)
    model = build(config)
    state = torch.get_rng_state()
    est = mr.estimate_memory(model, config, 1, None)
    assert torch.equal(torch.get_rng_state(), state)  # the training RNG stream is untouched
    assert 'real CPU forward' in est.activation_method and any('failed' in n for n in est.notes)
    real = real_saved_bytes(model, 6)
    assert real <= est.activations <= 1.3 * real  # batch 1 times 6: the fixed part counted 6 times

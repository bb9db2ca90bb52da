"""Large-batch recipe: LAMB and LARS (timm's arithmetic, layer-adaptive on weights only),
their resume, the non-finite guard with them (skipping on the device), and the square-root
LR scaling LAMB is used with."""
import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from timm import optim as timm_optim

import main
import models
from config import ConfigError
from engine.guard import NonFiniteGuard
from helpers.configs import group_of, make_config, with_changes
from helpers.runs import one_line_error
from lr_scheduler import build_scheduler, scaled_learning_rates
from optimizer import build_optimizer
from skipping_optimizers import Lamb, Lars


def _linear(seed: int = 0) -> nn.Linear:
    """A weight (decay group) and a bias (no-decay group) with norms far from their gradients',
    so a trust ratio applied where it should not be (or missing) changes the step a lot."""
    torch.manual_seed(seed)
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, 4) * 3.0)
        layer.bias.copy_(torch.tensor([5.0, -4.0, 6.0]))
    return layer


def _set_grads(model: nn.Module, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * scale


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().clone()


# ---------------------------------------------------------------- choice and arguments

@pytest.mark.parametrize('name, cls', [('lamb', Lamb), ('lars', Lars)])
def test_names_build_the_classes_with_the_config_values(name, cls):
    cfg = make_config('TRAIN.OPTIMIZER.NAME', name, 'TRAIN.WEIGHT_DECAY', '0.03', 'TRAIN.OPTIMIZER.EPS', '1e-7',
                      'TRAIN.OPTIMIZER.TRUST_COEFF', '0.002', 'TRAIN.OPTIMIZER.MOMENTUM', '0.8')
    opt = build_optimizer(cfg, _linear())
    assert isinstance(opt, cls)
    by_name = {g['name']: g for g in opt.param_groups}
    assert set(by_name) == {'decay', 'no_decay'}
    assert by_name['decay']['weight_decay'] == pytest.approx(0.03) and by_name['no_decay']['weight_decay'] == 0.0
    assert by_name['decay']['always_adapt'] and not by_name['no_decay']['always_adapt']
    assert all(g['lr_scale'] == 1.0 and g['eps'] == pytest.approx(1e-7) for g in opt.param_groups)
    if name == 'lamb':
        assert 'max_grad_norm' not in opt.defaults  # no internal clip: the engine clips (TRAIN.CLIP_GRAD)
        assert tuple(opt.defaults['betas']) == pytest.approx((0.9, 0.999))
    else:
        assert opt.defaults['trust_coeff'] == pytest.approx(0.002) and opt.defaults['momentum'] == pytest.approx(0.8)
        assert opt.defaults['nesterov'] is True


# ---------------------------------------------------------------- the update arithmetic

@pytest.mark.parametrize('weight_decay', [0.01, 0.0])
def test_lars_step_adapts_the_weight_and_not_the_bias(weight_decay):
    lr, coeff, eps = 2.0, 0.001, 1e-8
    cfg = make_config('TRAIN.OPTIMIZER.NAME', 'lars', 'TRAIN.WEIGHT_DECAY', str(weight_decay),
                      'TRAIN.BASE_LR', str(lr), 'TRAIN.OPTIMIZER.NESTEROV', 'False')
    model = _linear()
    opt = build_optimizer(cfg, model)
    _set_grads(model, 0.5, seed=1)
    w, g, b, gb = _d(model.weight), _d(model.weight.grad), _d(model.bias), _d(model.bias.grad)
    opt.step()
    # timm's LARS: (g + wd w) x coeff ||w|| / (||g|| + wd ||w|| + eps), then momentum SGD (first
    # step: the buffer is that update), then x lr. WEIGHT_DECAY 0 still adapts the weight.
    trust = coeff * w.norm() / (g.norm() + weight_decay * w.norm() + eps)
    assert _d(model.weight) == pytest.approx(w - lr * trust * (g + weight_decay * w), rel=1e-5)
    assert (trust - 1).abs() > 0.5  # the check above would catch a missing trust ratio
    assert _d(model.bias) == pytest.approx(b - lr * gb, rel=1e-5)  # plain SGD: no trust ratio, no decay


def _adam_direction(g_list, step, betas, eps):
    """Bias-corrected Adam direction after `step` gradients, in float64."""
    b1, b2 = betas
    m = v = 0
    for g in g_list[:step]:
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
    return (m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt() + eps)


def test_lamb_two_steps_adapt_the_weight_and_not_the_bias_with_no_internal_clipping():
    """Step 1's gradient norm is ~100: timm's default internal clipping (max_grad_norm 1)
    would divide it by ~100 before the moments and change step 2; it must not."""
    lr, wd, betas, eps = 0.01, 0.05, (0.9, 0.999), 1e-8
    cfg = make_config('TRAIN.OPTIMIZER.NAME', 'lamb', 'TRAIN.WEIGHT_DECAY', str(wd), 'TRAIN.BASE_LR', str(lr))
    model = _linear()
    opt = build_optimizer(cfg, model)
    w, b = _d(model.weight), _d(model.bias)
    grads_w, grads_b = [], []
    for k, scale in enumerate((40.0, 0.3)):
        _set_grads(model, scale, seed=10 + k)
        grads_w.append(_d(model.weight.grad))
        grads_b.append(_d(model.bias.grad))
        opt.step()
    assert sum(g.square().sum() for g in (grads_w[0], grads_b[0])).sqrt() > 50
    for step in (1, 2):
        update = _adam_direction(grads_w, step, betas, eps) + wd * w
        w = w - lr * (w.norm() / update.norm()) * update  # trust ratio ||w|| / ||update||
        b = b - lr * _adam_direction(grads_b, step, betas, eps)  # plain Adam, no decay
    assert _d(model.weight) == pytest.approx(w, rel=1e-5)
    assert _d(model.bias) == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize('name', ['lamb', 'lars'])
def test_layer_decay_lr_scale_reaches_the_step(name):
    """With TRAIN.LAYER_DECAY the scheduler sets each group's LR to lr x lr_scale; the step
    of the lowest layer's weight and bias follows that group LR."""
    cfg = make_config('TRAIN.OPTIMIZER.NAME', name, 'TRAIN.LAYER_DECAY', '0.5', 'TRAIN.WEIGHT_DECAY', '0.05',
                      'TRAIN.OPTIMIZER.NESTEROV', 'False', 'TRAIN.EPOCHS', '4', 'TRAIN.WARMUP_EPOCHS', '0')
    model = models.build_model(cfg)
    opt = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, opt, 5)
    scheduler.step_update(3)
    groups = group_of(opt)
    params = dict(model.named_parameters())
    low_w, low_b, top_w = params['patch_embed.proj.weight'], params['patch_embed.proj.bias'], params['head.weight']
    assert groups[id(low_w)]['name'] == 'layer_0_decay' and groups[id(low_b)]['name'] == 'layer_0_no_decay'
    scale = groups[id(low_w)]['lr_scale']
    assert scale == pytest.approx(0.5 ** 9) and groups[id(top_w)]['lr_scale'] == 1.0  # 8 blocks + 2 layers
    lr = scheduler.lr_at(3, scale)
    assert groups[id(low_w)]['lr'] == pytest.approx(lr) and groups[id(low_b)]['lr'] == pytest.approx(lr)

    _set_grads(model, 0.1, seed=3)
    w, g, b, gb = _d(low_w), _d(low_w.grad), _d(low_b), _d(low_b.grad)
    opt.step()
    if name == 'lars':
        trust = 0.001 * w.norm() / (g.norm() + 0.05 * w.norm() + 1e-8)
        assert _d(low_w) == pytest.approx(w - lr * trust * (g + 0.05 * w), rel=1e-5)
        assert _d(low_b) == pytest.approx(b - lr * gb, rel=1e-5)
    else:
        update = g / (g.abs() + 1e-8) + 0.05 * w  # Adam's first step is g / |g|
        assert _d(low_w) == pytest.approx(w - lr * (w.norm() / update.norm()) * update, rel=1e-5)
        assert _d(low_b) == pytest.approx(b - lr * gb / (gb.abs() + 1e-8), rel=1e-5, abs=1e-9)


# ---------------------------------------------------------------- guard and resume state

@pytest.mark.parametrize('name', ['lamb', 'lars'])
def test_non_finite_guard_skips_the_step_on_the_device(name, monkeypatch):
    cfg = make_config('TRAIN.OPTIMIZER.NAME', name, 'TRAIN.BASE_LR', '0.1')
    model = _linear()
    opt = build_optimizer(cfg, model)
    guard = NonFiniteGuard(torch.device('cpu'), limit=3)
    before = [_d(p) for p in model.parameters()]
    _set_grads(model, 1.0, seed=4)
    model.weight.grad[0, 0] = float('nan')
    reads = []
    monkeypatch.setattr(torch.Tensor, 'item', lambda self: reads.append(self) or 0)
    guard.step(opt, None, torch.tensor(float('nan')), update=0)
    monkeypatch.undo()
    assert not reads  # decided on the device
    assert all(torch.equal(a, _d(p)) for a, p in zip(before, model.parameters()))
    for state in opt.state.values():  # moments and counts as before any step
        assert all(not torch.is_tensor(t) or not t.any() for t in state.values())
    assert int(guard.total) == 1 and int(guard.consecutive) == 1
    _set_grads(model, 1.0, seed=4)
    guard.step(opt, None, torch.tensor(1.0), update=1)
    assert all(not torch.equal(a, _d(p)) for a, p in zip(before, model.parameters()))
    assert int(guard.total) == 1 and int(guard.consecutive) == 0
    fresh_model = _linear()
    fresh = build_optimizer(cfg, fresh_model)
    _set_grads(fresh_model, 1.0, seed=4)
    fresh.step()  # the skipped step left nothing behind: as one plain first step
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters()))


@pytest.mark.parametrize('name', ['lamb', 'lars', 'sgd'])
def test_same_steps_as_timm_and_torch(name):
    """Five steps against timm's Lamb (no internal clip) / Lars, and torch's SGD for the
    sharded-SGD form, on a decay and a no-decay group."""
    model, reference_model = _linear(), _linear()
    groups = lambda m: [{'params': [m.weight], 'weight_decay': 0.05, 'always_adapt': True},  # noqa: E731
                        {'params': [m.bias], 'weight_decay': 0.0, 'always_adapt': False}]
    if name == 'lamb':
        ours, theirs = Lamb(groups(model), lr=0.01), timm_optim.Lamb(groups(reference_model), lr=0.01,
                                                                    max_grad_norm=None)
    elif name == 'lars':
        ours = Lars(groups(model), lr=0.5, momentum=0.9, nesterov=True)
        theirs = timm_optim.Lars(groups(reference_model), lr=0.5, momentum=0.9, nesterov=True)
    else:
        ours = Lars(groups(model), lr=0.5, momentum=0.9, nesterov=True, adapt=False)
        theirs = torch.optim.SGD(groups(reference_model), lr=0.5, momentum=0.9, nesterov=True)
    for step in range(5):
        for m, o in ((model, ours), (reference_model, theirs)):
            _set_grads(m, 1.0 + step, seed=50 + step)
            o.step()
        for a, b in zip(model.parameters(), reference_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lamb_resumes_a_state_with_plain_step_counts():
    """Checkpoints written before the counts became tensors hold numbers."""
    cfg = make_config('TRAIN.OPTIMIZER.NAME', 'lamb', 'TRAIN.BASE_LR', '0.01')
    model, opt = _lamb_after_two_steps()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # as in a checkpoint: no tensor shared with `opt`
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    for state in saved['state'].values():
        state['step'] = int(state['step'])
    twin = _linear()
    twin.load_state_dict(model.state_dict())
    restored = build_optimizer(cfg, twin)
    restored.load_state_dict(saved)
    for m, o in ((model, opt), (twin, restored)):
        _set_grads(m, 1.0, seed=31)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def _lamb_after_two_steps():
    model = _linear()
    opt = build_optimizer(make_config('TRAIN.OPTIMIZER.NAME', 'lamb', 'TRAIN.BASE_LR', '0.01'), model)
    for k in range(2):
        _set_grads(model, 1.0, seed=20 + k)
        opt.step()
    return model, opt


def test_lamb_counts_steps_per_parameter_and_resumes_from_a_saved_state():
    """timm's Lamb counts steps in the param group; ours per parameter, so a saved state has
    the group keys a fresh optimizer has (what the trainer's resume checks), and after
    loading the next step equals the uninterrupted one (same bias correction)."""
    cfg = make_config('TRAIN.OPTIMIZER.NAME', 'lamb', 'TRAIN.BASE_LR', '0.01')
    model, opt = _lamb_after_two_steps()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # as in a checkpoint: no tensor shared with `opt`
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = _linear()
    twin.load_state_dict(model.state_dict())
    restored = build_optimizer(cfg, twin)
    assert [set(g) - {'params'} for g in saved['param_groups']] == \
        [set(g) - {'params'} for g in restored.param_groups]
    assert len(saved['state']) == 2 and all(int(s['step']) == 2 for s in saved['state'].values())
    restored.load_state_dict(saved)
    assert all('step' not in g for g in opt.param_groups + restored.param_groups)
    for m, o in ((model, opt), (twin, restored)):
        _set_grads(m, 1.0, seed=30)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert all(int(s['step']) == 3 for s in restored.state.values())


@pytest.mark.parametrize('name', ['lamb', 'lars'])
def test_zero_rebuilds_the_optimizer_from_its_class_and_defaults(name, tmp_path):
    """TRAIN.PARALLEL zero constructs `type(optimizer)(groups, **optimizer.defaults)`; after
    steps its groups keep the keys a fresh optimizer has, and it steps as the plain one."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    cfg = make_config('TRAIN.OPTIMIZER.NAME', name, 'TRAIN.BASE_LR', '0.01')
    plain_model, zero_model = _linear(), _linear()
    plain = build_optimizer(cfg, plain_model)
    built = build_optimizer(cfg, zero_model)
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        zero = ZeroRedundancyOptimizer([dict(g) for g in built.param_groups], optimizer_class=type(built),
                                       **built.defaults)
        for k in range(2):
            for m, o in ((plain_model, plain), (zero_model, zero)):
                _set_grads(m, 1.0, seed=40 + k)
                o.step()
        zero.consolidate_state_dict(to=0)
        saved = zero.state_dict()
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(a, b) for a, b in zip(plain_model.parameters(), zero_model.parameters()))
    assert [set(g) - {'params'} for g in saved['param_groups']] == \
        [set(g) - {'params'} for g in build_optimizer(cfg, _linear()).param_groups]


# ---------------------------------------------------------------- end to end


# ---------------------------------------------------------------- LR scaling

def test_sqrt_scaling_at_a_large_batch():
    """LAMB's rule (You et al. 2020): BASE_LR x sqrt(effective batch / 512); 256 per process x
    16 processes x 2 accumulation steps = 8192, so x4 (linear would give x16)."""
    cfg = make_config('TRAIN.LR_SCALING', 'sqrt', 'DATA.BATCH_SIZE', '256', 'TRAIN.ACCUMULATION_STEPS', '2',
                      'TRAIN.BASE_LR', '1e-3', 'TRAIN.WARMUP_LR', '1e-6', 'TRAIN.MIN_LR', '1e-5')
    scaled = scaled_learning_rates(cfg, world_size=16)
    assert scaled['effective_batch'] == 8192
    assert scaled['base_lr'] == pytest.approx(1e-3 * math.sqrt(8192 / 512)) == pytest.approx(4e-3)
    assert scaled['warmup_lr'] == pytest.approx(4e-6) and scaled['min_lr'] == pytest.approx(4e-5)
    linear = scaled_learning_rates(with_changes(cfg, **{'TRAIN.LR_SCALING': 'linear'}), world_size=16)
    assert linear['base_lr'] == pytest.approx(16e-3)


def test_unknown_optimizer_is_one_line_naming_the_choices(cfg_file, tmp_path, capsys):
    assert main.main(['--cfg', cfg_file, '--output', str(tmp_path), '--optim', 'lion']) == 2
    line = one_line_error(capsys)
    assert 'TRAIN.OPTIMIZER.NAME' in line and 'lion' in line and 'lamb' in line and 'lars' in line
    with pytest.raises(ConfigError, match='lamb, lars'):  # the builder's own check, past validation
        build_optimizer(with_changes(make_config(), **{'TRAIN.OPTIMIZER.NAME': 'lion'}), _linear())


def test_bad_lars_settings_are_config_errors(cfg_file, tmp_path, capsys):
    assert main.main(['--cfg', cfg_file, '--output', str(tmp_path), '--optim', 'lars',
                      '--opts', 'TRAIN.OPTIMIZER.TRUST_COEFF', '0']) == 2
    assert 'TRAIN.OPTIMIZER.TRUST_COEFF' in one_line_error(capsys)
    cfg = make_config('TRAIN.OPTIMIZER.NAME', 'lars', 'TRAIN.OPTIMIZER.MOMENTUM', '0')
    with pytest.raises(ConfigError, match='NESTEROV'):  # timm would raise a bare ValueError
        build_optimizer(cfg, _linear())


def test_optimizer_kind_is_the_update_rule_not_the_class():
    """A resume compares update rules: torch's SGD and sharded SGD (Lars without adaptation)
    are one; timm's LAMB / LARS groups of earlier checkpoints are ours."""
    from optimizer import optimizer_kind
    params = lambda: [nn.Parameter(torch.zeros(2))]  # noqa: E731
    kinds = {
        'torch sgd': torch.optim.SGD(params(), lr=0.1, momentum=0.9),
        'sharded sgd': Lars(params(), lr=0.1, adapt=False),
        'lars': Lars(params(), lr=0.1),
        'timm lars': timm_optim.Lars(params(), lr=0.1),
        'lamb': Lamb(params()),
        'timm lamb': timm_optim.Lamb(params()),
        'adamw': torch.optim.AdamW(params()),
    }
    got = {name: optimizer_kind(opt.param_groups[0]) for name, opt in kinds.items()}
    assert got == {'torch sgd': 'sgd', 'sharded sgd': 'sgd', 'lars': 'lars', 'timm lars': 'lars', 'lamb': 'lamb',
                   'timm lamb': 'lamb', 'adamw': 'adamw'}

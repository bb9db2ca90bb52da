"""Optimizer param groups, layer decay, LR schedules (with timm parity) and LR scaling."""
import argparse
import bisect
import json
import math

import pytest
import torch
import torch.nn as nn
from timm.scheduler.cosine_lr import CosineLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.scheduler.step_lr import StepLRScheduler

import config
import models
from config import ConfigError
from helpers.configs import DEMO, group_of, make_config, with_changes
from lr_scheduler import LRScheduler, build_scheduler, scaled_learning_rates, schedule_position
from optimizer import build_optimizer, describe_param_groups, gradient_clip, swin_layer_id
from skipping_optimizers import Lamb

N_ITER = 7  # optimizer updates per epoch in the schedule tests


def schedule_config(*opts: str):
    return make_config('TRAIN.EPOCHS', '10', 'TRAIN.WARMUP_EPOCHS', '2', 'TRAIN.BASE_LR', '1e-3',
                       'TRAIN.WARMUP_LR', '1e-6', 'TRAIN.MIN_LR', '1e-5', *opts)


def one_param_optimizer(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


# ---------------------------------------------------------------- optimizer

def test_decay_and_no_decay_membership():
    cfg = make_config('MODEL.SWIN.APE', 'True', 'TRAIN.WEIGHT_DECAY', '0.07')
    model = models.build_model(cfg)
    opt = build_optimizer(cfg, model)
    groups = group_of(opt)
    params = dict(model.named_parameters())
    no_decay = ['absolute_pos_embed', 'patch_embed.norm.weight', 'patch_embed.proj.bias',
                'layers.0.blocks.0.norm1.weight', 'layers.0.blocks.0.attn.qkv.bias',
                'layers.0.blocks.0.attn.relative_position_bias_table', 'layers.1.downsample.norm.weight',
                'norm.weight', 'head.bias']
    decay = ['patch_embed.proj.weight', 'layers.0.blocks.0.attn.qkv.weight', 'layers.2.blocks.1.mlp.fc1.weight',
             'layers.0.downsample.reduction.weight', 'head.weight']
    for name in no_decay:
        assert groups[id(params[name])]['name'] == 'no_decay', name
        assert groups[id(params[name])]['weight_decay'] == 0.0, name
    for name in decay:
        assert groups[id(params[name])]['name'] == 'decay', name
        assert groups[id(params[name])]['weight_decay'] == pytest.approx(0.07), name
    assert [g['name'] for g in opt.param_groups] == ['decay', 'no_decay']
    assert all(g['lr_scale'] == 1.0 for g in opt.param_groups)


def test_each_trainable_param_in_exactly_one_group_and_frozen_left_out():
    cfg = make_config()
    model = models.build_model(cfg)
    for p in model.patch_embed.parameters():
        p.requires_grad_(False)
    opt = build_optimizer(cfg, model)
    in_groups = [id(p) for g in opt.param_groups for p in g['params']]
    assert len(in_groups) == len(set(in_groups))
    assert set(in_groups) == {id(p) for p in model.parameters() if p.requires_grad}
    assert not {id(p) for p in model.patch_embed.parameters()} & set(in_groups)


def test_empty_group_is_dropped():
    cfg = make_config()
    model = models.build_model(cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(p.ndim > 1 and 'relative_position_bias_table' not in name)
    opt = build_optimizer(cfg, model)
    assert [g['name'] for g in opt.param_groups] == ['decay']


def test_sgd_and_adamw_settings_come_from_config():
    cfg = make_config('TRAIN.OPTIMIZER.NAME', 'sgd', 'TRAIN.OPTIMIZER.MOMENTUM', '0.8', 'TRAIN.BASE_LR', '0.3')
    opt = build_optimizer(cfg, models.build_model(cfg))
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults['momentum'] == pytest.approx(0.8)
    assert opt.defaults['nesterov'] is True  # the official SGD is always Nesterov
    assert opt.defaults['lr'] == pytest.approx(0.3)
    cfg = make_config('TRAIN.OPTIMIZER.NAME', 'sgd', 'TRAIN.OPTIMIZER.NESTEROV', 'False')
    assert build_optimizer(cfg, models.build_model(cfg)).defaults['nesterov'] is False

    cfg = make_config('TRAIN.OPTIMIZER.BETAS', '(0.85, 0.99)', 'TRAIN.OPTIMIZER.EPS', '1e-6')
    opt = build_optimizer(cfg, models.build_model(cfg))
    assert isinstance(opt, torch.optim.AdamW)
    assert tuple(opt.defaults['betas']) == pytest.approx((0.85, 0.99))
    assert opt.defaults['eps'] == pytest.approx(1e-6)
    assert opt.defaults['fused'] is True  # faster on CPU too (see optimizer._kernel_options)


def test_fused_adamw_takes_a_step_on_cpu():
    cfg = make_config()
    model = models.build_model(cfg)
    opt = build_optimizer(cfg, model)
    before = model.head.weight.detach().clone()
    model(torch.randn(2, 3, 112, 112)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.head.weight)


def test_bad_optimizer_settings_raise_config_error():
    cfg = make_config()
    model = models.build_model(cfg)
    with pytest.raises(ConfigError, match='adamw, sgd'):
        build_optimizer(with_changes(cfg, **{'TRAIN.OPTIMIZER.NAME': 'lion'}), model)
    sgd_no_momentum = with_changes(cfg, **{'TRAIN.OPTIMIZER.NAME': 'sgd', 'TRAIN.OPTIMIZER.MOMENTUM': 0.0})
    with pytest.raises(ConfigError, match='NESTEROV'):
        build_optimizer(sgd_no_momentum, model)


def test_swin_layer_ids_by_hand():
    depths = [1, 2, 3, 1]  # uneven, so a stage offset error shows
    assert swin_layer_id('patch_embed.proj.weight', depths) == 0
    assert swin_layer_id('absolute_pos_embed', depths) == 8  # SimMIM: not a patch_embed/layers name
    assert swin_layer_id('mask_token', depths) == 0
    assert swin_layer_id('layers.0.blocks.0.attn.qkv.weight', depths) == 1
    assert swin_layer_id('layers.0.downsample.reduction.weight', depths) == 1
    assert swin_layer_id('layers.1.blocks.1.norm2.bias', depths) == 3
    assert swin_layer_id('layers.2.blocks.2.mlp.fc2.weight', depths) == 6
    assert swin_layer_id('layers.2.downsample.norm.weight', depths) == 6
    assert swin_layer_id('layers.3.blocks.0.attn.proj.weight', depths) == 7
    assert swin_layer_id('norm.weight', depths) == 8
    assert swin_layer_id('head.weight', depths) == 8


def test_layer_decay_groups_on_micro_model():
    cfg = make_config('TRAIN.LAYER_DECAY', '0.9', 'MODEL.SWIN.APE', 'True')
    model = models.build_model(cfg)
    opt = build_optimizer(cfg, model)
    depths = list(cfg.MODEL.SWIN.DEPTHS)
    num_layers = sum(depths) + 2
    groups = group_of(opt)
    params = dict(model.named_parameters())
    expected = {'patch_embed.proj.weight': 0, 'absolute_pos_embed': num_layers - 1,
                'layers.0.blocks.1.attn.qkv.weight': 2, 'layers.0.downsample.reduction.weight': depths[0],
                'layers.1.blocks.0.norm1.weight': 3,
                'head.weight': num_layers - 1, 'norm.bias': num_layers - 1}
    for name, layer_id in expected.items():
        group = groups[id(params[name])]
        assert group['name'].startswith(f'layer_{layer_id}_'), name
        assert group['lr_scale'] == pytest.approx(0.9 ** (num_layers - 1 - layer_id)), name
    assert groups[id(params['absolute_pos_embed'])]['name'] == f'layer_{num_layers - 1}_no_decay'
    assert groups[id(params['head.weight'])]['name'] == f'layer_{num_layers - 1}_decay'
    assert len(opt.param_groups) == 2 * num_layers
    lines = describe_param_groups(opt)
    assert len(lines) == len(opt.param_groups)
    assert any(line.startswith('layer_0_decay: 1 tensors, ') for line in lines)  # patch_embed.proj.weight


def test_layer_decay_depths_fall_back_to_config():
    class Flat(nn.Module):  # no `layers[i].blocks` to count
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Linear(2, 2)
            self.head = nn.Linear(2, 2)

    cfg = make_config('TRAIN.LAYER_DECAY', '0.5')
    opt = build_optimizer(cfg, Flat())
    scales = {g['name']: g['lr_scale'] for g in opt.param_groups}
    top = sum(cfg.MODEL.SWIN.DEPTHS) + 1
    assert scales == {'layer_0_decay': 0.5 ** top, 'layer_0_no_decay': 0.5 ** top,
                      f'layer_{top}_decay': 1.0, f'layer_{top}_no_decay': 1.0}


# ---------------------------------------------------------------- schedules

SCALES = (1.0, 0.5, 0.1)  # lr_scale of three groups, as layer decay gives them


def grouped_optimizers(base_lr: float):
    """Ours (groups at BASE_LR with an lr_scale) and the official form of the same groups
    (each group's lr = BASE_LR x scale, no lr_scale key, as the official optimizer builds
    them and timm 0.4.12's scheduler reads them)."""
    ours = torch.optim.SGD([{'params': [nn.Parameter(torch.zeros(1))], 'lr_scale': s} for s in SCALES], lr=base_lr)
    official = torch.optim.SGD([{'params': [nn.Parameter(torch.zeros(1))], 'lr': base_lr * s} for s in SCALES],
                               lr=base_lr)
    return ours, official


class OfficialMultiStep(Scheduler):
    """The official repository's own MultiStepLRScheduler (not timm's, whose milestones
    apply one update early): warmup, then `peak x gamma ** bisect_right(milestones, t)`."""

    def __init__(self, optimizer, milestones, gamma, warmup_t, warmup_lr_init):
        super().__init__(optimizer, param_group_field='lr')
        self.milestones, self.gamma, self.warmup_t, self.warmup_lr_init = milestones, gamma, warmup_t, warmup_lr_init
        self.t_in_epochs = False
        self.warmup_steps = [(v - warmup_lr_init) / warmup_t for v in self.base_values] if warmup_t else []
        if warmup_t:
            self.update_groups(warmup_lr_init)

    def _get_lr(self, t):
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * s for s in self.warmup_steps]
        return [v * self.gamma ** bisect.bisect_right(self.milestones, t) for v in self.base_values]


def official_scheduler(cfg, optimizer, n_iter):
    """The official build_scheduler's schedulers with its arguments: timm's cosine (its
    `_get_lr` unchanged since 0.4.12 for these arguments), timm's step without a warmup
    prefix (0.4.12 had none), the official multistep."""
    t, sched = cfg.TRAIN, cfg.TRAIN.LR_SCHEDULER
    num_steps, warmup_steps = int(t.EPOCHS * n_iter), int(t.WARMUP_EPOCHS * n_iter)
    common = {'warmup_lr_init': t.WARMUP_LR, 'warmup_t': warmup_steps}
    if sched.NAME == 'cosine':
        return CosineLRScheduler(optimizer, t_initial=(num_steps - warmup_steps) if sched.WARMUP_PREFIX else num_steps,
                                 lr_min=t.MIN_LR, cycle_limit=1, warmup_prefix=sched.WARMUP_PREFIX,
                                 t_in_epochs=False, **common)
    if sched.NAME == 'step':
        return StepLRScheduler(optimizer, decay_t=int(sched.DECAY_EPOCHS * n_iter), decay_rate=sched.DECAY_RATE,
                               warmup_prefix=False, t_in_epochs=False, **common)
    return OfficialMultiStep(optimizer, [m * n_iter for m in sched.MULTISTEPS], sched.GAMMA, **common)


@pytest.mark.parametrize('name', ['cosine', 'step', 'multistep'])
@pytest.mark.parametrize('prefix', [True, False])
@pytest.mark.parametrize('warmup_epochs', ['2', '0'])
def test_matches_the_official_schedule_at_every_update(name, prefix, warmup_epochs):
    cfg = schedule_config('TRAIN.WARMUP_EPOCHS', warmup_epochs, 'TRAIN.LR_SCHEDULER.NAME', name,
                          'TRAIN.LR_SCHEDULER.WARMUP_PREFIX', str(prefix), 'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '3',
                          'TRAIN.LR_SCHEDULER.DECAY_RATE', '0.5', 'TRAIN.LR_SCHEDULER.MULTISTEPS', '[3, 6]')
    ours_opt, official_opt = grouped_optimizers(cfg.TRAIN.BASE_LR)
    ours, reference = build_scheduler(cfg, ours_opt, N_ITER), official_scheduler(cfg, official_opt, N_ITER)
    for step in range(cfg.TRAIN.EPOCHS * N_ITER + 5):
        ours.step_update(step)
        reference.step_update(step)
        for mine, theirs in zip(ours_opt.param_groups, official_opt.param_groups, strict=True):
            assert mine['lr'] == pytest.approx(theirs['lr'], rel=1e-12), (step, mine['lr_scale'])


@pytest.mark.parametrize('prefix', [True, False])
def test_linear_is_the_official_formula(prefix):
    """The official LinearLRScheduler (its own, with lr_min_rate 0.01): warmup to the peak,
    then `peak - (peak - 0.01 peak) x (t - warmup) / (total - warmup)`; MIN_LR unused."""
    cfg = schedule_config('TRAIN.LR_SCHEDULER.NAME', 'linear', 'TRAIN.LR_SCHEDULER.WARMUP_PREFIX', str(prefix),
                          'TRAIN.MIN_LR', '5e-6')
    t = cfg.TRAIN
    opt, _ = grouped_optimizers(t.BASE_LR)
    s = build_scheduler(cfg, opt, N_ITER)
    warmup, total = t.WARMUP_EPOCHS * N_ITER, t.EPOCHS * N_ITER
    for step in range(total + 1):
        s.step_update(step)
        for group in opt.param_groups:
            peak = t.BASE_LR * group['lr_scale']
            if step < warmup:
                expected = t.WARMUP_LR + step * (peak - t.WARMUP_LR) / warmup
            else:
                expected = peak - (peak - peak * 0.01) * (step - warmup) / (total - warmup)
            assert group['lr'] == pytest.approx(expected, rel=1e-12), step
    assert s.lr_at(total) == pytest.approx(0.01 * t.BASE_LR, rel=1e-12) != pytest.approx(t.MIN_LR)


def test_warmup_without_prefix_ramps_to_the_peak_then_drops_to_the_cosine():
    cfg = schedule_config('TRAIN.WARMUP_EPOCHS', '5', 'TRAIN.LR_SCHEDULER.WARMUP_PREFIX', 'False')
    t = cfg.TRAIN
    s = build_scheduler(cfg, one_param_optimizer(), N_ITER)
    w, total = 5 * N_ITER, 10 * N_ITER
    assert s.lr_at(w - 1) == pytest.approx(t.WARMUP_LR + (w - 1) * (t.BASE_LR - t.WARMUP_LR) / w, rel=1e-12)
    cosine = t.MIN_LR + 0.5 * (t.BASE_LR - t.MIN_LR) * (1 + math.cos(math.pi * w / total))
    assert s.lr_at(w) == pytest.approx(cosine, rel=1e-12)
    assert s.lr_at(w) < 0.6 * s.lr_at(w - 1)  # half-way through the cosine already


def test_the_next_update_uses_the_index_of_the_last_one():
    """The official loop calls step_update(k) after update k: updates 0 and 1 both run at
    the warmup start, update k >= 1 at the schedule's value for k - 1."""
    assert [schedule_position(done) for done in range(4)] == [0, 0, 1, 2]


def test_construction_applies_the_warmup_start():
    cfg = schedule_config()
    opt = one_param_optimizer(cfg.TRAIN.BASE_LR)
    build_scheduler(cfg, opt, N_ITER)
    assert opt.param_groups[0]['lr'] == pytest.approx(cfg.TRAIN.WARMUP_LR)


@pytest.mark.parametrize('prefix', [True, False])
def test_cosine_ends_at_min_lr(prefix):
    cfg = schedule_config('TRAIN.LR_SCHEDULER.WARMUP_PREFIX', str(prefix))
    s = build_scheduler(cfg, one_param_optimizer(), N_ITER)
    total, min_lr = s.total_steps, cfg.TRAIN.MIN_LR
    assert s.lr_at(total - 1) > min_lr
    assert s.lr_at(total) == pytest.approx(min_lr, rel=1e-12)
    assert s.lr_at(total + 100) == pytest.approx(min_lr, rel=1e-12)
    after_warmup = [s.lr_at(i) for i in range(s.warmup_steps, total + 1)]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))


@pytest.mark.parametrize('prefix', [True, False])
def test_step_shape(prefix):
    cfg = schedule_config('TRAIN.LR_SCHEDULER.NAME', 'step', 'TRAIN.WARMUP_EPOCHS', '1',
                          'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '3', 'TRAIN.LR_SCHEDULER.DECAY_RATE', '0.5',
                          'TRAIN.LR_SCHEDULER.WARMUP_PREFIX', str(prefix))
    s = build_scheduler(cfg, one_param_optimizer(), N_ITER)
    base, start = cfg.TRAIN.BASE_LR, 0  # counted from update 0 with or without prefix
    drop = 3 * N_ITER
    assert s.lr_at(start + drop - 1) == pytest.approx(base)
    assert s.lr_at(start + drop) == pytest.approx(base * 0.5)
    assert s.lr_at(start + 2 * drop) == pytest.approx(base * 0.25)


@pytest.mark.parametrize('prefix', [True, False])
def test_multistep_shape(prefix):
    cfg = schedule_config('TRAIN.LR_SCHEDULER.NAME', 'multistep', 'TRAIN.LR_SCHEDULER.MULTISTEPS', '[3, 6]',
                          'TRAIN.LR_SCHEDULER.GAMMA', '0.1', 'TRAIN.LR_SCHEDULER.WARMUP_PREFIX', str(prefix))
    s = build_scheduler(cfg, one_param_optimizer(), N_ITER)
    base, start = cfg.TRAIN.BASE_LR, 0  # milestones are epochs from the start, as officially
    assert s.lr_at(start + 3 * N_ITER - 1) == pytest.approx(base)
    assert s.lr_at(start + 3 * N_ITER) == pytest.approx(base * 0.1)
    assert s.lr_at(start + 6 * N_ITER - 1) == pytest.approx(base * 0.1)
    assert s.lr_at(start + 6 * N_ITER) == pytest.approx(base * 0.01)


@pytest.mark.parametrize('prefix', [True, False])
def test_warmup_as_long_as_the_run_does_not_fail(prefix):
    cfg = schedule_config('TRAIN.WARMUP_EPOCHS', '12', 'TRAIN.LR_SCHEDULER.WARMUP_PREFIX', str(prefix))
    s = build_scheduler(cfg, one_param_optimizer(), N_ITER)
    lrs = [s.lr_at(i) for i in range(s.total_steps + 1)]
    assert lrs[0] == pytest.approx(cfg.TRAIN.WARMUP_LR)
    assert all(math.isfinite(lr) and lr > 0 for lr in lrs)


def test_unknown_scheduler_raises_config_error():
    cfg = with_changes(schedule_config(), **{'TRAIN.LR_SCHEDULER.NAME': 'poly'})
    with pytest.raises(ConfigError, match='cosine, linear, step, multistep'):
        build_scheduler(cfg, one_param_optimizer(), N_ITER)


def test_lr_scale_is_applied_per_group():
    cfg = make_config('TRAIN.LAYER_DECAY', '0.8', 'TRAIN.EPOCHS', '4', 'TRAIN.WARMUP_EPOCHS', '1')
    opt = build_optimizer(cfg, models.build_model(cfg))
    s = build_scheduler(cfg, opt, N_ITER)
    for step in (0, 3, N_ITER + 2):
        s.step_update(step)
        for group in opt.param_groups:
            assert group['lr'] == pytest.approx(s.lr_at(step, group['lr_scale']), rel=1e-12)
    scales = sorted({g['lr_scale'] for g in opt.param_groups})
    assert scales[-1] == 1.0 and scales[0] < 0.2  # 0.8 ** 9
    assert s.lr_at(3, scales[0]) < s.lr_at(3)  # warmup towards the group's own peak
    # a group without lr_scale gets the plain LR
    plain = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    LRScheduler(plain, 'cosine', 1e-3, 1e-6, 1e-5, warmup_steps=0, total_steps=10).step_update(5)
    assert plain.param_groups[0]['lr'] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))


def test_state_dict_round_trip():
    cfg = schedule_config()
    s = build_scheduler(cfg, one_param_optimizer(), N_ITER)
    s.step_update(37)
    state = s.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain numbers only
    assert state['num_updates'] == 37 and state['warmup_steps'] == 2 * N_ITER

    opt = one_param_optimizer()
    restored = build_scheduler(cfg, opt, N_ITER)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert opt.param_groups[0]['lr'] == pytest.approx(s.lr_at(37), rel=1e-12)

    # another setup (twice the updates per epoch): the count is kept, the LR follows the new schedule
    other = build_scheduler(cfg, one_param_optimizer(), 2 * N_ITER)
    other.load_state_dict(state)
    assert other.num_updates == 37 and other.total_steps == 20 * N_ITER
    assert other.optimizer.param_groups[0]['lr'] == pytest.approx(other.lr_at(37), rel=1e-12)
    assert other.lr_at(37) != pytest.approx(s.lr_at(37))


@pytest.mark.parametrize('rule, factor', [('linear', 0.25), ('sqrt', 0.5), ('none', 1.0)])
def test_scaled_learning_rates(rule, factor):
    # 16 per process x 4 processes x 2 accumulation steps = 128 = 512 / 4
    cfg = make_config('TRAIN.LR_SCALING', rule, 'TRAIN.ACCUMULATION_STEPS', '2', 'TRAIN.BASE_LR', '4e-3',
                      'TRAIN.WARMUP_LR', '4e-6', 'TRAIN.MIN_LR', '4e-5')
    assert cfg.DATA.BATCH_SIZE == 16
    scaled = scaled_learning_rates(cfg, world_size=4)
    assert scaled['effective_batch'] == 128
    assert scaled['factor'] == pytest.approx(factor)
    assert scaled['base_lr'] == pytest.approx(4e-3 * factor)
    assert scaled['warmup_lr'] == pytest.approx(4e-6 * factor)
    assert scaled['min_lr'] == pytest.approx(4e-5 * factor)
    assert cfg.TRAIN.BASE_LR == pytest.approx(4e-3)  # the config is left as it was


# ---------------------------------------------------------------- the official fused names

def test_fused_adam_is_fused_adamw_with_the_same_groups():
    model = models.build_model(make_config())
    plain = build_optimizer(make_config(), model)
    fused = build_optimizer(make_config('TRAIN.OPTIMIZER.NAME', 'fused_adam'), model)
    assert type(fused) is torch.optim.AdamW and fused.defaults['fused'] is True
    assert [g['name'] for g in fused.param_groups] == [g['name'] for g in plain.param_groups]
    for key in ('lr', 'eps', 'betas', 'weight_decay'):
        assert fused.defaults[key] == plain.defaults[key]


def test_fused_lamb_is_lamb_with_fused_lambs_gradient_clip():
    model = models.build_model(make_config())
    lamb = build_optimizer(make_config('TRAIN.OPTIMIZER.NAME', 'fused_lamb'), model)
    assert isinstance(lamb, Lamb)
    assert gradient_clip(make_config('TRAIN.OPTIMIZER.NAME', 'fused_lamb', 'TRAIN.CLIP_GRAD', '5.0')) == 1.0
    assert gradient_clip(make_config('TRAIN.OPTIMIZER.NAME', 'fused_lamb', 'TRAIN.CLIP_GRAD', '0.5')) == 0.5
    assert gradient_clip(make_config('TRAIN.OPTIMIZER.NAME', 'fused_lamb', 'TRAIN.CLIP_GRAD', '0')) == 1.0
    assert gradient_clip(make_config('TRAIN.OPTIMIZER.NAME', 'lamb', 'TRAIN.CLIP_GRAD', '5.0')) == 5.0
    assert gradient_clip(make_config('TRAIN.CLIP_GRAD', '0')) is None


@pytest.mark.parametrize('name', ['fused_adam', 'fused_lamb'])
def test_official_optim_flag_accepts_the_fused_names(name):
    args = argparse.Namespace(cfg=DEMO, opts=None, optim=name)
    assert config.get_config(args).TRAIN.OPTIMIZER.NAME == name

"""The speed paths of the loops: torch.compile (TRAIN.COMPILE / --compile) against eager,
the one-batch device prefetcher against the plain loop, and no host sync in a training
step outside the print steps. Compilation is slow on 2 CPU cores, so only one test uses
inductor; the others use dynamo with the `aot_eager` or a counting eager backend, which
trace and partition the same graphs (recompilations are dynamo's decision, not the
backend's). Device-side normalization against ToTensor + Normalize is tested in test_data.py."""
import logging
import math
import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import main
from data import DevicePrefetcher, DevicePreprocessor
from distributed.process_group import DistContext, wrap_ddp
from engine import step_logger
from engine.amp import autocast_context
from engine.loops import train_one_epoch, validate
from engine.trainer import Trainer
from helpers.runs import read_weights, run_main
from models.swin_transformer import SwinTransformer

CPU = torch.device('cpu')


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (no cache entries or recompile budget carried over)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny(**kwargs):
    torch.manual_seed(0)
    return SwinTransformer(img_size=32, patch_size=4, num_classes=3, embed_dim=16, depths=[2, 2],
                           num_heads=[2, 4], window_size=4, drop_path_rate=0.0, **kwargs)


def _pair(**kwargs):
    """Two tiny models with the same weights."""
    a, b = _tiny(**kwargs), _tiny(**kwargs)
    b.load_state_dict(a.state_dict())
    return a, b


class CountingBackend:
    """A dynamo backend that counts the graphs it is given and runs them eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _step_grads(model, net, images, targets, amp_dtype=None):
    model.zero_grad(set_to_none=True)
    with autocast_context(amp_dtype, CPU):
        out = net(images)
    F.cross_entropy(out.float(), targets).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close_grads(a, b, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


# --- torch.compile --------------------------------------------------------------------------

def test_inductor_compiled_model_equals_eager():
    """Eval-mode fp32 outputs of the inductor-compiled model equal eager ones."""
    eager, base = _pair()
    compiled = torch.compile(base)
    images = torch.randn(4, 3, 32, 32)
    eager.eval(), compiled.eval()
    with torch.inference_mode():
        torch.testing.assert_close(compiled(images), eager(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('use_checkpoint,amp_dtype', [(False, None), (True, torch.bfloat16)])
def test_compiled_training_step_equals_eager(use_checkpoint, amp_dtype):
    """A training step's outputs and gradients through the compiled graph (AOT autograd,
    with activation checkpointing and bf16 autocast too) equal eager ones."""
    eager, base = _pair(use_checkpoint=use_checkpoint)
    compiled = torch.compile(base, backend='aot_eager')
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    eager.train(), compiled.train()
    out_e, grads_e = _step_grads(eager, eager, images, targets, amp_dtype)
    out_c, grads_c = _step_grads(base, compiled, images, targets, amp_dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if amp_dtype is None else dict(rtol=0.05, atol=0.02)
    torch.testing.assert_close(out_c, out_e, **tol)
    _assert_close_grads(grads_c, grads_e, **tol)
    assert not any(k.startswith('_orig_mod.') for k in base.state_dict())


def test_compiled_ddp_step_equals_eager():
    """The DDP-wrapped module compiled (DDPOptimizer splits at the buckets) gives the eager
    gradients, in one gloo process."""
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    try:
        eager, base = _pair()
        ddp = wrap_ddp(base, CPU)
        compiled = torch.compile(ddp, backend='aot_eager')
        images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
        eager.train(), compiled.train()
        _, grads_e = _step_grads(eager, eager, images, targets)
        _, grads_c = _step_grads(base, compiled, images, targets)
        _assert_close_grads(grads_c, grads_e, rtol=1e-4, atol=1e-5)
    finally:
        dist.destroy_process_group()


class _FakeConfig:  # what validate reads
    PRINT_FREQ = 1000


class _Prep:  # a DevicePreprocessor without normalization
    device = CPU

    def __call__(self, images, targets):
        return images.float().div_(255), targets


def test_no_recompile_per_step_with_a_varying_last_batch():
    """Validation batches 8, 8, 5 (twice) and training steps of a fixed batch compile a
    bounded number of graphs: the second pass compiles none."""
    model = _tiny()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    images = torch.randint(0, 256, (21, 3, 32, 32), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, torch.arange(21) % 3), batch_size=8)
    prep = _Prep()
    logger = logging.getLogger('test')
    validate(_FakeConfig(), compiled, loader, prep, CPU, None, logger)
    first = backend.graphs
    assert 1 <= first <= 2  # one graph per batch shape class (no graph break): 8, then dynamic
    validate(_FakeConfig(), compiled, loader, prep, CPU, None, logger)
    assert backend.graphs == first
    compiled.train()
    for _ in range(3):
        compiled(torch.randn(8, 3, 32, 32)).sum().backward()
    after_train = backend.graphs
    for _ in range(3):
        compiled(torch.randn(8, 3, 32, 32)).sum().backward()
    assert backend.graphs == after_train


def test_compile_flag_trains_and_checkpoints_official_keys(cfg_file, tmp_path, monkeypatch):
    """--compile through main.py: one epoch trains, validates and saves a checkpoint whose
    keys are the eager model's (no `_orig_mod.`), with the compile time logged once.
    (aot_eager here: inductor would take minutes on this CPU.)"""
    real_compile = torch.compile
    calls = []

    def compile_aot_eager(model, **kwargs):
        calls.append(type(model).__name__)
        return real_compile(model, backend='aot_eager')
    monkeypatch.setattr(torch, 'compile', compile_aot_eager)
    assert run_main(cfg_file, tmp_path, '--compile', '--opts', 'TRAIN.EPOCHS', '1', 'PRINT_FREQ', '3') == 0
    run_dir = tmp_path / 'tiny' / 'default'
    assert calls == ['SwinTransformer', 'SwinTransformer']  # training and validation handles
    keys = list(read_weights(run_dir / 'ckpt_epoch_0.pth'))
    assert keys and not any('_orig_mod' in k for k in keys)
    assert keys == list(_tiny().state_dict())
    log = (run_dir / 'log_rank0.txt').read_text()
    assert log.count('torch.compile: first step took') == 1 and '(compilation)' in log
    config = main.parse_option(['--cfg', cfg_file])[1]
    assert config.TRAIN.COMPILE is False  # a flag not given leaves the YAML's value


# --- prefetcher -----------------------------------------------------------------------------

def test_prefetcher_yields_the_plain_batches(cfg_file):
    """Bit for bit the plain loop's batches, the last partial one included, with random
    erasing drawing the same random numbers in the same order."""
    config = main.parse_option(['--cfg', cfg_file, '--opts', 'AUG.REPROB', '0.5'])[1]
    images = torch.randint(0, 256, (11, 3, 32, 32), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, torch.arange(11)), batch_size=4)
    prep = DevicePreprocessor(config, CPU, is_train=True)
    random.seed(1), torch.manual_seed(1)  # timm's erasing draws from both
    plain = [prep(x, y) for x, y in loader]
    random.seed(1), torch.manual_seed(1)
    prefetched = list(DevicePrefetcher(loader, prep))
    assert len(prefetched) == len(plain) == 3 and prefetched[-1][0].shape[0] == 3
    for (xa, ya), (xb, yb) in zip(plain, prefetched):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(DevicePrefetcher(loader, prep)) == 3


# --- no host sync in a training step --------------------------------------------------------

SYNCS = [(torch.Tensor, 'item'), (torch.Tensor, 'tolist'), (torch.Tensor, '__bool__'),
         (torch.Tensor, '__float__'), (torch.Tensor, '__int__'), (torch.cuda, 'synchronize'),
         (step_logger, 'synchronize')]


def test_no_host_sync_between_print_steps(cfg_file, tmp_path, monkeypatch):
    """Six CPU training steps with mixup, clipping and the fused optimizer: the first host
    sync is the print step's (the last step here), none before."""
    config = main.parse_option(['--cfg', cfg_file, '--opts', 'PRINT_FREQ', '1000', 'MODEL.NUM_CLASSES', '3',
                                'AUG.MIXUP', '0.8', 'AUG.CUTMIX', '1.0', 'AUG.REPROB', '0.25',
                                'MODEL.DROP_PATH_RATE', '0.1', 'TRAIN.ACCUMULATION_STEPS', '2',
                                'OUTPUT', str(tmp_path)])[1]
    from data import build_mixup
    from models import build_model
    batches = [(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 3, (8,)))
               for _ in range(6)]
    trainer = Trainer(config, DistContext(0, 1, 0, CPU), build_model(config), batches, None, build_mixup(config),
                      None, logging.getLogger('test'))
    events = []
    for owner, name in SYNCS:
        real = getattr(owner, name)

        label = f'{getattr(owner, "__name__", owner)}.{name}'

        def counted(*args, _real=real, _name=label, **kwargs):
            events.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(owner, name, counted)
    result = train_one_epoch(trainer, batches, 0)
    monkeypatch.undo()
    assert math.isfinite(result.train_loss)
    assert events and events[0] == 'engine.step_logger.synchronize', events[:5]  # the last step's print

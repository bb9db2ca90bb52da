"""Run under torchrun (2 processes, gloo) by test_zero_steps.py: one guarded update of the
micro Swin with TRAIN.PARALLEL zero and TRAIN.LAYER_DECAY (groups of one tensor, so some
ranks hold no parameter of a group), counting the broadcasts of the step, then an fp16
overflow. Writes rank<N>.json into the folder argv[1]."""
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distributed import parallel
from distributed.process_group import shutdown
from engine.guard import NonFiniteGuard, clip_grad_norm
from helpers.configs import make_config
from models import build_model
from optimizer import build_optimizer


def fp16_overflow_step(model, optimizer, params, guard) -> tuple[bool, int, float]:
    """An fp16 update whose gradients overflowed: (weights kept, host reads during the
    guarded step, the scaler's scale after it)."""
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    scaler.scale(torch.ones(()))  # sets up the scale, as scaling the loss does
    for p in params:
        p.grad = torch.ones_like(p)
    params[-1].grad[0] = float('inf')
    before = [p.detach().clone() for p in model.parameters()]
    scaler.unscale_(optimizer)
    norm = clip_grad_norm(params, 5.0)
    reads = {'item': 0}
    original = torch.Tensor.item

    def counting(self):
        reads['item'] += 1
        return original(self)

    torch.Tensor.item = counting
    guard.step(optimizer, scaler, norm, update=1)
    torch.Tensor.item = original
    kept = all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    return kept, reads['item'], scaler.get_scale()


def main() -> None:
    dist.init_process_group('gloo')
    config = make_config('TRAIN.PARALLEL', 'zero', 'TRAIN.LAYER_DECAY', '0.5')
    torch.manual_seed(0)
    model = build_model(config)
    ctx = SimpleNamespace(distributed=True)
    optimizer = parallel.shard_optimizer(build_optimizer(config, model), config, ctx)
    before = [p.detach().clone() for p in model.parameters()]
    logits = model(torch.randn(2, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    moving = sum(bool(p.grad.any()) for p in params)  # (the micro model's last stage gets none)
    guard = NonFiniteGuard(torch.device('cpu'), limit=3)
    calls = {'broadcast': 0}
    original = dist.broadcast

    def counting(*args, **kwargs):
        calls['broadcast'] += 1
        return original(*args, **kwargs)

    dist.broadcast = counting
    guard.step(optimizer, None, clip_grad_norm(params, 5.0), update=0)
    dist.broadcast = original
    local = parallel.local_optimizer(optimizer)
    skipped, item_calls, scale = fp16_overflow_step(model, optimizer, params, guard)
    changed = sum(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    result = {'rank': dist.get_rank(), 'broadcasts': calls['broadcast'], 'tensors': len(params), 'moving': moving,
              'empty_first_group': not local.param_groups[0]['params'], 'changed': changed,
              'fp16_skipped': skipped, 'fp16_item_calls': item_calls, 'fp16_scale': scale}
    with open(os.path.join(sys.argv[1], f'rank{dist.get_rank()}.json'), 'w') as f:
        json.dump(result, f)
    shutdown()  # the project's teardown: frees the groups FSDP meshes keep, so no gloo thread outlives Python


if __name__ == '__main__':
    main()

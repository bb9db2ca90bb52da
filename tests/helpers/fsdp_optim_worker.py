"""Run under torchrun (2 processes, gloo) by test_zero_steps.py: the micro Swin sharded with
FSDP2 and stepped by TRAIN.OPTIMIZER.NAME argv[2] (lamb, lars, sgd) through the non-finite
guard: a normal update, a non-finite one (skipped on the device), another normal one. Rank 0
compares the gathered weights with the same updates of an unsharded model in this process
and writes result.json into the folder argv[1]."""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distributed import parallel
from distributed.process_group import shutdown
from engine.guard import NonFiniteGuard, clip_grad_norm
from helpers.configs import make_config
from models import build_model
from optimizer import build_optimizer


def train(model, optimizer, config) -> int:
    """Three guarded updates, the second one poisoned; returns host reads of the guard."""
    guard = NonFiniteGuard(torch.device('cpu'), limit=3)
    reads = {'n': 0}
    item = torch.Tensor.item
    for update in range(3):
        gen = torch.Generator().manual_seed(update)
        images = torch.randn(2, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE, generator=gen)
        loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1]))
        (loss * float('nan') if update == 1 else loss).backward()
        params = [p for p in model.parameters() if p.requires_grad]
        norm = clip_grad_norm(params, 5.0)
        torch.Tensor.item = lambda self: reads.__setitem__('n', reads['n'] + 1) or item(self)
        guard.step(optimizer, None, norm, update)
        torch.Tensor.item = item
        optimizer.zero_grad(set_to_none=True)
    return reads['n']


def main() -> None:
    out, name = sys.argv[1], sys.argv[2]
    dist.init_process_group('gloo')
    config = make_config('TRAIN.OPTIMIZER.NAME', name, 'TRAIN.PARALLEL', 'fsdp', 'TRAIN.BASE_LR', '0.01')
    torch.manual_seed(0)
    sharded = parallel.shard_model(build_model(config), config, amp_dtype=None)
    reads = train(sharded, build_optimizer(config, sharded), config)
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        plain = build_model(config)
        train(plain, build_optimizer(config, plain), config)
        worst = max((full[k] - v).abs().max().item() for k, v in plain.state_dict().items() if k in full)
        with open(os.path.join(out, 'result.json'), 'w') as f:
            json.dump({'max_difference': worst, 'host_reads': reads, 'finite': all(
                bool(torch.isfinite(v).all()) for v in full.values() if v.is_floating_point())}, f)
    shutdown()  # the project's teardown: frees the groups FSDP meshes keep, so no gloo thread outlives Python


if __name__ == '__main__':
    main()

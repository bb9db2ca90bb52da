"""Run under torchrun by test_parallel.py: load a sharded training checkpoint into a
model sharded over this run's processes (another count than it was saved with), then
gather the full model and optimizer state and compare them with the checkpoint's own full
tensors. Exit 0 when every tensor is equal, 1 (naming the first difference) otherwise."""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from checkpoints import sharded
from checkpoints.reading import read_checkpoint
from config import config_from_yaml_text
from distributed import parallel
from distributed.process_group import shutdown
from models import build_model
from optimizer import build_optimizer


def main() -> int:
    path = sys.argv[1]
    dist.init_process_group('gloo')
    config = config_from_yaml_text(read_checkpoint(path)['config'], path)
    model = parallel.shard_model(build_model(config), config, amp_dtype=None)
    optimizer = build_optimizer(config, model)
    sharded.load_training_state(path, model, optimizer)
    full_model, full_optim = get_state_dict(model, [optimizer], options=StateDictOptions(full_state_dict=True))
    expected_model = sharded.read_full_state(path, 'model')
    expected_optim = sharded.read_full_state(path, 'optimizer')
    checked = 0
    for name, tensor in expected_model.items():
        if not torch.equal(full_model[name], tensor):
            print(f'model tensor {name} differs', file=sys.stderr)
            return 1
        checked += 1
    for key, tensor in expected_optim.items():  # 'state.<param>.<exp_avg|exp_avg_sq|step>'
        param, field = key[len('state.'):].rsplit('.', 1)
        if not torch.equal(full_optim['state'][param][field].reshape(tensor.shape), tensor):
            print(f'optimizer {key} differs', file=sys.stderr)
            return 1
        checked += 1
    print(f'rank {dist.get_rank()} of {dist.get_world_size()}: {checked} tensors equal')
    shutdown()  # the project's teardown: frees the groups FSDP meshes keep, so no gloo thread outlives Python
    return 0


if __name__ == '__main__':
    sys.exit(main())

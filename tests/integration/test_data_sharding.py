"""The data pipeline in a real gloo process group under torchrun: rank and world size come
from torch.distributed, validation shards hold each image once, training shares reshuffle."""
import json
import os

import pytest

from helpers.images import write_photo_folder
from helpers.runs import ROOT, free_port


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return write_photo_folder(str(tmp_path_factory.mktemp('imagenet')))

_DISTRIBUTED_SCRIPT = '''
import json, os, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
from config import default_config
from data import build_loader
dist.init_process_group('gloo')
config = default_config()
config.DATA.DATA_PATH = {data!r}
config.DATA.IMG_SIZE = 32
config.DATA.BATCH_SIZE = 2
config.DATA.NUM_WORKERS = 0
config.freeze()
train, val, loader_train, loader_val, _ = build_loader(config)
orders = []
for epoch in range(2):
    loader_train.sampler.set_epoch(epoch)
    orders.append(list(loader_train.sampler))
result = dict(rank=dist.get_rank(), world=dist.get_world_size(), val=list(loader_val.sampler),
              val_images=sum(len(x) for x, _ in loader_val), train=orders, n_val=len(val))
with open(os.path.join({out!r}, 'rank%d.json' % dist.get_rank()), 'w') as f:
    json.dump(result, f)
dist.destroy_process_group()
'''


@pytest.mark.parametrize('world_size', [3])
def test_torchrun_ranks_shard_validation_exactly(data_root, tmp_path, world_size):
    """Real gloo process group under torchrun: rank and world size come from torch.distributed."""
    import subprocess
    import sys
    script = tmp_path / 'shard.py'
    script.write_text(_DISTRIBUTED_SCRIPT.format(root=ROOT, data=data_root, out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(world_size),
                           '--master_port', str(free_port()), str(script)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(world_size)]
    n_val = results[0]['n_val']
    assert all(r['world'] == world_size for r in results)
    assert sorted(i for r in results for i in r['val']) == list(range(n_val))
    assert sum(r['val_images'] for r in results) == n_val
    for epoch in range(2):  # training shares partition the (padded) split every epoch
        assert len(set(i for r in results for i in r['train'][epoch])) == 24
    assert results[0]['train'][0] != results[0]['train'][1]

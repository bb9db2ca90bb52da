"""Multi-node launching: two torchrun launchers ("nodes", one process each) joined through a
c10d rendezvous on localhost train and validate exactly as one launcher with two processes,
and only global rank 0 writes metrics and checkpoints into the (here shared) output folder."""
import os
import subprocess
import sys

import torch

from helpers.runs import ROOT, collect, free_port, read_metrics

EPOCHS = 2
# every wait is bounded: a launcher whose peer never comes gives up after join_timeout
RDZV_CONF = 'join_timeout=60,read_timeout=60'


def _launch(launcher_flags, cfg, out, cwd):
    cmd = [sys.executable, '-m', 'torch.distributed.run', *launcher_flags, os.path.join(ROOT, 'main.py'),
           '--cfg', cfg, '--output', str(out), '--opts', 'TRAIN.EPOCHS', str(EPOCHS)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(cwd))


def test_two_nodes_through_c10d_rendezvous_equal_one_node_with_two_processes(cfg_file, tmp_path):
    port = free_port()
    node = ['--nnodes', '2', '--nproc_per_node', '1', '--rdzv-backend', 'c10d',
            '--rdzv-endpoint', f'localhost:{port}', '--rdzv-id', f'multinode-test-{os.getpid()}',
            '--rdzv-conf', RDZV_CONF, '--max-restarts', '0']
    single = ['--standalone', '--nproc_per_node', '2']
    shared, reference = tmp_path / 'shared', tmp_path / 'reference'
    # all three launchers at once: each worker spends most of its time importing torch
    procs = {'node_a': _launch(node, cfg_file, shared, tmp_path),
             'node_b': _launch(node, cfg_file, shared, tmp_path),
             'single': _launch(single, cfg_file, reference, tmp_path)}
    results = collect(procs, timeout=240)
    for name, (code, _, err) in results.items():
        assert code == 0, f'{name} exited {code}:\n{err[-3000:]}'

    multi_dir, single_dir = shared / 'tiny' / 'default', reference / 'tiny' / 'default'
    # Which launcher's worker becomes global rank 0 is not fixed: c10d ranks the nodes by
    # sorting (host name, launcher pid), ignoring --node-rank and the order of joining. It
    # does not matter here: a worker's behaviour is a function of its global rank alone
    # (seed SEED + rank, data shard by rank; LOCAL_RANK only picks a GPU), so whichever
    # launcher gets rank 0, the pair of processes is the same as the standalone run's.
    # What must hold is that each node got exactly one of the two ranks: rank 0's console
    # log (on stdout) appears in exactly one launcher's output.
    rank0_out = [name for name in ('node_a', 'node_b') if 'world size 2, rank 0' in results[name][1]]
    assert len(rank0_out) == 1, rank0_out
    for rank in (0, 1):
        assert f'world size 2, rank {rank}' in (multi_dir / f'log_rank{rank}.txt').read_text()

    multi, ref = read_metrics(multi_dir), read_metrics(single_dir)
    # one line per epoch: rank 0 alone appends to metrics.jsonl (two writers would double them)
    assert [m['epoch'] for m in multi] == [m['epoch'] for m in ref] == list(range(EPOCHS))
    for m, r in zip(multi, ref):
        for key in ('train_loss', 'acc1', 'acc5', 'val_loss', 'lr', 'n_images'):
            assert m[key] == r[key], (m['epoch'], key, m[key], r[key])

    last = f'ckpt_epoch_{EPOCHS - 1}.pth'
    multi_state = torch.load(multi_dir / last, map_location='cpu', weights_only=True)
    ref_state = torch.load(single_dir / last, map_location='cpu', weights_only=True)
    assert multi_state['world_size'] == ref_state['world_size'] == 2
    assert multi_state['model'].keys() == ref_state['model'].keys()
    for key, value in ref_state['model'].items():
        assert torch.equal(multi_state['model'][key], value), key
    # the per-rank RNG states saved for exact resume match rank by rank
    for m, r in zip(multi_state['ranks'], ref_state['ranks']):
        assert torch.equal(m['rng']['torch'], r['rng']['torch'])
    # checkpoints are written once, by rank 0, with no temporaries left behind
    assert sorted(p.name for p in multi_dir.glob('*.pth*')) == sorted(p.name for p in single_dir.glob('*.pth*'))
    assert not list(multi_dir.glob('*.tmp*'))

"""TRAIN.PARALLEL through main.py on 2 CPU processes (gloo): FSDP2 and ZeRO train like DDP,
sharded checkpoints are whole folders that load into 1 or 3 processes, into a DDP run and
into one official-format file; a DDP checkpoint continues as FSDP; unsupported
combinations are one-line errors."""
import glob
import os
import subprocess
import sys

import pytest
import torch

import main
from checkpoints import folder as checkpoint_folder
from checkpoints import sharded
from checkpoints.reading import model_state_dict, read_checkpoint
from helpers.runs import N_VAL, ROOT, collect, free_port, read_metrics, stop_at
from models.swin_transformer import SwinTransformer
from utils import EXIT_PREEMPTED

# micro-batches of 4, two per update: the accumulation paths (no_sync, FSDP's
# set_requires_gradient_sync) run in every comparison
COMMON = ['--batch-size', '4', '--accumulation-steps', '2']


def _start(cfg, out, nproc, *opts, args=(), script='main.py'):
    """A torchrun launch (or a plain process for nproc 0) of main.py on the tiny config."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    launcher = ([sys.executable, os.path.join(ROOT, script)] if nproc == 0 else
                [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
                 '--master_port', str(free_port()), os.path.join(ROOT, script)])
    tail = ['--cfg', cfg, '--output', str(out), *COMMON, *args] + (['--opts', *opts] if opts else [])
    return subprocess.Popen(launcher + (tail if script == 'main.py' else list(args)), env=env, cwd=str(out.parent),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ok(results):
    for name, (code, _, err) in results.items():
        assert code == 0, f'{name}: exit {code}\n{err[-3000:]}'


@pytest.fixture(scope='module')
def runs(cfg_file, tmp_path_factory):
    """The same 2-epoch training as ddp, fsdp and zero, 2 processes each."""
    root = tmp_path_factory.mktemp('parallel')
    # fsdp also checkpoints activations (recomputing a block gathers its shards again)
    procs = {kind: _start(cfg_file, root / kind, 2, 'TRAIN.PARALLEL', kind, 'SAVE_KEEP_LAST', '1',
                          args=['--use-checkpoint'] if kind == 'fsdp' else [])
             for kind in ('ddp', 'fsdp', 'zero')}
    _ok(collect(procs, timeout=400))
    return {kind: root / kind / 'tiny' / 'default' for kind in procs}


def _weights(path):
    return model_state_dict(read_checkpoint(str(path)))


def test_fsdp_and_zero_train_like_ddp(runs):
    reference = read_metrics(runs['ddp'])
    for kind in ('fsdp', 'zero'):
        lines = read_metrics(runs[kind])
        assert [m['epoch'] for m in lines] == [0, 1]
        for got, want in zip(lines, reference):
            assert got['train_loss'] == pytest.approx(want['train_loss'], rel=1e-4), kind
            assert got['val_loss'] == pytest.approx(want['val_loss'], rel=1e-4), kind
            assert got['acc1'] == want['acc1'] and got['n_images'] == 3 * N_VAL
    ddp = _weights(runs['ddp'] / 'ckpt_epoch_1.pth')
    for kind, name in (('fsdp', 'ckpt_epoch_1.dcp'), ('zero', 'ckpt_epoch_1.pth')):
        got = _weights(runs[kind] / name)
        assert set(got) == set(ddp)
        for key in ddp:
            torch.testing.assert_close(got[key], ddp[key], rtol=1e-4, atol=1e-6, msg=f'{kind} {key}')

    # ZeRO's checkpoint holds the whole optimizer state, gathered from both ranks
    zero = torch.load(runs['zero'] / 'ckpt_epoch_1.pth', weights_only=True)['optimizer']
    plain = torch.load(runs['ddp'] / 'ckpt_epoch_1.pth', weights_only=True)['optimizer']
    assert sorted(zero['state']) == sorted(plain['state']) and len(plain['state']) > 0
    for index, entry in plain['state'].items():
        torch.testing.assert_close(zero['state'][index]['exp_avg'], entry['exp_avg'], rtol=1e-3, atol=1e-7)
    assert 'ZeRO: the optimizer state is sharded over 2 processes' in (runs['zero'] / 'log_rank0.txt').read_text()


def test_sharded_checkpoints_are_whole_folders_pruned_and_linked(runs):
    folder = runs['fsdp']
    log = (folder / 'log_rank0.txt').read_text()
    assert 'FSDP: parameters, gradients and optimizer state sharded over 2 process(es)' in log
    assert 'memory per process' in log
    # SAVE_KEEP_LAST 1 removed epoch 0's folder; best is a linked copy; no temporaries left
    assert sorted(os.path.basename(p) for p in glob.glob(str(folder / 'ckpt_*'))) == ['ckpt_epoch_1.dcp']
    assert (folder / 'latest').read_text().strip() == 'ckpt_epoch_1.dcp'
    assert not glob.glob(str(folder / '*tmp*'))
    shards = sorted(os.path.basename(p) for p in glob.glob(str(folder / 'ckpt_epoch_1.dcp' / '*')))
    assert shards == ['.metadata', '__0_0.distcp', '__1_0.distcp', 'meta.pt'] or \
        shards == ['__0_0.distcp', '__1_0.distcp', 'meta.pt']  # glob hides dot files on some systems
    meta = read_checkpoint(str(folder / 'ckpt_epoch_1.dcp'))
    assert meta['epoch'] == 1 and meta['world_size'] == 2 and isinstance(meta['config'], str)
    assert 'model' not in meta and 'optimizer' not in meta  # those stay in the shards
    best = read_checkpoint(str(folder / checkpoint_folder.BEST_FOLDER))
    assert best['max_accuracy'] == max(m['acc1'] for m in read_metrics(folder))


@pytest.mark.parametrize('nproc', [1, 3])
def test_sharded_checkpoint_loads_into_another_process_count(runs, tmp_path, nproc):
    """Saved by 2 processes; sharded over 1 or 3, the gathered model and optimizer state
    equal the checkpoint's tensors exactly (tests/helpers/reshard_worker.py)."""
    path = str(runs['fsdp'] / 'ckpt_epoch_1.dcp')
    (tmp_path / 'w').mkdir()
    worker = _start('', tmp_path / 'w', nproc, script='tests/helpers/reshard_worker.py', args=[path])
    results = collect({nproc: worker}, 300)
    _ok(results)
    assert results[nproc][1].count('tensors equal') == nproc


def test_sharded_run_resumes_with_1_and_3_processes_and_as_ddp(runs, cfg_file, tmp_path):
    procs = {}
    for name, nproc, kind in (('one', 0, 'fsdp'), ('three', 3, 'fsdp'), ('as_ddp', 2, 'ddp')):
        procs[name] = _start(cfg_file, tmp_path / name, nproc, 'TRAIN.PARALLEL', kind, 'TRAIN.EPOCHS', '3',
                             args=['--resume', str(runs['fsdp'] / 'ckpt_epoch_1.dcp')])
    _ok(collect(procs, timeout=400))
    for name in procs:
        folder = tmp_path / name / 'tiny' / 'default'
        log = (folder / 'log_rank0.txt').read_text()
        assert 'resumed from' in log and 'continuing at epoch 2' in log, name
        assert [m['epoch'] for m in read_metrics(folder)] == [2], name
        assert (folder / ('ckpt_epoch_2.pth' if name == 'as_ddp' else 'ckpt_epoch_2.dcp')).exists(), name
    assert 'the setup changed' in (tmp_path / 'three' / 'tiny' / 'default' / 'log_rank0.txt').read_text()


def _fsdp_against_ddp(cfg, tmp_path, epoch: int, *opts, args=(), rel: float = 1e-4) -> None:
    """The same run as ddp and fsdp (2 processes each): equal loss, weights within 1e-4."""
    procs = {kind: _start(cfg, tmp_path / kind, 2, 'TRAIN.PARALLEL', kind, *opts, args=list(args))
             for kind in ('ddp', 'fsdp')}
    _ok(collect(procs, timeout=400))
    ddp, fsdp = (tmp_path / kind / 'tiny' / 'default' for kind in ('ddp', 'fsdp'))
    (want,), (got,) = read_metrics(ddp), read_metrics(fsdp)
    assert got['train_loss'] == pytest.approx(want['train_loss'], rel=rel)
    expected = _weights(ddp / f'ckpt_epoch_{epoch}.pth')
    for key, tensor in _weights(fsdp / f'ckpt_epoch_{epoch}.dcp').items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-4, atol=1e-6, msg=key)


def test_ddp_checkpoint_continues_as_fsdp_like_ddp(runs, cfg_file, tmp_path):
    """A file checkpoint into a sharded run: the third epoch equals DDP's own continuation."""
    _fsdp_against_ddp(cfg_file, tmp_path, 2, 'TRAIN.EPOCHS', '3',
                      args=['--resume', str(runs['ddp'] / 'ckpt_epoch_1.pth')])


def test_consolidated_file_loads_into_the_plain_model_with_equal_outputs(runs, cfg_file, tmp_path, capsys):
    from tools import consolidate_checkpoint
    folder = runs['fsdp'] / 'ckpt_epoch_1.dcp'
    out = tmp_path / 'swin.pth'
    assert consolidate_checkpoint.main(['--checkpoint', str(folder), '--output', str(out)]) == 0
    state = torch.load(out, map_location='cpu', weights_only=True)
    assert set(state) == {'model', 'config', 'epoch', 'max_accuracy'} and state['epoch'] == 1
    model = SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                            window_size=4, num_classes=3, drop_path_rate=0.0)
    model.load_state_dict(state['model'], strict=True)  # official keys, nothing left over
    full = sharded.read_full_state(str(folder))
    reference = SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                window_size=4, num_classes=3, drop_path_rate=0.0)
    reference.load_state_dict(full)
    images = torch.randn(5, 3, 32, 32)
    assert torch.equal(model.eval()(images), reference.eval()(images))

    # --eval of the file and of the folder reproduce the run's last validation
    last = read_metrics(runs['fsdp'])[-1]
    for name, path in (('file', out), ('folder', folder)):
        assert main.main(['--cfg', cfg_file, '--output', str(tmp_path / name), '--eval', '--resume', str(path)]) == 0
        (line,) = read_metrics(tmp_path / name / 'tiny' / 'default')
        assert line['acc1'] == last['acc1'] and line['val_loss'] == pytest.approx(last['val_loss'], rel=1e-5)

    assert consolidate_checkpoint.main(['--checkpoint', str(out), '--output', str(tmp_path / 'x.pth')]) == 2
    assert 'is not a sharded checkpoint folder' in capsys.readouterr().err


def test_interrupted_sharded_write_is_removed_and_old_folder_kept(tmp_path):
    old = tmp_path / 'best.dcp'
    old.mkdir()
    (old / 'meta.pt').write_bytes(b'old')
    torn = tmp_path / ('ckpt_epoch_3.dcp' + sharded.TMP_SUFFIX)
    torn.mkdir()
    (torn / '__0_0.distcp').write_bytes(b'half')
    assert checkpoint_folder.remove_stale_temporaries(str(tmp_path)) == [torn.name]
    assert not torn.exists() and (old / 'meta.pt').read_bytes() == b'old'
    new = tmp_path / 'new'
    new.mkdir()
    (new / 'meta.pt').write_bytes(b'new')
    checkpoint_folder.replace_folder(str(new), str(old))
    assert (old / 'meta.pt').read_bytes() == b'new' and sorted(os.listdir(tmp_path)) == ['best.dcp']

    # killed between setting the old folder aside and renaming the new one in: the old one
    # comes back at the next start, the half-published new one goes
    os.replace(old, str(old) + checkpoint_folder.SET_ASIDE)
    (tmp_path / ('best.dcp' + sharded.TMP_SUFFIX)).mkdir()
    checkpoint_folder.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['best.dcp'] and (old / 'meta.pt').read_bytes() == b'new'

    # a new best in one format removes the other format's best an earlier run left
    (tmp_path / 'best.pth').write_bytes(b'ddp run')
    checkpoint_folder.remove_other_best(str(tmp_path), sharded=True)
    assert sorted(os.listdir(tmp_path)) == ['best.dcp']


@pytest.mark.parametrize('opts, message', [
    (['TRAIN.EMA.ENABLE', 'True'], 'TRAIN.EMA is not supported with TRAIN.PARALLEL fsdp'),
    (['TRAIN.COMPILE', 'True'], 'TRAIN.COMPILE is not supported with TRAIN.PARALLEL fsdp'),
    (['AMP_ENABLE', 'True', 'AMP_DTYPE', 'fp16'], 'set AMP_DTYPE bf16'),
    (['TRAIN.PARALLEL', 'fsdpp'], "TRAIN.PARALLEL 'fsdpp'"),
])
def test_unsupported_combinations_are_one_line_errors(cfg_file, tmp_path, capsys, opts, message):
    parallel = [] if opts[0] == 'TRAIN.PARALLEL' else ['TRAIN.PARALLEL', 'fsdp']
    assert main.main(['--cfg', cfg_file, '--output', str(tmp_path), '--opts', *parallel, *opts]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and 'Traceback' not in err


def test_lamb_under_fsdp_trains_like_ddp(cfg_file, tmp_path):
    """LAMB's trust ratio needs each weight's whole norm: over FSDP shards (DTensors) it
    must equal the replicated run's."""
    _fsdp_against_ddp(cfg_file, tmp_path, 0, 'TRAIN.OPTIMIZER.NAME', 'lamb', 'TRAIN.EPOCHS', '1', rel=1e-5)


@pytest.mark.parametrize('accumulation, compile_, static', [(1, False, True), (2, False, False), (1, True, False)])
def test_ddp_uses_a_static_graph_where_valid(tmp_path, accumulation, compile_, static):
    """Static mode for plain eager steps; not after no_sync micro-steps (DDP asserts there)
    nor under compile."""
    import torch.distributed as dist

    from config import default_config
    from distributed import parallel
    from distributed.process_group import DistContext
    config = default_config()
    config.TRAIN.ACCUMULATION_STEPS, config.TRAIN.COMPILE = accumulation, compile_
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        ddp = parallel.training_module(torch.nn.Linear(3, 2), config, DistContext(0, 1, 0, torch.device('cpu')))
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and ddp.static_graph == static
    finally:
        dist.destroy_process_group()


V2_OPTS = ['MODEL.TYPE', 'swinv2', 'MODEL.NAME', 'tiny', 'MODEL.SWINV2.EMBED_DIM', '16',
           'MODEL.SWINV2.DEPTHS', '[2, 2]', 'MODEL.SWINV2.NUM_HEADS', '[2, 4]', 'MODEL.SWINV2.WINDOW_SIZE', '4',
           'MODEL.SWINV2.PRETRAINED_WINDOW_SIZES', '[2, 2]']


def test_bf16_fsdp_trains_like_bf16_ddp_for_v1_with_sgd_and_uneven_shards_and_v2(cfg_file, tmp_path):
    """Under AMP, fsdp gathers bf16 weights and by default reduces in bf16, where ddp keeps
    fp32 weights under autocast: close, not equal. V2's bias MLP must still run in fp32.
    The V1 pair trains with SGD, whose fused kernel has no sharded version (the multi-tensor
    one runs), in batches of 10: the 21 validation images split 11 / 10, so one rank
    validates 2 batches and the other 1 (it runs a throw-away forward so the gathers pair up)."""
    uneven = ['--batch-size', '10', '--accumulation-steps', '1']
    procs = {}
    for model, extra, args in (('v1', ['TRAIN.OPTIMIZER.NAME', 'sgd'], uneven), ('v2', V2_OPTS, [])):
        for kind in ('ddp', 'fsdp'):
            procs[model, kind] = _start(cfg_file, tmp_path / f'{model}_{kind}', 2, 'TRAIN.PARALLEL', kind,
                                        'TRAIN.EPOCHS', '1', 'AMP_ENABLE', 'True', 'AMP_DTYPE', 'bf16',
                                        *extra, args=args)  # REDUCE_DTYPE 'amp' (default): bf16
    _ok(collect(procs, timeout=400))
    for model in ('v1', 'v2'):
        (want,), (got,) = (read_metrics(tmp_path / f'{model}_{kind}' / 'tiny' / 'default') for kind in ('ddp', 'fsdp'))
        assert got['n_images'] == 3 * N_VAL, model
        assert got['train_loss'] == pytest.approx(want['train_loss'], rel=2e-3), model
        assert got['val_loss'] == pytest.approx(want['val_loss'], rel=2e-3), model
        log = (tmp_path / f'{model}_fsdp' / 'tiny' / 'default' / 'log_rank0.txt').read_text()
        assert 'gathered in torch.bfloat16, gradients reduced in torch.bfloat16' in log


def test_unfit_or_damaged_sharded_checkpoints_are_one_line_errors(runs, cfg_file, tmp_path, capsys):
    from tools import consolidate_checkpoint
    source = runs['fsdp'] / 'ckpt_epoch_1.dcp'
    (tmp_path / 'other').mkdir()
    procs = {'other grouping': _start(cfg_file, tmp_path / 'other', 0, 'TRAIN.PARALLEL', 'fsdp',
                                      'TRAIN.LAYER_DECAY', '0.9', 'TRAIN.EPOCHS', '3', args=['--resume', str(source)])}
    (code, _, err), = collect(procs, timeout=300).values()
    assert code == 2 and 'Traceback' not in err, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and 'does not fit this run' in err

    import shutil
    damaged = tmp_path / 'damaged.dcp'
    shutil.copytree(source, damaged)
    os.remove(damaged / '__0_0.distcp')
    assert consolidate_checkpoint.main(['--checkpoint', str(damaged), '--output', str(tmp_path / 'x.pth')]) == 2
    err = capsys.readouterr().err
    assert 'cannot read the sharded checkpoint' in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'x.pth').exists()


def test_fsdp_run_stopped_mid_epoch_resumes_bit_for_bit(cfg_file, tmp_path, monkeypatch):
    """A stop signal inside epoch 1 of an fsdp run (one process, a group of one) writes a
    sharded mid-epoch checkpoint; resuming it ends equal to the uninterrupted run."""
    from test_resilience import RANDOMNESS

    opts = ['TRAIN.PARALLEL', 'fsdp', 'TRAIN.EPOCHS', '2', 'SAVE_STEP_FREQ', '4', *RANDOMNESS]

    def run(out):
        return main.main(['--cfg', cfg_file, '--output', str(out), '--opts', *opts])
    assert run(tmp_path / 'whole') == 0
    with monkeypatch.context() as m:
        stop_at(m, 9)  # update 8, inside epoch 1 (6 updates per epoch)
        assert run(tmp_path / 'cut') == EXIT_PREEMPTED
    cut = tmp_path / 'cut' / 'tiny' / 'default'
    assert (cut / 'latest').read_text().strip() == 'ckpt_step_8.dcp' and (cut / 'ckpt_step_8.dcp').is_dir()
    assert run(tmp_path / 'cut') == 0
    assert not torch.distributed.is_initialized()  # the group of one is shut down again
    whole = _weights(tmp_path / 'whole' / 'tiny' / 'default' / 'ckpt_epoch_1.dcp')
    for key, value in _weights(cut / 'ckpt_epoch_1.dcp').items():
        assert torch.equal(value, whole[key]), key
    assert not list(cut.glob('ckpt_step_*'))


def test_fsdp_run_frees_its_process_group(cfg_file, tmp_path, monkeypatch):
    """An fsdp run's process group is gone once the run returns. DTensor's caches keep the
    DeviceMeshes, which hold the group: destroy_process_group alone left it (and its gloo
    threads) alive into interpreter exit, where a worker freeing a collective's tensors
    aborts the process ('terminate called without an active exception')."""
    import weakref

    import torch.distributed as dist
    groups = []
    destroy = dist.destroy_process_group

    def spy(group=None):
        groups.append(weakref.ref(dist.group.WORLD))
        destroy(group)
    monkeypatch.setattr(dist, 'destroy_process_group', spy)
    assert main.main(['--cfg', cfg_file, '--output', str(tmp_path), '--opts', 'TRAIN.PARALLEL', 'fsdp',
                      'TRAIN.EPOCHS', '1']) == 0
    assert len(groups) == 1 and groups[0]() is None

"""tools/predict.py and tools/export_onnx.py run as a user runs them (subprocesses, started
together since each imports torch) on a tiny Swin and generated JPEG files: the printed
classes against the model's own logits through the validation pipeline, class names from
a file and from the training folders, EMA weights, one-line errors, and the ONNX file
against PyTorch."""
import argparse
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from config import get_config
from data.device_prep import DevicePreprocessor
from data.transforms import build_transform
from helpers.runs import ROOT, collect
from models import build_model

PREDICT = os.path.join(ROOT, 'tools', 'predict.py')
EXPORT = os.path.join(ROOT, 'tools', 'export_onnx.py')
PREPARE = os.path.join(ROOT, 'tools', 'prepare_digits.py')
DEMO_CFG = os.path.join(ROOT, 'configs', 'demo', 'swin_micro_digits.yaml')
# class folders whose sorted order is not their numeric order, so label order is tested
FOLDERS = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine']
# 48 px with TEST.CROP: resize to 54 and center-crop; 12x12 tokens, windows of 4, and a
# second stage of 6x6 padded to 8x8 with a shift: every path of the model
TINY = ['DATA.IMG_SIZE', '48', 'TEST.CROP', 'True', 'MODEL.SWIN.PATCH_SIZE', '4', 'MODEL.SWIN.EMBED_DIM', '16',
        'MODEL.SWIN.NUM_HEADS', '[1, 2]', 'MODEL.SWIN.WINDOW_SIZE', '4', 'MODEL.DROP_PATH_RATE', '0.0']
LINE = re.compile(r'(\d)\. (.+?) +(\d+\.\d\d)%')


def _images(folder):
    """Three real JPEG files of different sizes and content."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 70, dtype=np.uint8)
    arrays = {'noise.jpg': rng.integers(0, 256, (50, 64, 3), dtype=np.uint8),
              'ramp.jpg': np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]), -1),
              'red.jpg': np.tile(np.array([220, 30, 40], dtype=np.uint8), (60, 45, 1))}
    paths = []
    for name, array in arrays.items():
        path = os.path.join(folder, name)
        Image.fromarray(np.ascontiguousarray(array)).save(path, quality=90)
        paths.append(path)
    return paths


def _probabilities(model, config, paths):
    """Softmax of the model's logits through the validation transform and normalization."""
    transform = build_transform(False, config)
    images = torch.stack([transform(open(p, 'rb').read()) for p in paths])
    prep = DevicePreprocessor(config, torch.device('cpu'), is_train=False)
    with torch.no_grad():
        return model(prep(images, torch.zeros(len(paths), dtype=torch.long))[0]).softmax(dim=1)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """Checkpoints (ours with config, with EMA weights, official without config), the
    config as a YAML file, a class-names file, images and the expected probabilities."""
    root = tmp_path_factory.mktemp('tools')
    data = root / 'data'
    for name in FOLDERS:
        (data / 'train' / name).mkdir(parents=True)
    config = get_config(argparse.Namespace(cfg=DEMO_CFG, opts=TINY + ['DATA.DATA_PATH', str(data)]))
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        model.head.weight.mul_(30)  # logits that depend clearly on the pixels
    images = _images(str(root))
    probs = _probabilities(model, config, images)
    # EMA weights whose favourite class is one the model never ranks first
    ema_class = next(c for c in range(10) if c not in probs.argmax(dim=1).tolist())
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    ema['head.bias'][ema_class] += 20.0
    ema_model = build_model(config).eval()
    ema_model.load_state_dict(ema)
    paths = {'ours': root / 'ours.pth', 'ema': root / 'ema.pth', 'official': root / 'official.pth',
             'cfg': root / 'tiny.yaml', 'cfg_no_folders': root / 'no_folders.yaml', 'names': root / 'names.txt',
             'short_names': root / 'short.txt', 'not_an_image': root / 'notes.jpg'}
    torch.save({'model': model.state_dict(), 'config': config.dump()}, paths['ours'])
    torch.save({'model': model.state_dict(), 'model_ema': ema, 'config': config.dump()}, paths['ema'])
    torch.save({'model': model.state_dict()}, paths['official'])
    paths['cfg'].write_text(config.dump())
    # the same model with a data path that has no train/ folder: classes are shown by number
    elsewhere = get_config(argparse.Namespace(cfg=DEMO_CFG, opts=TINY + ['DATA.DATA_PATH', str(root / 'none')]))
    paths['cfg_no_folders'].write_text(elsewhere.dump())
    paths['names'].write_text(''.join(f'label-{i}\n' for i in range(10)))
    paths['short_names'].write_text('a\nb\n')
    paths['not_an_image'].write_text('not a JPEG\n')
    return dict(model=model, config=config, images=images, probs=probs, ema_model=ema_model,
                ema_probs=_probabilities(ema_model, config, images), ema_class=ema_class,
                **{k: str(v) for k, v in paths.items()})


def _start(script, args, cwd):
    return subprocess.Popen([sys.executable, script, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(procs):
    return collect(procs, timeout=300)


ERROR_CASES = {  # name -> (arguments, words the error line names)
    'missing_checkpoint': (lambda s: ['--checkpoint', s['ours'] + '.gone', s['images'][0]], ['does not exist']),
    'official_without_cfg': (lambda s: ['--checkpoint', s['official'], s['images'][0]], ['--cfg', 'no config']),
    'ema_without_ema': (lambda s: ['--checkpoint', s['ours'], '--ema', s['images'][0]], ['EMA', '--ema']),
    'unreadable_image': (lambda s: ['--checkpoint', s['ours'], s['not_an_image']], ['notes.jpg', 'not a readable']),
    'missing_image': (lambda s: ['--checkpoint', s['ours'], s['images'][0], 'gone.jpg'], ['gone.jpg']),
    'wrong_class_count': (lambda s: ['--checkpoint', s['ours'], '--classes', s['short_names'], s['images'][0]],
                          ['2 classes', '10']),
}


@pytest.fixture(scope='module')
def predict_runs(setup, tmp_path_factory):
    """Every predict case, run concurrently from a folder of its own."""
    s = setup
    cases = {
        'folders': ['--checkpoint', s['ours'], *s['images']],
        'ema_names': ['--checkpoint', s['ema'], '--ema', '--classes', s['names'], *s['images']],
        'official_cfg': ['--checkpoint', s['official'], '--cfg', s['cfg'], s['images'][0]],
        'cfg_wins': ['--checkpoint', s['ours'], '--cfg', s['cfg_no_folders'], s['images'][0]],
        **{name: make(s) for name, (make, _) in ERROR_CASES.items()},
    }
    cwd = str(tmp_path_factory.mktemp('cwd'))
    return _finish({name: _start(PREDICT, args, cwd) for name, args in cases.items()})


def _parse(out):
    """{header: [(name, percent), ...]} of predict's output."""
    results, header = {}, None
    for line in out.splitlines():
        m = LINE.fullmatch(line)
        if m:
            assert int(m.group(1)) == len(results[header]) + 1, line
            results[header].append((m.group(2), float(m.group(3))))
        else:
            header = line
            results[header] = []
    return results


def _check_top5(out, images, probs, names):
    results = _parse(out)
    assert list(results) == images
    for path, row in zip(images, probs):
        printed = results[path]
        top = row.topk(5)
        assert [n for n, _ in printed] == [names[i] for i in top.indices.tolist()]
        assert [p for _, p in printed] == pytest.approx((100 * top.values).tolist(), abs=0.006)
        assert sum(p for _, p in printed) <= 100.0 + 0.03
    return results


def test_predict_prints_the_models_top5_with_folder_class_names(setup, predict_runs):
    rc, out, err = predict_runs['folders']
    assert rc == 0 and err == '', err
    results = _check_top5(out, setup['images'], setup['probs'], sorted(FOLDERS))
    # not all images get the same answer: the pixels reached the model
    assert len({results[p][0][0] for p in setup['images']}) > 1


def test_predict_ema_weights_and_class_names_file(setup, predict_runs):
    rc, out, err = predict_runs['ema_names']
    assert rc == 0 and err == '', err
    names = [f'label-{i}' for i in range(10)]
    results = _check_top5(out, setup['images'], setup['ema_probs'], names)
    assert all(results[p][0][0] == names[setup['ema_class']] for p in setup['images'])
    assert setup['ema_class'] not in setup['probs'].argmax(dim=1).tolist()  # the plain weights differ


def test_predict_official_checkpoint_with_cfg(setup, predict_runs):
    rc, out, err = predict_runs['official_cfg']
    assert rc == 0 and err == '', err
    _check_top5(out, setup['images'][:1], setup['probs'][:1], sorted(FOLDERS))


def test_predict_cfg_wins_over_the_embedded_config(setup, predict_runs):
    rc, out, err = predict_runs['cfg_wins']
    assert rc == 0 and err == '', err
    _check_top5(out, setup['images'][:1], setup['probs'][:1], [f'class {i}' for i in range(10)])


@pytest.mark.parametrize('name', list(ERROR_CASES))
def test_predict_mistake_gives_one_error_line_and_exit_2(predict_runs, name):
    rc, out, err = predict_runs[name]
    assert 'Traceback' not in err, err
    assert rc == 2 and out == '', (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    for word in ERROR_CASES[name][1]:
        assert word in lines[0], (word, lines[0])


# --------------------------------------------------------------------------- ONNX

@pytest.fixture(scope='module')
def onnx_runs(setup, tmp_path_factory):
    pytest.importorskip('onnx')
    pytest.importorskip('onnxscript')
    pytest.importorskip('onnxruntime')
    out = tmp_path_factory.mktemp('onnx')
    cases = {'default': ['--checkpoint', setup['ours'], '--output', str(out / 'tiny.onnx')],
             'zero_tolerance': ['--checkpoint', setup['ours'], '--output', str(out / 'strict.onnx'),
                                '--atol', '0', '--rtol', '0'],
             # the exporter would silently write opset 18 instead (see the tool's docstring)
             'opset_17': ['--checkpoint', setup['ours'], '--output', str(out / 'old.onnx'), '--opset', '17']}
    results = _finish({name: _start(EXPORT, args, str(out)) for name, args in cases.items()})
    return out, results


def _reported_max_abs(out):
    m = re.search(r'max abs diff (\S+),', out)
    assert m, out
    return float(m.group(1))


def test_export_onnx_matches_pytorch_at_any_batch_size(setup, onnx_runs):
    import onnxruntime
    folder, results = onnx_runs
    rc, out, err = results['default']
    assert rc == 0 and 'check passed' in out, (out, err)
    assert 'Traceback' not in err, err
    assert _reported_max_abs(out) <= 1e-4
    assert sorted(os.listdir(folder)) == ['strict.onnx', 'tiny.onnx']  # no temporary left
    session = onnxruntime.InferenceSession(str(folder / 'tiny.onnx'), providers=['CPUExecutionProvider'])
    model = setup['model']
    for batch in (1, 3):
        images = torch.randn(batch, 3, 48, 48)
        with torch.no_grad():
            expected = model(images).numpy()
        got = session.run(['logits'], {'images': images.numpy()})[0]
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 + 1e-4 * np.abs(expected).max())


def test_export_onnx_check_fails_beyond_tolerance(onnx_runs):
    rc, out, err = onnx_runs[1]['zero_tolerance']
    # fp32 kernels of onnxruntime and PyTorch round differently, so the difference is not 0
    # (1e-8 to 1e-6 in every run measured); were it 0, passing would be right
    expected = 1 if _reported_max_abs(out) > 0 else 0
    assert rc == expected and 'Traceback' not in err, (rc, out, err)
    assert ('check FAILED' in out) == (expected == 1)


def test_export_onnx_refuses_an_opset_it_cannot_write(onnx_runs):
    folder, results = onnx_runs
    rc, out, err = results['opset_17']
    assert rc == 2 and out == '' and 'Traceback' not in err, (rc, out, err)
    assert len(err.splitlines()) == 1 and err.startswith('error: ') and '--opset' in err, err
    assert not os.path.exists(folder / 'old.onnx')


def test_cli_writes_and_reports_bad_out_dir(tmp_path):
    (tmp_path / 'a_file').write_text('x')
    run = dict(cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # both at once: each start pays the torch import of the `data` package
    good = subprocess.Popen([sys.executable, PREPARE, os.path.join('out', 'digits')], **run)
    bad = subprocess.Popen([sys.executable, PREPARE, os.path.join('a_file', 'digits')], **run)
    out, err = good.communicate(timeout=120)
    assert good.returncode == 0, err
    assert out == f"wrote 1797 images (1438 train / 359 val) to '{os.path.join('out', 'digits')}'\n"
    assert sum(len(names) for _, _, names in os.walk(tmp_path / 'out' / 'digits')) == 1797  # every scan
    out, err = bad.communicate(timeout=120)
    assert bad.returncode == 2
    assert out == ''
    assert len(err.splitlines()) == 1 and err.startswith('error: ') and 'a_file' in err
    assert sorted(os.listdir(tmp_path)) == ['a_file', 'out']

"""Export a checkpoint's model to ONNX (fp32, eval mode, dynamic batch axis) and check the
file against PyTorch with onnxruntime:

    python tools/export_onnx.py --checkpoint output/swin_micro_digits/default/best.pth --output swin.onnx

The input is `images` (batch, 3, DATA.IMG_SIZE, DATA.IMG_SIZE), normalized as in training
(data/device_prep.py); the output is `logits` (batch, MODEL.NUM_CLASSES).

Why these choices:
- Exporter: torch's dynamo-based one (torch.export + onnxscript), the default since torch
  2.9. The TorchScript exporter (`dynamo=False`) fails on this model: the inference path
  of `Mlp` (models/layers.py) applies GELU in place through `aten::gelu.out`, which it
  cannot translate.
- Opset 18 by default: the opset the exporter's operator library is written in, so no
  version conversion runs. 19-25 are converted up and load and match in onnxruntime 1.31.
  Others are refused: for 17 and 26 onnx's version converter fails (reductions whose axes
  are inputs; no adapter for Gelu) and the exporter silently keeps opset 18, so the file
  would not be what was asked (at 26 onnxruntime also rejects it). The written opset is
  checked, for other versions of these packages.
- The model is traced at batch 2: torch.export specializes dimensions of size 1, so a
  batch-1 example would fix the batch axis. The check runs at batch 1, which the trace
  did not see, and at --batch-size.
- Tolerance: the check passes when max |onnx - torch| <= atol + rtol * max |torch| over
  the logits. fp32 differences measured: about 1e-7 relative to the largest logit (Swin-T
  224 and the digits demo), so the defaults (1e-4 each) leave a wide margin while a wrong
  graph fails by orders of magnitude.

The file is written to a temporary name in the output folder and renamed into place, so a
crash never leaves a torn file. Exit status: 0 check passed, 1 check failed, 2 user mistake
(one `error:` line).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np
import torch

# checkpoint_model (next to this file) also puts the repo root on sys.path
from checkpoint_model import load_model, tool_parser

from utils import USER_ERRORS, ToolError

DEFAULT_OPSET = 18
OPSETS = range(18, 26)  # those that convert and run with the pinned torch, onnx, onnxscript, onnxruntime
TRACE_BATCH = 2  # see the module docstring: a batch of 1 would be specialized
MAX_PROTO_BYTES = 2 ** 31 - 2 ** 24  # protobuf's 2 GB limit, with room for the graph itself


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = tool_parser('Export a checkpoint to ONNX and check it with onnxruntime.')
    parser.add_argument('--output', required=True, metavar='FILE', help='the .onnx file to write')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET, help=f'ONNX opset (default {DEFAULT_OPSET})')
    parser.add_argument('--batch-size', type=int, default=3,
                        help='batch size of the check besides batch 1 (default 3)')
    parser.add_argument('--atol', type=float, default=1e-4, help='absolute tolerance on the logits (default 1e-4)')
    parser.add_argument('--rtol', type=float, default=1e-4,
                        help='tolerance relative to the largest |logit| (default 1e-4)')
    args = parser.parse_args(argv)
    if args.opset not in OPSETS:
        parser.error(f'--opset must be in {OPSETS.start}..{OPSETS.stop - 1}, the opsets the exporter converts '
                     f'this model to and onnxruntime runs (default {DEFAULT_OPSET})')
    if args.batch_size < 1:
        parser.error('--batch-size must be >= 1')
    if args.atol < 0 or args.rtol < 0:
        parser.error('--atol and --rtol must be >= 0')
    return args


def _import_onnxruntime():
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 (torch's exporter needs it)
    except ImportError as e:
        raise ToolError(f'{e.name} is not installed; pip install -r requirements.txt') from None
    return onnxruntime


def export(model: torch.nn.Module, img_size: int, opset: int, output: str) -> None:
    """Write `model` as ONNX with a dynamic batch axis to `output`, atomically."""
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if weight_bytes > MAX_PROTO_BYTES:
        raise ToolError(f'the model has {weight_bytes / 2 ** 30:.1f} GB of weights, more than one ONNX '
                        f'file holds (2 GB)')
    example = torch.randn(TRACE_BATCH, 3, img_size, img_size)
    # onnx_ir warns about every empty list attribute it writes (as INTS, correctly): noise here
    logging.getLogger('onnx_ir').setLevel(logging.ERROR)
    with torch.no_grad():
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, verbose=False,
                                    input_names=['images'], output_names=['logits'],
                                    dynamic_shapes=({0: torch.export.Dim('batch', min=1)},))
    written = program.model.opset_imports.get('')
    if written != opset:
        raise ToolError(f'the exporter could not convert the model to opset {opset} (it wrote opset '
                        f'{written}); use the default --opset {DEFAULT_OPSET}')
    tmp = f'{output}.tmp-{os.getpid()}'
    try:
        program.save(tmp, external_data=False)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, output)
    except OSError as e:
        raise ToolError(f"cannot write '{output}': {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def compare(session, model: torch.nn.Module, img_size: int, batch_sizes: list[int]) -> tuple[float, float]:
    """(max |onnxruntime - PyTorch|, max |PyTorch|) over the logits of the same random
    batches; inf when the shapes differ (a batch axis that is not dynamic)."""
    generator = torch.Generator().manual_seed(0)
    max_abs, max_ref = 0.0, 0.0
    for batch in batch_sizes:
        images = torch.randn(batch, 3, img_size, img_size, generator=generator)
        with torch.no_grad():
            expected = model(images).numpy()
        got = session.run(['logits'], {'images': images.numpy()})[0]
        if got.shape != expected.shape:
            return float('inf'), float(np.abs(expected).max())
        max_abs = max(max_abs, float(np.abs(got - expected).max()))
        max_ref = max(max_ref, float(np.abs(expected).max()))
    return max_abs, max_ref


def run(args: argparse.Namespace) -> bool:
    """Export and check; whether the check passed."""
    ort = _import_onnxruntime()
    config, model = load_model(args.checkpoint, args.cfg, args.ema, torch.device('cpu'))
    if config.MODEL.TYPE == 'swin_moe':  # data-dependent routing and capacity: no static graph
        raise ToolError('ONNX export of Swin-MoE is not supported (its token routing depends on the data)')
    size = config.DATA.IMG_SIZE
    export(model, size, args.opset, args.output)
    try:
        session = ort.InferenceSession(args.output, providers=['CPUExecutionProvider'])
    except Exception as e:  # onnxruntime's own error types; a new opset it does not know, say
        raise ToolError(f'onnxruntime {ort.__version__} cannot load the exported model (opset {args.opset}): '
                        f'{str(e).splitlines()[0][:300]}; try the default --opset {DEFAULT_OPSET}') from None
    batch_sizes = sorted({1, args.batch_size})
    max_abs, max_ref = compare(session, model, size, batch_sizes)
    max_rel = max_abs / max(max_ref, float(np.finfo(np.float32).tiny))
    passed = max_abs <= args.atol + args.rtol * max_ref
    print(f"wrote '{args.output}' ({os.path.getsize(args.output) / 2 ** 20:.1f} MB, opset {args.opset}, "
          f"input 'images' (batch, 3, {size}, {size}), output 'logits' (batch, {config.MODEL.NUM_CLASSES}))")
    print(f"onnxruntime vs PyTorch logits at batch sizes {', '.join(map(str, batch_sizes))}: "
          f"max abs diff {max_abs:.3e}, max rel diff {max_rel:.3e} (of the largest |logit|, {max_ref:.3g})")
    print(f"check {'passed' if passed else 'FAILED'} (atol {args.atol:g}, rtol {args.rtol:g})")
    return passed


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 (check passed), 1 (check failed) or 2 after one `error:` line."""
    try:
        return 0 if run(_parse_args(argv)) else 1
    except USER_ERRORS as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())

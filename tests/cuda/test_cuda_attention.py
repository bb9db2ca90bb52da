"""Window attention on the GPU (models/layers.py `window_attention`, one SDPA call per block):
which SDPA kernel runs in training (grad enabled, the joined bias + shift mask requiring grad)
and in validation (inference_mode), found with the profiler and recorded; the cuDNN,
memory-efficient and math backends giving the same logits and gradients (backends that refuse
the inputs are recorded, not failed); and what one block saves for backward (no batch-sized
copy of the mask, which is (1, nW*heads, N, N) and broadcast over the batch).

Run with `-s` (or `-rP`) to see the recorded kernels and saved shapes; they are also attached
to the JUnit XML as properties (`record_property`)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from engine.amp import autocast_context
from helpers.models import randomize, rel_err
from models.swin_transformer import SwinTransformer

PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16}
BATCH = 8
# kernel / op name fragments (lower case) -> SDPA backend; cuDNN's kernels may also say 'flash'
BACKEND_NAMES = (
    ('cudnn', ('cudnn_attention', 'cudnn_sdpa', 'sdpa_cudnn', 'native_sdpa')),
    ('efficient', ('efficient_attention', 'fmha_cutlass', 'mem_eff')),
    ('flash', ('flash_attention', 'flash_fwd', 'flash_bwd')),
    ('math', ('_scaled_dot_product_attention_math',)),
)


def _swin_t_like(device) -> SwinTransformer:
    """Swin-T's window (7), head width (32) and first two stages (3 and 6 heads) at 112 px:
    28 x 28 tokens in 16 windows, then 14 x 14 in 4. Randomized weights (helpers.models) and
    a relative position bias large enough to matter."""
    torch.manual_seed(0)
    model = SwinTransformer(img_size=112, patch_size=4, num_classes=10, embed_dim=96, depths=[2, 2],
                            num_heads=[3, 6], window_size=7, drop_path_rate=0.0)
    randomize(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('relative_position_bias_table'):
                p.normal_(0.0, 0.5)
    return model.to(device)


def _classify(names) -> dict[str, list[str]]:
    """SDPA backend -> the profiler names (ops and kernels) that show it ran."""
    found: dict[str, list[str]] = {}
    for name in names:
        low = name.lower()
        for backend, fragments in BACKEND_NAMES:
            if any(f in low for f in fragments) or (backend == 'cudnn' and 'cudnn' in low and 'sdpa' in low):
                found.setdefault(backend, []).append(name)
                break  # the first match: a cuDNN kernel named '..._flash_...' counts as cuDNN
    return found


def _profiled_backends(model, images, targets, phase: str, amp_dtype) -> dict[str, list[str]]:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        if phase == 'training':
            model.train()
            with autocast_context(amp_dtype, images.device):
                loss = F.cross_entropy(model(images).float(), targets)
            loss.backward()
        else:
            model.eval()
            with torch.inference_mode(), autocast_context(amp_dtype, images.device):
                model(images)
        torch.cuda.synchronize(images.device)
    return _classify({event.key for event in prof.key_averages()})


def test_sdpa_kernel_selected_in_training_and_validation(cuda_device, record_property):
    """The kernel SDPA picks for window attention, per phase and precision, recorded; it is a
    fused kernel, never the math fallback (which would keep every attention matrix)."""
    model = _swin_t_like(cuda_device)
    blk = model.layers[0].blocks[1]
    model.train()
    assert blk.attn.joined_mask(blk.attn_mask).requires_grad  # training differentiates the mask
    images = torch.randn(BATCH, 3, 112, 112, device=cuda_device)
    targets = torch.randint(0, 10, (BATCH,), device=cuda_device)
    selected, details = {}, {}
    for precision, amp_dtype in PRECISIONS.items():
        for phase in ('training', 'validation'):
            found = _profiled_backends(model, images, targets, phase, amp_dtype)
            selected[f'{phase} {precision}'] = sorted(found)
            details[f'{phase} {precision}'] = {k: sorted(set(v))[:6] for k, v in found.items()}
            model.zero_grad(set_to_none=True)
    print('\nSDPA backend selected for window attention (torch ' + torch.__version__ + ', '
          + torch.cuda.get_device_name(cuda_device) + '):')
    for key, backends in selected.items():
        print(f'  {key:20s} {backends}  {details[key]}')
    record_property('sdpa_backends', json.dumps(selected))
    record_property('sdpa_kernels', json.dumps(details))
    for key, backends in selected.items():
        assert backends, f'{key}: no SDPA kernel found in the profile'
        assert 'math' not in backends, f'{key}: SDPA fell back to the math kernel: {details[key]}'


def _logits_and_grads(model, images, targets, amp_dtype):
    """Eval-mode logits (inference_mode) and the training gradients of every parameter."""
    model.eval()
    with torch.inference_mode(), autocast_context(amp_dtype, images.device):
        logits = model(images).float()
    model.train()
    model.zero_grad(set_to_none=True)
    with autocast_context(amp_dtype, images.device):
        loss = F.cross_entropy(model(images).float(), targets)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits.clone(), grads


def _flat(grads: dict, names) -> torch.Tensor:
    return torch.cat([grads[n].flatten().double() for n in names])


def test_sdpa_backends_agree_on_window_attention(cuda_device, record_property):
    """cuDNN, memory-efficient and math SDPA, each alone (sdpa_kernel), in fp32 and bf16:
    logits, all gradients together and the relative position bias tables' gradients (which
    reach SDPA through its mask) against fp32 math: fp32 within 1e-4 / 1e-3 / 1e-3; bf16 no
    further from fp32 than bf16 math is (twice its error + 1e-2; single small gradients, such
    as the norms' biases, are printed only: bf16 rounding dominates them). A backend that
    refuses the inputs is recorded; the memory-efficient one must accept them (without
    cuDNN, training has no other fused kernel for a mask that needs a gradient)."""
    model = _swin_t_like(cuda_device)
    images = torch.randn(BATCH, 3, 112, 112, device=cuda_device)
    targets = torch.randint(0, 10, (BATCH,), device=cuda_device)
    with sdpa_kernel([SDPBackend.MATH]):
        ref_logits, ref_grads = _logits_and_grads(model, images, targets, None)
    tables = [n for n in ref_grads if n.endswith('relative_position_bias_table')]
    assert len(tables) == 4 and all(ref_grads[n].norm() > 0 for n in tables)
    errors, outcome = {}, {}  # errors: key -> (logits, worst gradient, worst bias table)
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        for precision, amp_dtype in PRECISIONS.items():
            key = f'{backend.name} {precision}'
            try:
                with sdpa_kernel([backend]):
                    logits, grads = _logits_and_grads(model, images, targets, amp_dtype)
            except RuntimeError as e:  # 'No available kernel': this backend refuses these inputs
                outcome[key] = 'refused: ' + str(e).strip().splitlines()[0][:200]
                continue
            errors[key] = (rel_err(logits, ref_logits), rel_err(_flat(grads, ref_grads), _flat(ref_grads, ref_grads)),
                           rel_err(_flat(grads, tables), _flat(ref_grads, tables)))
            worst = max(rel_err(grads[n], ref_grads[n]) for n in ref_grads)
            outcome[key] = ('logits {:.2e}, gradients {:.2e}, bias tables {:.2e}'.format(*errors[key])
                            + f' (worst single tensor {worst:.2e})')
    print('\nSDPA backends on window attention, relative errors against fp32 math:')
    for key, text in outcome.items():
        print(f'  {key:28s} {text}')
    record_property('sdpa_backend_parity', json.dumps(outcome))
    assert 'EFFICIENT_ATTENTION fp32' in errors and 'EFFICIENT_ATTENTION bf16' in errors, outcome
    baseline = errors['MATH bf16']
    assert baseline[0] < 0.1, f'bf16 autocast is far from fp32 even with math SDPA: {outcome["MATH bf16"]}'
    failed = []
    for key, errs in errors.items():
        limits = (1e-4, 1e-3, 1e-3) if key.endswith('fp32') else tuple(2 * b + 1e-2 for b in baseline)
        if any(e > limit for e, limit in zip(errs, limits)):
            failed.append(f'{key}: {outcome[key]} (limits {", ".join(f"{x:.2e}" for x in limits)})')
    assert not failed, failed


def _backward_peak_bytes(loss, device) -> int:
    """The allocator's peak during backward above what was allocated before it (0 on the CPU)."""
    if device.type != 'cuda':
        loss.backward()
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    loss.backward()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@pytest.mark.parametrize('precision', list(PRECISIONS))
def test_window_attention_saves_no_batch_sized_copy_of_the_mask(device, precision, record_property):
    """One shifted block's forward in training under saved_tensors_hooks: the bytes saved for
    backward (in window attention and in the whole block) are measured and the shapes
    printed; no saved tensor is a materialized (B, nW*heads, N, >=N) tensor (a per-image copy
    of the mask, or the attention matrix), and the backward gives the bias table a gradient."""
    model = _swin_t_like(device).train()
    blk = model.layers[0].blocks[1]
    assert blk.shift_size > 0 and blk.attn_mask is not None
    H, W = blk.input_resolution
    N, n_windows = blk.window_size ** 2, (H // blk.window_size) * (W // blk.window_size)
    G = n_windows * blk.num_heads
    joined = blk.attn.joined_mask(blk.attn_mask)
    assert joined.shape == (1, G, N, N) and joined.requires_grad

    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    inside = [False]
    saved = []  # (in attention, shape, stride, dtype, storage pointer, storage bytes, element size)
    keep = []  # keeps saved tensors alive so storage pointers stay unique

    def pack(t):
        s = t.untyped_storage()
        saved.append((inside[0], tuple(t.shape), t.stride(), t.dtype, s.data_ptr(), s.nbytes(), t.element_size()))
        keep.append(t)
        return t

    handles = [blk.attn.register_forward_pre_hook(lambda m, a: inside.__setitem__(0, True)),
               blk.attn.register_forward_hook(lambda m, a, o: inside.__setitem__(0, False))]
    x = torch.randn(BATCH, H * W, blk.dim, device=device, requires_grad=True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                autocast_context(PRECISIONS[precision], device):
            out = blk(x)
    finally:
        for h in handles:
            h.remove()
    loss = out.float().square().mean()
    backward_peak = _backward_peak_bytes(loss, device)
    grad = blk.attn.relative_position_bias_table.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and grad.norm() > 0

    def total(where) -> int:
        storages = {ptr: nbytes for ins, _, _, _, ptr, nbytes, _ in saved if where(ins) and ptr not in own}
        return sum(storages.values())
    attention_bytes, block_bytes = total(lambda ins: ins), total(lambda ins: True)
    mask_bytes = G * N * N * 4
    print(f'\n{precision} on {device}: saved for backward in window attention {attention_bytes / 2**20:.2f} MiB, '
          f'in the whole block {block_bytes / 2**20:.2f} MiB (batch {BATCH}; one fp32 batch-sized mask copy '
          f'would be {BATCH * mask_bytes / 2**20:.2f} MiB)')
    for ins, shape, stride, dtype, ptr, nbytes, _ in saved:
        if ins:
            print(f'  attention saves {str(shape):24s} stride {str(stride):28s} {str(dtype):15s} '
                  f'storage {nbytes:>10d} B' + (' (a parameter or buffer)' if ptr in own else ''))
    # the efficient kernel's backward writes the mask's gradient per image (last dim padded to 16)
    # before autograd sums it over the batch: transient, not saved; recorded to size it
    grad_mask_bytes = BATCH * G * N * (-(-N // 16) * 16) * (2 if PRECISIONS[precision] else 4)
    print(f'  backward peak above the saved tensors: {backward_peak / 2**20:.2f} MiB (a per-image mask gradient '
          f'would be {grad_mask_bytes / 2**20:.2f} MiB)')
    record_property(f'saved_bytes_{precision}', json.dumps({'attention': attention_bytes, 'block': block_bytes,
                                                            'backward_peak': backward_peak,
                                                            'per_image_mask_gradient': grad_mask_bytes}))

    batch_copies = [(shape, stride) for _, shape, stride, _, _, nbytes, size in saved
                    if len(shape) == 4 and shape[0] == BATCH and shape[1] == G and shape[2] == N and shape[3] >= N
                    and stride[0] != 0 and nbytes >= BATCH * G * N * N * size]
    assert not batch_copies, f'batch-sized (B, nW*heads, N, N) tensors saved for backward: {batch_copies}'

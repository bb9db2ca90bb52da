"""CPU kernels for the MLP and window attention, and the buffers they reuse between steps.

Two things make the plain ops slow on the CPU. Every fresh large tensor is often new memory
from the OS whose every page faults on first touch, which at ImageNet shapes costs as much as
the arithmetic done in it (the CUDA allocator caches; the CPU one does not). And SDPA's CPU
flash kernel cannot differentiate a learnable mask (the relative position bias), so SDPA falls
back to its math path and keeps every attention matrix alive until backward.

The kernels here return exactly what the plain ops return; only where intermediate results
live changes. One entry point per op, `gelu_mlp` and `window_attention`, which `models.layers`
calls where `applies_to(x)` holds: CPU tensors in eager mode (under torch.compile the compiler
fuses the plain ops). A layer's reused buffers live in its `SpareBuffers` child module.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .attention_layout import merge_heads, split_heads


def applies_to(x: torch.Tensor) -> bool:
    """Whether the kernels of this module run for the input `x`: on the CPU, in eager mode."""
    return x.device.type == 'cpu' and not torch.compiler.is_compiling()


class SpareBuffers(nn.Module):
    """Scratch and activation buffers kept from one training step to the next.

    A layer's saved activations and scratch are dead once its backward has run, so they wait
    here for the layer's next forward. A child module, so that `eval()` reaches it and gives
    the memory back (evaluation uses none); it has no parameters or state_dict entries, and a
    deep copy (EMA, say) or a pickle starts empty.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self._free: list[torch.Tensor] = []

    def extra_repr(self) -> str:
        return f'capacity={self.capacity}'

    def train(self, mode: bool = True) -> SpareBuffers:
        if not mode:
            self.clear()
        return super().train(mode)

    def take(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        for i, buf in enumerate(self._free):
            if buf.numel() == numel and buf.dtype == dtype and buf.device == device:
                return self._free.pop(i).view(shape)
        return torch.empty(shape, dtype=dtype, device=device)

    def cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`x` in `dtype`: itself when it already is, else a copy in a spare buffer."""
        return x if x.dtype == dtype else self.take(x.shape, dtype, x.device).copy_(x)

    def give(self, *buffers: torch.Tensor) -> None:
        self._free.extend(b for b in buffers if b.is_contiguous())
        del self._free[:max(len(self._free) - self.capacity, 0)]  # keep the newest

    def clear(self) -> None:
        self._free.clear()

    def __deepcopy__(self, memo):
        copy = SpareBuffers(self.capacity)
        copy.training = self.training
        return copy

    def __getstate__(self):
        return {**self.__dict__, '_free': []}


# --------------------------------------------------------------------------------------- MLP

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _GeluMlpFunction(torch.autograd.Function):
    """fc2(gelu(fc1(x))) whose backward writes gradients into the activations it saved.

    Autograd's version allocates two fresh hidden-size tensors in backward (the gradient of
    the GELU output and of its input). Here the GELU output buffer receives the first and the
    GELU input buffer the second, since neither is needed once it is consumed; afterwards both
    go to `spares` for the next forward. Autocast is honoured by casting once in forward, as
    autocast itself would.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, spares):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = spares.cast(x.reshape(-1, x.shape[-1]), dtype)
            w1c, w2c = spares.cast(w1, dtype), spares.cast(w2, dtype)
            hidden = (x2.shape[0], w1.shape[0])
            h = torch.addmm(b1.to(dtype), x2, w1c.t(), out=spares.take(hidden, dtype, x.device))
            a = torch.ops.aten.gelu.out(h, out=spares.take(hidden, dtype, x.device))
            out = torch.addmm(b2.to(dtype), a, w2c.t())
        ctx.save_for_backward(x2, w1c, w2c, h, a)
        ctx.in_shape, ctx.spares = x.shape, spares
        ctx.cast_copies = (x.dtype != dtype, w1.dtype != dtype, w2.dtype != dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x2, w1c, w2c, h, a = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(a.dtype)
        gw2 = g.t().mm(a) if need_w2 else None
        gb2 = g.sum(0) if need_b2 else None
        ga = torch.mm(g, w2c, out=a)  # GELU output is no longer needed: reuse its memory
        gh = torch.ops.aten.gelu_backward.grad_input(ga, h, grad_input=h)  # likewise its input
        gw1 = gh.t().mm(x2) if need_w1 else None
        gb1 = gh.sum(0) if need_b1 else None
        gx = gh.mm(w1c).view(ctx.in_shape) if need_x else None
        # all dead now: the next forward of this layer reuses them (not the caller's tensors)
        copies = [t for t, copied in zip((x2, w1c, w2c), ctx.cast_copies) if copied]
        ctx.spares.give(h, a, *copies)
        return gx, gw1, gb1, gw2, gb2, None


def gelu_mlp(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, spares: SpareBuffers) -> torch.Tensor:
    """fc2(gelu(fc1(x))), exact GELU, no dropout: `_GeluMlpFunction` when gradients are
    recorded, else GELU in place (nothing keeps its input)."""
    if torch.is_grad_enabled():
        return _GeluMlpFunction.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, spares)
    h = fc1(x)
    return fc2(torch.ops.aten.gelu.out(h, out=h))


# ---------------------------------------------------------------------------- window attention

def _attention_probabilities(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor, scale: float = 1.0,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) for (B, G, N, d) inputs, as (B*G, N, N) in their dtype
    (for bf16/fp16 the softmax kernel accumulates in fp32)."""
    B, G, N, d = q.shape
    logits = torch.bmm(q.reshape(B * G, N, d), k.reshape(B * G, N, d).transpose(1, 2), out=out)
    if scale != 1.0:
        logits.mul_(scale)
    logits.view(B, G, N, N).add_(attn_mask.to(logits.dtype))
    return torch.ops.aten._softmax.out(logits, -1, False, out=logits)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor, scale: float,
               spares: SpareBuffers | None = None) -> torch.Tensor:
    """Forward attention with the faster CPU kernel for the dtype (measured on windows of
    49-144 tokens): SDPA's flash kernel in fp32; matmul + softmax in bf16/fp16, where the
    flash kernel is about 1.5x slower."""
    if q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype), scale=scale)
    B, G, N, d = q.shape
    take = (lambda *shape: spares.take(shape, q.dtype, q.device)) if spares is not None else (lambda *shape: None)
    probs = _attention_probabilities(q, k, attn_mask, scale, out=take(B * G, N, N))
    out = torch.bmm(probs, v.reshape(B * G, N, d), out=take(B * G, N, d)).view(B, G, N, d)
    if spares is not None:
        spares.give(probs)
    return out


def _sum_over_batch(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.sum(0, keepdim=True) accumulated in `dtype`, converting about a million elements at a
    time rather than copying all of x to `dtype` first."""
    if x.dtype == dtype:
        return x.sum(0, keepdim=True)
    rows = max(1, (1 << 20) // x[0].numel())
    total = torch.zeros((1,) + x.shape[1:], dtype=dtype, device=x.device)
    for chunk in x.split(rows):
        total.add_(chunk.sum(0, keepdim=True, dtype=dtype))
    return total


class _WindowAttentionFunction(torch.autograd.Function):
    """Attention with a learnable additive mask, and a backward that yields its gradient.

    The forward keeps nothing but q/k/v (q pre-scaled, in a copy laid out for batched
    products); backward recomputes the probabilities (as flash attention does) and writes the
    q/k/v gradients into that same buffer. Scratch and the q/k/v buffer come from, and go back
    to, the layer's `spares`.
    """

    @staticmethod
    def forward(ctx, qkv, attn_mask, scale, num_heads, num_windows, spares):
        BW, N, C3 = qkv.shape
        nh, nw = num_heads, num_windows
        B, d = BW // nw, C3 // (3 * nh)
        t = spares.take((3, B, nw * nh, N, d), qkv.dtype, qkv.device)
        t.view(3, B, nw, nh, N, d).copy_(qkv.view(B, nw, N, 3, nh, d).permute(3, 0, 1, 4, 2, 5))
        if scale != 1.0:  # Swin V2 passes q already scaled
            t[0].mul_(scale)
        with torch.autocast('cpu', enabled=False):
            out = _attention(t[0], t[1], t[2], attn_mask.detach(), 1.0, spares)
        ctx.save_for_backward(t, attn_mask)
        ctx.scale, ctx.num_windows, ctx.spares = scale, nw, spares
        merged = merge_heads(out, nw)
        spares.give(out)
        return merged

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        t, attn_mask = ctx.saved_tensors
        nw, spares = ctx.num_windows, ctx.spares
        _, B, G, N, d = t.shape
        nh = G // nw

        def take(*shape):
            return spares.take(shape, t.dtype, t.device)

        probs = _attention_probabilities(t[0], t[1], attn_mask, out=take(B * G, N, N))
        q, k, v = (t[i].view(B * G, N, d) for i in range(3))  # q is scaled
        g = take(B * G, N, d)
        g.view(B, nw, nh, N, d).copy_(grad_out.reshape(B, nw, N, nh, d).transpose(2, 3))
        dp = torch.bmm(g, v.transpose(1, 2), out=take(B * G, N, N))
        torch.bmm(probs.transpose(1, 2), g, out=v)  # dV into v's slot, v is no longer needed
        ds = torch.ops.aten._softmax_backward_data.out(dp, probs, -1, probs.dtype, grad_input=dp)
        grad_mask = _sum_over_batch(ds.view(B, G, N, N), attn_mask.dtype) if ctx.needs_input_grad[1] else None
        dq = torch.bmm(ds, k, out=take(B * G, N, d))
        torch.bmm(ds.transpose(1, 2), q, out=k)  # dK into k's slot once dQ has used k
        torch.mul(dq, ctx.scale, out=q)
        grad_qkv = torch.empty(B * nw, N, 3 * nh * d, dtype=t.dtype, device=t.device)
        grad_qkv.view(B, nw, N, 3, nh, d).copy_(t.view(3, B, nw, nh, N, d).permute(1, 2, 4, 0, 3, 5))
        spares.give(t, probs, ds, g, dq)
        return grad_qkv, grad_mask, None, None, None, None


def window_attention(qkv: torch.Tensor, attn_mask: torch.Tensor, num_heads: int, num_windows: int, scale: float,
                     spares: SpareBuffers | None = None) -> torch.Tensor:
    """`layers.window_attention` without dropout: `_WindowAttentionFunction` when the mask
    is learned in this step, else the faster forward kernel for the dtype."""
    if attn_mask.requires_grad and torch.is_grad_enabled():
        return _WindowAttentionFunction.apply(qkv, attn_mask, scale, num_heads, num_windows,
                                              spares if spares is not None else SpareBuffers(0))
    q, k, v = split_heads(qkv, num_heads, num_windows).unbind(0)
    return merge_heads(_attention(q, k, v, attn_mask, scale), num_windows)

"""Building blocks that compute the textbook function with less memory traffic in eager mode.

Each one returns exactly what its plain form returns; only where intermediate results
live changes. On the CPU, where every fresh large tensor costs page faults, and on the
GPU, where bandwidth is the limit outside the matrix multiplies, fewer passes and fewer
allocations are measurable speed.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class SpareBuffers:
    """Scratch and activation buffers kept from one training step to the next (CPU only).

    A new CPU tensor of a few MB or more is often fresh memory from the OS whose every
    page faults on first touch; at ImageNet shapes that costs as much as the arithmetic
    done in it. A layer's saved activations and scratch are dead once its backward has
    run, so they wait here for the layer's next forward. (The CUDA allocator caches.)
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free: list[torch.Tensor] = []

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
        self._free.extend(b for b in buffers if b.device.type == 'cpu' and b.is_contiguous())
        del self._free[:max(len(self._free) - self.capacity, 0)]  # keep the newest

    def clear(self) -> None:
        self._free.clear()

    def __deepcopy__(self, memo):  # a copied model (EMA, say) starts with no spares
        return SpareBuffers(self.capacity)

    def __getstate__(self):
        return {'capacity': self.capacity, '_free': []}


def release_spares_in_eval(module: nn.Module, mode: bool) -> None:
    """Called from `train()`: evaluation uses no spares, so give their memory back."""
    if not mode:
        module.spares.clear()


class _GeluMlpFunction(torch.autograd.Function):
    """fc2(gelu(fc1(x))) whose backward writes gradients into the activations it saved.

    Autograd's version allocates two fresh hidden-size tensors in backward (the gradient
    of the GELU output and of its input). Here the GELU output buffer receives the first
    and the GELU input buffer the second, since neither is needed once it is consumed;
    afterwards both go to `spares` for the next forward. Autocast is honoured by casting
    once in forward, as autocast itself would.
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


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout, with the official parameter names.

    Training without dropout uses `_GeluMlpFunction`; inference applies GELU in place.
    Under torch.compile the plain ops are used and the compiler fuses them.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None,
                 out_features: int | None = None, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)
        self._exact_gelu = isinstance(self.act, nn.GELU) and self.act.approximate == 'none'
        self.spares = SpareBuffers(capacity=5)

    def train(self, mode: bool = True) -> Mlp:
        release_spares_in_eval(self, mode)
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._exact_gelu and not torch.compiler.is_compiling():
            if torch.is_grad_enabled() and (self.drop.p == 0 or not self.training):
                return _GeluMlpFunction.apply(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                              self.spares)
            if not torch.is_grad_enabled():
                h = self.fc1(x)
                return self.fc2(torch.ops.aten.gelu.out(h, out=h))  # nothing keeps h: overwrite it
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class _TokenPermutation(torch.autograd.Function):
    """Reorder the tokens of every sample by a permutation; the gradient is reordered by
    its inverse. `index_select`'s own backward scatters into a zero-filled tensor; for a
    permutation a second gather is exact and does one pass instead of two."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse, index)
        return _gather_tokens(x, index)

    @staticmethod
    def backward(ctx, grad):
        inverse, index = ctx.saved_tensors
        return _TokenPermutation.apply(grad, inverse, index), None, None


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # A gather along dim 0 of (B*T, C) rows runs about 4x faster on the CPU than
    # index_select along dim 1 of (B, T, C), so the batch offset goes into the index.
    B, T, C = x.shape
    rows = (torch.arange(B, device=x.device) * T).unsqueeze(1) + index
    return x.reshape(B * T, C).index_select(0, rows.view(-1)).view(B, T, C)


def permute_tokens(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[:, index] for x of shape (B, T, C) and a permutation `index` whose inverse is `inverse`."""
    return _TokenPermutation.apply(x, index, inverse)


def add_drop_path(x: torch.Tensor, branch: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """x + DropPath(branch) (stochastic depth, kept samples scaled by 1/keep) in one op."""
    if drop_prob == 0. or not training:
        return x + branch
    keep = 1. - drop_prob
    scale = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep).div_(keep)
    return torch.addcmul(x, branch, scale)


def _split_heads(qkv: torch.Tensor, num_heads: int, num_windows: int) -> torch.Tensor:
    """(B*nW, N, 3C) -> (3, B, nW*heads, N, d): windows folded into the head dimension, so a
    (1, nW*heads, N, N) mask broadcasts over the batch instead of being copied per image."""
    BW, N, C3 = qkv.shape
    d = C3 // (3 * num_heads)
    t = qkv.view(BW // num_windows, num_windows, N, 3, num_heads, d).permute(3, 0, 1, 4, 2, 5)
    return t.reshape(3, BW // num_windows, num_windows * num_heads, N, d)


def _merge_heads(out: torch.Tensor, num_windows: int) -> torch.Tensor:
    """(B, nW*heads, N, d) -> (B*nW, N, heads*d)."""
    B, G, N, d = out.shape
    nh = G // num_windows
    return out.view(B, num_windows, nh, N, d).transpose(2, 3).reshape(B * num_windows, N, nh * d)


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


def _cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor, scale: float,
                   spares: SpareBuffers | None = None) -> torch.Tensor:
    """Forward attention on the CPU with the faster kernel for the dtype (measured on windows
    of 49-144 tokens): SDPA's flash kernel in fp32; matmul + softmax in bf16/fp16, where
    the flash kernel is about 1.5x slower."""
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


class _CpuWindowAttentionFunction(torch.autograd.Function):
    """CPU attention with a learnable additive mask, and a backward that yields its gradient.

    On the CPU, SDPA's flash kernel cannot differentiate the mask (the relative position
    bias), so SDPA falls back to its math path and keeps every attention matrix alive
    until backward. Here the forward keeps nothing but q/k/v (q pre-scaled, in a copy
    laid out for batched products); backward recomputes the probabilities (as flash
    attention does) and writes the q/k/v gradients into that same buffer. Scratch and
    the q/k/v buffer come from, and go back to, the layer's `spares`.
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
            out = _cpu_attention(t[0], t[1], t[2], attn_mask.detach(), 1.0, spares)
        ctx.save_for_backward(t, attn_mask)
        ctx.scale, ctx.num_windows, ctx.spares = scale, nw, spares
        merged = _merge_heads(out, nw)
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


def window_attention(qkv: torch.Tensor, attn_mask: torch.Tensor, num_heads: int, num_windows: int,
                     scale: float, dropout_p: float = 0., spares: SpareBuffers | None = None) -> torch.Tensor:
    """softmax(QK^T * scale + attn_mask) V for every window.

    qkv: (B*nW, N, 3C) from the qkv projection; attn_mask: (1, nW*heads, N, N), the bias
    and shift mask joined. Returns (B*nW, N, C) with the heads merged. SDPA everywhere
    (its memory-efficient kernel on CUDA differentiates the mask itself), except on the
    CPU, where `_CpuWindowAttentionFunction` and `_cpu_attention` pick the faster kernels.
    """
    on_cpu = qkv.device.type == 'cpu' and dropout_p == 0. and not torch.compiler.is_compiling()
    if on_cpu and attn_mask.requires_grad and torch.is_grad_enabled():
        return _CpuWindowAttentionFunction.apply(qkv, attn_mask, scale, num_heads, num_windows,
                                                 spares if spares is not None else SpareBuffers(0))
    q, k, v = _split_heads(qkv, num_heads, num_windows).unbind(0)
    if on_cpu:
        out = _cpu_attention(q, k, v, attn_mask, scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype), dropout_p=dropout_p,
                                             scale=scale)
    return _merge_heads(out, num_windows)

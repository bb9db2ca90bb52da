"""A mixture-of-experts MLP with the semantics and parameter names of Tutel's `moe_layer`, the
layer the official Swin-MoE builds, written with plain torch ops and torch.distributed.

Tutel is not on the package registry. Its routing is reproduced here (facts read from Tutel's
`impls/moe_layer.py`, `impls/fast_dispatch.py`, `impls/losses.py`, `gates/top.py`,
`gates/cosine_top.py`, `experts/ffn.py`):
- the gate (linear `wg`, or cosine: `cosine_projector`, `sim_matrix`, `temperature`) runs in
  fp32 outside autocast; in training, noise `gate_noise * N(0, 1) / num_global_experts` is added
  to its logits; scores = softmax(noisy logits); each token takes its top-k experts;
- a token's combine weight is its score for that expert; with k > 1 and `normalize_gate` the k
  weights are divided by their sum (Tutel normalizes only when k > 1);
- slots: the first choices fill each expert in token order (with batch-prioritized routing, in
  order of the token's highest score), then the second choices after all first choices;
  a choice whose slot is >= capacity is dropped (its output is 0: the block's residual carries
  the token);
- capacity = k * int(capacity_factor * ceil(tokens / experts)) for a positive factor; for 0, the
  slots needed (max over the ranks: no drops); for a negative factor, the smaller of those two
  with -capacity_factor. Tokens are counted on the local rank;
- auxiliary loss: GShard's E * sum_e(mean score_e * fraction of first choices to e) on the noisy
  scores, or (is_gshard_loss False) the importance + load loss of arXiv:1701.06538 as Tutel
  writes it.

Seam for Tutel: `MoELayer` is the one class that Tutel's `tutel.moe.moe_layer` replaces (same
submodule and parameter names: `gates.0.*`, `experts.batched_*`, `_num_global_experts`); the
exchange of tokens between ranks is behind `LocalDispatch` / `AllToAllDispatch`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

# Attribute set on expert parameters (as the official model's `scan_expert_func` does): data
# parallelism must not average them across ranks, each rank holds different experts.
SKIP_ALLREDUCE = 'skip_allreduce'


# --- routing -----------------------------------------------------------------------------

@dataclass
class Routing:
    """Where each of a token's k choices goes. All (tokens, k): `experts` the global expert
    index, `slots` the position in that expert's buffer, `gates` the combine weight."""
    experts: torch.Tensor
    slots: torch.Tensor
    gates: torch.Tensor
    capacity: int

    @property
    def kept(self) -> torch.Tensor:
        """(tokens, k) bool: the choices that found room (slot < capacity)."""
        return self.slots < self.capacity


def _slots_in_order(onehot: torch.Tensor, priority: torch.Tensor | None) -> torch.Tensor:
    """(S, E) running count - 1 of each expert's tokens, counted in token order, or in the order
    of `priority` (highest first) for batch-prioritized routing."""
    if priority is None:
        return onehot.cumsum(0) - 1
    order = torch.argsort(priority, descending=True, stable=True)
    counted = onehot[order].cumsum(0) - 1
    return torch.empty_like(counted).index_copy_(0, order, counted)


def capacity_of(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                slots_needed: int) -> int:
    """Tutel's capacity rule; `slots_needed` (already the max over the ranks) serves factor <= 0."""
    fair = top_k * int(abs(capacity_factor) * ((num_tokens + num_experts - 1) // num_experts))
    if capacity_factor > 0:
        return fair
    return slots_needed if capacity_factor == 0 else min(slots_needed, fair)


def route(scores: torch.Tensor, top_k: int, capacity_factor: float, batch_prioritized: bool = False,
          normalize_gate: bool = False, max_over_ranks=None, num_tokens: int | None = None) -> Routing:
    """Top-k routing of (S, E) scores with capacity (see the module docstring).
    `max_over_ranks(int, device) -> int` agrees on the needed slots when the factor is <= 0;
    `num_tokens` (default S) is the token count the capacity is a share of."""
    S, E = scores.shape
    top_k = min(top_k, E)
    experts = torch.topk(scores, top_k, dim=1).indices
    gates = scores.gather(1, experts)
    priority = scores.max(dim=1).values if batch_prioritized else None
    slots, filled = [], torch.zeros(1, E, dtype=torch.long, device=scores.device)
    for k in range(top_k):
        onehot = F.one_hot(experts[:, k], E)
        slots.append(((_slots_in_order(onehot, priority) + filled) * onehot).sum(1))
        filled = filled + onehot.sum(0, keepdim=True)
    slots = torch.stack(slots, dim=1)
    if top_k > 1 and normalize_gate:
        gates = gates / gates.sum(1, keepdim=True).clamp_min(torch.finfo(gates.dtype).eps)
    needed = 0
    if capacity_factor <= 0:
        needed = int(slots.max()) + 1 if S else 0
        needed = max_over_ranks(needed, scores.device) if max_over_ranks is not None else needed
    tokens = S if num_tokens is None else num_tokens
    return Routing(experts, slots, gates, capacity_of(tokens, E, top_k, capacity_factor, needed))


def gshard_loss(scores: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """E * sum_e(mean score of e * fraction of tokens whose first choice is e); 1 when balanced."""
    S, E = scores.shape
    fraction = F.one_hot(top1, E).to(scores.dtype).mean(0)
    return E * (scores.mean(0) * fraction).sum()


def load_importance_loss(clean_scores: torch.Tensor, noisy_topk_logits: torch.Tensor, gate_noise: float
                         ) -> torch.Tensor:
    """(importance + load) / 2 of arXiv:1701.06538 as Tutel computes it: squared coefficients of
    variation of the summed clean scores, and of each expert's probability of being chosen,
    P(clean score - k-th noisy logit > noise) under N(0, gate_noise / E). Tutel compares scores
    (probabilities) with logits here; kept as written, since the official runs trained with it."""
    E = clean_scores.shape[1]
    importance = clean_scores.float().sum(0)
    threshold = noisy_topk_logits[:, -1:].float()
    # Tutel builds Normal(0, gate_noise / E), which needs gate_noise > 0; eps keeps 0 finite (a step).
    std = max(gate_noise / E, 1e-9)
    load = 0.5 * (1 + torch.erf((clean_scores.float() - threshold) / (std * math.sqrt(2)))).sum(0)

    def cv2(v: torch.Tensor) -> torch.Tensor:
        if v.numel() < 2:  # one expert: nothing to balance (the unbiased variance would be NaN)
            return v.new_zeros(())
        return v.var() / (v.mean() ** 2 + 1e-10)

    return (cv2(importance) + cv2(load)) / 2


# --- gates -------------------------------------------------------------------------------

class LinearGate(nn.Module):
    """Logits = x W^T, no bias (Tutel's `top` gate, parameter `wg`)."""

    def __init__(self, model_dim: int, num_experts: int):
        super().__init__()
        self.wg = nn.Linear(model_dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.wg.weight.float())


class CosineGate(nn.Module):
    """Logits = cos(projected x, expert embedding) * exp(min(temperature, log 100))
    (Tutel's `cosine_top` gate and parameter names)."""

    def __init__(self, model_dim: int, num_experts: int, proj_dim: int = 256, init_t: float = 0.5):
        super().__init__()
        self.temperature = nn.Parameter(torch.log(torch.full([1], 1.0 / init_t)))
        self.cosine_projector = nn.Linear(model_dim, proj_dim)
        self.sim_matrix = nn.Parameter(torch.empty(proj_dim, num_experts).normal_(0, 0.01))
        self.clamp_max = math.log(1. / 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = F.linear(x.float(), self.cosine_projector.weight.float(), self.cosine_projector.bias.float())
        logits = F.normalize(proj, dim=1) @ F.normalize(self.sim_matrix.float(), dim=0)
        return logits * self.temperature.float().clamp(max=self.clamp_max).exp()


# --- experts -----------------------------------------------------------------------------

class FusedExperts(nn.Module):
    """This rank's experts as batched weights, one bmm per layer for all of them (Tutel's
    `ffn` experts: `batched_fc1_w` (E, hidden, dim), `batched_fc2_w` (E, hidden, dim),
    `batched_fc1_bias` (E, hidden), `batched_fc2_bias` (E, dim)).

    Sharded (`shards` n > 1, one expert shared by n ranks): this rank holds slice `shard_index`
    of the hidden dimension, with Tutel's per-rank shapes (1, hidden / n, dim) and (1, hidden / n),
    and slice `shard_index` of fc2's bias, (1, ceil(dim / n)). Its output is a partial sum over
    its hidden slice; the n partial outputs are summed by the dispatch. Tutel gathers the bias
    slices and adds bias / n on each shard; adding each shard's own slice in its columns gives
    the same sum and the same gradients without a collective."""

    def __init__(self, num_experts: int, model_dim: int, hidden_dim: int, drop: float = 0.,
                 fc2_bias: bool = True, init_std: float = 0.02, shards: int = 1, shard_index: int = 0):
        super().__init__()
        if hidden_dim % shards:
            raise ValueError(f'the experts\' hidden size {hidden_dim} cannot be split into {shards} equal shards')
        hidden, self.shards, self.shard_index = hidden_dim // shards, shards, shard_index
        self.model_dim = model_dim
        self.batched_fc1_w = nn.Parameter(torch.empty(num_experts, hidden, model_dim))
        self.batched_fc2_w = nn.Parameter(torch.empty(num_experts, hidden, model_dim))
        self.batched_fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden))
        # Without an fc2 bias the official keeps the (zero) parameter and freezes it: same keys.
        bias_width = -(-model_dim // shards)
        self.batched_fc2_bias = nn.Parameter(torch.zeros(num_experts, bias_width), requires_grad=fc2_bias)
        self.drop = nn.Dropout(drop)
        self.init_std = init_std
        self.reset_parameters()
        for p in self.parameters():
            setattr(p, SKIP_ALLREDUCE, True)

    def reset_parameters(self) -> None:
        """The official Swin-MoE init: truncated normal weights, zero biases."""
        trunc_normal_(self.batched_fc1_w, std=self.init_std)
        trunc_normal_(self.batched_fc2_w, std=self.init_std)
        nn.init.zeros_(self.batched_fc1_bias)
        nn.init.zeros_(self.batched_fc2_bias)

    def fc2_bias(self) -> torch.Tensor:
        """(E, dim): the bias this rank adds, its own slice in its columns when sharded (zeros
        elsewhere), so that the sum over the shards adds the whole bias once."""
        bias = self.batched_fc2_bias
        if self.shards == 1:
            return bias
        width = bias.shape[1]
        start = self.shard_index * width
        return F.pad(bias, (start, (self.shards - 1 - self.shard_index) * width))[:, :self.model_dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(E, tokens, dim) -> (E, tokens, dim): fc1, GELU, dropout, fc2 for each expert (its
        hidden slice's share of the output when sharded)."""
        h = torch.baddbmm(self.batched_fc1_bias.unsqueeze(1).to(x.dtype), x, self.batched_fc1_w.to(x.dtype).mT)
        h = self.drop(F.gelu(h))
        return torch.baddbmm(self.fc2_bias().unsqueeze(1).to(x.dtype), h, self.batched_fc2_w.to(x.dtype))

    def extra_repr(self) -> str:
        E, hidden, dim = self.batched_fc1_w.shape
        shard = f', hidden shard {self.shard_index + 1} of {self.shards}' if self.shards > 1 else ''
        return f'local_experts={E}, model_dim={dim}, hidden={hidden}{shard}'


# --- dispatch between ranks ----------------------------------------------------------------

class LocalDispatch:
    """Every expert lives in this process: nothing is exchanged."""

    world_size = 1
    rank = 0

    def exchange(self, x: torch.Tensor, shards: int = 1) -> torch.Tensor:
        """(E, C, dim) slots of this rank's tokens -> (local E, ranks * C, dim) slots for local
        experts. `shards` n > 1: each expert is split over n ranks, all of which get its slots.
        (In one process every expert is whole: n is 1.)"""
        return x

    def combine(self, y: torch.Tensor, shards: int = 1) -> torch.Tensor:
        """The inverse of `exchange`: local experts' outputs back to the ranks that sent the
        tokens (summed over an expert's n shards)."""
        return y

    def max_over_ranks(self, n: int, device: torch.device | None = None) -> int:
        return n

    def __deepcopy__(self, memo) -> LocalDispatch:
        # a copy of the model (the EMA's) exchanges tokens over the same ranks and group,
        # which cannot be copied anyway
        return self


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 in equal splits; its gradient is the same exchange back.
    (torch.distributed.nn.functional.all_to_all_single does this but is deprecated.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.group), None


class AllToAllDispatch(LocalDispatch):
    """Expert parallelism: rank r holds global experts [r * local E, (r + 1) * local E); every
    rank sends each expert's slots to the rank that holds it (gloo on CPU, nccl on CUDA).
    Sharded experts (n ranks per expert): rank r holds slice r % n of expert r // n, as Tutel
    lays them out; each expert's slot block is sent to its n ranks (a copy each), and the n
    partial outputs that come back are summed (the copy's and the sum's gradients are the sum
    and the copy: autograd handles both)."""

    def __init__(self, group=None):
        # None is the default group, looked up at each call: holding the group object would keep
        # it (and its gloo threads) alive past destroy_process_group into interpreter exit, where
        # a gloo thread freeing a finished collective's tensors aborts the process
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def exchange(self, x: torch.Tensor, shards: int = 1) -> torch.Tensor:
        if shards > 1:  # one block per destination rank: expert e's copies go to ranks e*n .. e*n + n-1
            x = x.repeat_interleave(shards, dim=0)
        E, C, M = x.shape
        received = _AllToAll.apply(x, self.group)  # (ranks * local E, C, M), source rank major
        local = E // self.world_size
        return received.view(self.world_size, local, C, M).transpose(0, 1).reshape(local, -1, M)

    def combine(self, y: torch.Tensor, shards: int = 1) -> torch.Tensor:
        local, WC, M = y.shape
        C = WC // self.world_size
        y = y.view(local, self.world_size, C, M).transpose(0, 1).reshape(-1, C, M)
        y = _AllToAll.apply(y, self.group)  # (global E * shards, C, M)
        return y.view(-1, shards, C, M).sum(1) if shards > 1 else y

    def max_over_ranks(self, n: int, device: torch.device | None = None) -> int:
        t = torch.tensor([n], dtype=torch.long, device=device)  # the tokens' device: nccl needs CUDA
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())


def default_dispatch() -> LocalDispatch:
    """Expert parallelism over the world when a process group of more than one rank is up."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return AllToAllDispatch()
    return LocalDispatch()


# --- the layer -----------------------------------------------------------------------------

def encode(x: torch.Tensor, routing: Routing, num_experts: int) -> torch.Tensor:
    """(S, dim) tokens -> (E, capacity, dim) expert slots; empty slots are zeros."""
    S, k = routing.experts.shape
    C = routing.capacity
    kept = routing.kept.reshape(-1)
    flat = (routing.experts * C + routing.slots).reshape(-1)[kept]
    tokens = torch.arange(S, device=x.device).repeat_interleave(k)[kept]
    slots = x.new_zeros(num_experts * C, x.shape[1])
    return slots.index_add(0, flat, x.index_select(0, tokens)).view(num_experts, C, -1)


def decode(y: torch.Tensor, routing: Routing) -> torch.Tensor:
    """(E, capacity, dim) expert outputs -> (S, dim): the gate-weighted sum over each token's
    kept choices (0 for a token all of whose choices were dropped)."""
    E, C, M = y.shape
    flat = (routing.experts * C + routing.slots).clamp(max=max(E * C - 1, 0))
    weight = torch.where(routing.kept, routing.gates, torch.zeros_like(routing.gates)).to(y.dtype)
    if E * C == 0:
        return y.new_zeros(flat.shape[0], M)
    picked = y.reshape(E * C, M).index_select(0, flat.reshape(-1)).view(*flat.shape, M)
    return (picked * weight.unsqueeze(-1)).sum(1)


def expert_layout(num_local_experts: int, world_size: int) -> tuple[int, int]:
    """(experts each rank holds, ranks sharing each expert) for Tutel's `count_per_node`:
    n >= 1 experts per rank; -1 reads as 1; -n (n > 1): one expert sharded over n ranks, so
    world_size / n experts in all. One process (world size 1) holds one whole expert for -n
    (Tutel asserts world size >= n instead): there is nothing to shard it over, and so one
    process can build or evaluate an official sharded config."""
    if num_local_experts == 0:
        raise ValueError('MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS must not be 0')
    if num_local_experts > 0 or num_local_experts == -1:
        return abs(int(num_local_experts)), 1
    shards = -int(num_local_experts)
    if world_size == 1:
        return 1, 1
    if world_size % shards:
        raise ValueError(f'MODEL.SWIN_MOE.NUM_LOCAL_EXPERTS {num_local_experts} shares each expert over {shards} '
                         f'ranks, but the world size {world_size} is not a multiple of {shards}')
    return 1, shards


class MoELayer(nn.Module):
    """Gate, routing, dispatch, experts, combine: the part Tutel's `moe_layer` provides.

    forward(x (..., dim)) -> (y (..., dim), l_aux). Submodule and parameter names follow Tutel
    (`gates.0`, `experts.batched_*`, buffer `_num_global_experts`), so official checkpoints load.
    """

    def __init__(self, model_dim: int, hidden_dim: int, num_local_experts: int = 1, top_k: int = 1,
                 capacity_factor: float = 1.25, cosine_router: bool = False, cosine_router_dim: int = 256,
                 cosine_router_init_t: float = 0.5, gate_noise: float = 1.0, normalize_gate: bool = False,
                 batch_prioritized_routing: bool = True, is_gshard_loss: bool = True, moe_drop: float = 0.,
                 fc2_bias: bool = True, init_std: float = 0.02, dispatch: LocalDispatch | None = None):
        super().__init__()
        self.dispatch = dispatch if dispatch is not None else default_dispatch()
        self.num_local_experts, self.shards = expert_layout(num_local_experts, self.dispatch.world_size)
        num_experts = self.num_local_experts * self.dispatch.world_size // self.shards
        # the buffer is for the checkpoint (Tutel's key); forward reads the plain int, since
        # reading a CUDA buffer would wait for the device in every forward
        self.num_global_experts = num_experts
        self.register_buffer('_num_global_experts', torch.tensor(num_experts))
        self.top_k = min(top_k, num_experts)
        self.capacity_factor = capacity_factor
        self.gate_noise = gate_noise
        self.normalize_gate = normalize_gate
        self.batch_prioritized_routing = batch_prioritized_routing
        self.is_gshard_loss = is_gshard_loss
        gate = (CosineGate(model_dim, num_experts, cosine_router_dim, cosine_router_init_t) if cosine_router
                else LinearGate(model_dim, num_experts))
        self.gates = nn.ModuleList([gate])
        self.experts = FusedExperts(self.num_local_experts, model_dim, hidden_dim, moe_drop, fc2_bias, init_std,
                                    self.shards, self.dispatch.rank % self.shards)

    def scores_and_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, E) routing scores (noisy in training) and the auxiliary loss, in fp32."""
        E = self.num_global_experts
        with torch.autocast(x.device.type, enabled=False):
            logits = self.gates[0](x)
            noisy = logits
            if self.training and self.gate_noise > 0:
                noisy = logits + self.gate_noise * torch.randn_like(logits) / E
            scores = noisy.softmax(dim=1)
            top = torch.topk(scores, self.top_k, dim=1).indices
            if self.is_gshard_loss:
                l_aux = gshard_loss(scores, top[:, 0])
            else:
                l_aux = load_importance_loss(logits.softmax(dim=1), noisy.gather(1, top), self.gate_noise)
        return scores, l_aux

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        scores, l_aux = self.scores_and_loss(tokens)
        # Every rank must use the same capacity (equal all-to-all splits). Training batches are
        # equal (drop_last); an unpadded validation set's last batches are not, so in eval the
        # capacity is a share of the largest rank's tokens (Tutel's `inequivalent_tokens`).
        num_tokens = tokens.shape[0]
        if not self.training:
            num_tokens = self.dispatch.max_over_ranks(num_tokens, tokens.device)
        routing = route(scores, self.top_k, self.capacity_factor, self.batch_prioritized_routing,
                        self.normalize_gate, self.dispatch.max_over_ranks, num_tokens)
        slots = encode(tokens, routing, self.num_global_experts)
        out = self.dispatch.combine(self.experts(self.dispatch.exchange(slots, self.shards)), self.shards)
        return decode(out, routing).view(shape), l_aux

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Files from older Tutel lack the expert count (Tutel fills it in too); a different
        # count is a different model. Expert tensors of the right size load whatever their view.
        key = prefix + '_num_global_experts'
        if key not in state_dict:
            state_dict[key] = self._num_global_experts.clone()
        elif int(state_dict[key]) != self.num_global_experts:
            logging.getLogger(__name__).warning('%s: checkpoint has %d experts, the model %d',
                                                prefix, int(state_dict[key]), self.num_global_experts)
        for name, param in self.experts.named_parameters():
            t = state_dict.get(prefix + 'experts.' + name)
            if t is not None and t.shape != param.shape and t.numel() == param.numel():
                state_dict[prefix + 'experts.' + name] = t.reshape(param.shape)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        shards = f' ({self.shards} ranks per expert)' if self.shards > 1 else ''
        return (f'experts={self.num_global_experts} over {self.dispatch.world_size} rank(s){shards}, '
                f'top_k={self.top_k}, capacity_factor={self.capacity_factor}, gate_noise={self.gate_noise}')

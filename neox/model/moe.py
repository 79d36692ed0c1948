"""Mixture-of-experts feed-forward block: router -> token dispatch -> experts -> combine (+ a shared expert).

Parameter names and shapes (tensor parallelism, the Hugging Face converters and checkpoints build on them):

    blocks.N.mlp.router.weight               [E, H]     the router; whole on every tensor-parallel rank
    blocks.N.mlp.experts.linear1.weight      [E, I, H]  up (value) projection, x @ linear1[e].T
    blocks.N.mlp.experts.gate.weight         [E, I, H]  gated activations only, x @ gate[e].T
    blocks.N.mlp.experts.linear2.weight      [E, I, H]  down projection, h @ linear2[e] (stored [inner, hidden])
    blocks.N.mlp.shared_expert.{linear1,gate,linear2}.weight (+ .bias with use_bias_in_mlp): a dense MLP (mlp.py)
    blocks.N.mlp.shared_expert_gate.weight   [1, H]     Qwen2-MoE's sigmoid gate of the shared expert

E = moe_num_experts, I = the expert width (ModelConfig.expert_inner_size), H = hidden_size. Every expert tensor is
[experts, inner, hidden] (linear2 too, as megablocks and gpt-neox store their w2), so:
- expert parallelism slices dim 0: a rank's experts e0..e1 are weight[e0:e1], one block
  (neox/parallel/expert_parallel.py);
- tensor parallelism splits every expert's hidden units, dim 1 of all three (neox/parallel/sharding.py): the dense
  MLP's column split of linear1 / gate and row split of linear2. Both splits are bands of the [d0, d1 x d2] grid the
  layout-free checkpoints store (neox/checkpoint/regions.py). The router and the shared gate are replicated;
- to Hugging Face (transformers 5 holds Mixtral, Qwen2-MoE and OLMoE experts fused): experts.gate_up_proj
  [E, 2I, H] = cat([gate, linear1], dim=1), experts.down_proj [E, H, I] = linear2.transpose(1, 2); their hub files
  hold per-expert matrices: Mixtral block_sparse_moe.experts.{i}.w1 / w3 / w2 = gate[i] / linear1[i] /
  linear2[i].T, Qwen2-MoE and OLMoE mlp.experts.{i}.gate_proj / up_proj / down_proj the same; the router is
  block_sparse_moe.gate / mlp.gate, Qwen2-MoE's shared expert mlp.shared_expert.{gate,up,down}_proj and
  mlp.shared_expert_gate.
Experts have no biases (as in gpt-neox, Mixtral, Qwen2-MoE and OLMoE); the initialisation is the dense MLP's,
per expert (neox/model/init.py: each [out, in] slice is tiled like a matrix of its own).

Forward, for the N = batch x seq tokens of a micro-batch:
1. Router: logits = x W^T, probabilities softmax(logits) in fp32; each token's k experts and their weights
   (moe_router_type, moe_norm_topk_prob); in training the load-balancing and z losses.
2. Dispatch (SortedDispatch.dispatch): the N*k (token, expert) assignments, numbered choice-major (all first
   choices in token order, then all second choices, ...), stably sorted by expert; the tokens are gathered in
   that order, so each expert's tokens are one contiguous slice. moe_capacity_factor cuts every slice to the
   capacity in training (the first assignments in that order stay).
3. Experts: per projection one matmul per expert over its slice (grouped_linear), the activation between.
4. Combine (SortedDispatch.combine): each row times its routing weight, put back in assignment order and summed
   over a token's k choices in choice order (the same sums, in the same order, on every layout).
The dispatch is one object (`Experts.dispatcher`) so that expert parallelism (moe_expert_parallel_size) replaces it
with one that also sends each expert's slice to the rank holding that expert (all-to-all) and brings the results
back, leaving the rest of the block as it is (neox/parallel/expert_parallel.py).

Auxiliary losses reach the backward pass without being added to the language-model loss: the block's output
carries them (AttachAuxLoss: identity in forward; in backward it also starts the aux loss's own gradient, equal to
`aux_loss_scale`). The training engine sets that scale to what DeepSpeed multiplies the loss by before backward
(1 / gradient accumulation steps x the fp16 loss scale; neox/parallel/moe.py), so a pipeline stage needs nothing
from the last stage, and a plain loss.backward() (scale 1) trains on lm loss + aux. Each block also accumulates
its training statistics (losses, tokens per expert, dropped assignments) for the metrics (take_stats).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from neox.config.model import ModelConfig
from neox.model.mlp import ACTIVATION_FNS, MLP

# take_stats(): [forwards, load-balancing loss, z loss, dropped assignments, assignments, tokens per expert ...]
STAT_FIELDS = ("forwards", "load_balancing_loss", "z_loss", "dropped", "assignments")


# --- router ---------------------------------------------------------------------------------------------------

@dataclass
class Routing:
    weights: torch.Tensor  # [N, k] fp32: each token's weight for each chosen expert
    experts: torch.Tensor  # [N, k] int64: the chosen experts, best first
    logits: torch.Tensor  # [N, E] fp32
    probs: torch.Tensor  # [N, E] fp32, softmax(logits)


def sinkhorn(logits: torch.Tensor, max_iter: int = 3, tol: float = 1.0e-4, eps: float = 1.0e-8) -> torch.Tensor:
    """gpt-neox's Sinkhorn balancing of exp(logits) [N, E] (rows to 1/N, columns to 1/E), up to max_iter rounds.
    The logits are shifted by their maximum first: the balanced result is the same (every scale cancels), without
    exp overflowing."""
    cost = torch.exp(logits - logits.max())
    rows = torch.ones(cost.shape[0], dtype=cost.dtype, device=cost.device)
    cols = 1.0 / (cost.shape[1] * cost.sum(0))
    for _ in range(max_iter):
        rows = 1.0 / (rows.shape[0] * ((cols * cost).sum(1) + eps))
        new_cols = 1.0 / (cols.shape[0] * ((rows[:, None] * cost).sum(0) + eps))
        converged = (cols - new_cols).abs().mean() < tol
        cols = new_cols
        if converged:
            break
    return cols * cost * rows[:, None]


class Router(nn.Module):
    """Picks each token's experts and weights (see ModelConfig's moe_router_type, moe_norm_topk_prob)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.moe_num_experts, cfg.hidden_size))
        self.top_k = cfg.moe_top_k
        self.kind = cfg.moe_router_type
        self.normalise = cfg.moe_norm_topk_prob
        self.jitter_eps = cfg.moe_jitter_eps
        self.fp32 = cfg.moe_lbl_in_fp32

    def forward(self, x: torch.Tensor) -> Routing:
        """x: [N, H]."""
        if self.training and self.jitter_eps:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        weight = self.weight
        if self.fp32:
            x, weight = x.float(), weight.float()
        logits = F.linear(x, weight).float()
        probs = torch.softmax(logits, dim=-1)
        if self.kind == "topk":
            weights, experts = probs.topk(self.top_k, dim=-1)
        else:
            # gpt-neox: sigmoid weights for one expert, softmax for several; Sinkhorn picks them in training only
            # (it balances a whole batch, which generation does not have).
            scores = torch.sigmoid(logits) if self.top_k == 1 else probs
            if self.training:
                with torch.no_grad():
                    experts = sinkhorn(logits).topk(self.top_k, dim=-1).indices
                weights = scores.gather(1, experts)
            else:
                weights, experts = scores.topk(self.top_k, dim=-1)
        if self.normalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(weights, experts, logits, probs)


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """E x sum_e f_e P_e: f_e the fraction of tokens with e among their k experts (so sum_e f_e = k), P_e the mean
    router probability of e (Switch Transformer; transformers' load_balancing_loss_func for one layer)."""
    num_experts = probs.shape[-1]
    counts = torch.bincount(experts.flatten(), minlength=num_experts).to(probs.dtype)
    return num_experts * (counts / probs.shape[0] * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).square().mean()


# --- experts ----------------------------------------------------------------------------------------------------

class _GroupedMatmul(torch.autograd.Function):
    """Rows [c_0 + ... + c_{e-1}, ... + c_e) of x times expert e's matrix (transposed when `transposed`), one matmul
    per expert; outputs and gradients are written into one preallocated tensor (no slice copies, no concatenation)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: list[int], transposed: bool) -> torch.Tensor:
        out = x.new_empty(x.shape[0], weight.shape[1] if transposed else weight.shape[2])
        start = 0
        for expert, n in enumerate(counts):
            if n:
                w = weight[expert].t() if transposed else weight[expert]
                torch.mm(x[start:start + n], w, out=out[start:start + n])
            start += n
        ctx.save_for_backward(x, weight)
        ctx.counts, ctx.transposed = counts, transposed
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        # Every expert's rows write its own slice of grad_w: only an expert without tokens needs zeros.
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        start = 0
        for expert, n in enumerate(ctx.counts):
            rows = slice(start, start + n)
            if not n and grad_w is not None:
                grad_w[expert].zero_()
            if n:
                if grad_x is not None:  # y = x W^T: dx = g W;  y = x W: dx = g W^T
                    w = weight[expert] if ctx.transposed else weight[expert].t()
                    torch.mm(grad[rows], w, out=grad_x[rows])
                if grad_w is not None:  # y = x W^T: dW = g^T x;  y = x W: dW = x^T g
                    a, b = (grad[rows], x[rows]) if ctx.transposed else (x[rows], grad[rows])
                    torch.mm(a.t(), b, out=grad_w[expert])
            start += n
        return grad_x, grad_w, None, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int], transposed: bool,
                   use_grouped_mm: bool | None = None) -> torch.Tensor:
    """x [S, d] grouped by expert (counts[e] rows for expert e, in order) times each expert's matrix: weight[e].T
    (transposed, weight [E, out, d]) or weight[e] (weight [E, d, out]) -> [S, out]. On a GPU in bf16, torch's
    grouped matmul kernel (F.grouped_mm) does it in one call; elsewhere one matmul per expert (torch's CPU
    grouped_mm is ~10x slower than that loop). use_grouped_mm forces the choice (tests)."""
    if use_grouped_mm is None:
        use_grouped_mm = x.is_cuda and x.dtype == torch.bfloat16 and hasattr(F, "grouped_mm")
    if use_grouped_mm:
        offsets = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        return F.grouped_mm(x, weight.transpose(-2, -1) if transposed else weight, offs=offsets)
    return _GroupedMatmul.apply(x, weight, counts, transposed)


class ExpertLinear(nn.Module):
    """One projection of every expert, weight [experts, inner, hidden]: `down` maps the inner width to the hidden
    size (h @ weight[e]), otherwise the hidden size to the inner width (x @ weight[e].T)."""

    def __init__(self, num_experts: int, inner: int, hidden: int, down: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, inner, hidden))
        self.down = down

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # The weight is used inside this module's own forward: ZeRO-3 gathers it around this call.
        return grouped_linear(x, self.weight, counts, transposed=not self.down)


@dataclass
class Dispatched:
    """Tokens grouped by expert, and where each row goes back."""

    tokens: torch.Tensor  # [S, H]: counts[0] rows for the first (local) expert, then the next ...
    counts: list[int]  # rows per (local) expert
    slots: torch.Tensor  # [S] int64: the assignment (choice * N + token) each row serves
    num_tokens: int  # N
    top_k: int
    dropped: int  # assignments cut by the capacity


class SortedDispatch:
    """Single-device dispatch: sort the assignments by expert, gather the tokens; combine reverses it."""

    def dispatch(self, x: torch.Tensor, experts: torch.Tensor, num_experts: int,
                 capacity: int | None = None) -> Dispatched:
        n, k = experts.shape
        assigned = experts.t().reshape(-1)  # choice-major: slot c * N + t is token t's c-th choice
        slots = torch.argsort(assigned, stable=True)
        counts = torch.bincount(assigned, minlength=num_experts)
        dropped = 0
        if capacity is not None and int(counts.max()) > capacity:
            first = torch.cumsum(counts, 0) - counts  # where each expert's slice starts
            position = torch.arange(slots.numel(), device=slots.device) - first[assigned[slots]]
            slots = slots[position < capacity]
            dropped = n * k - slots.numel()
            counts = counts.clamp(max=capacity)
        return Dispatched(x.index_select(0, slots % n), counts.tolist(), slots, n, k, dropped)

    def combine(self, y: torch.Tensor, dispatched: Dispatched, weights: torch.Tensor) -> torch.Tensor:
        """y [S, H] (rows as dispatched) -> [N, H]: sum over each token's choices of weight x expert output."""
        n, k, slots = dispatched.num_tokens, dispatched.top_k, dispatched.slots
        weighted = y * weights.t().reshape(-1)[slots].to(y.dtype)[:, None]
        # Row of each assignment (a gather: autograd keeps only the index); a dropped one reads an extra zero row.
        rows = torch.full((n * k,), slots.numel(), dtype=torch.long, device=slots.device)
        rows[slots] = torch.arange(slots.numel(), device=slots.device)
        if dispatched.dropped:
            weighted = torch.cat([weighted, weighted.new_zeros(1, weighted.shape[-1])])
        return weighted.index_select(0, rows).view(k, n, -1).sum(0)


class Experts(nn.Module):
    """E expert MLPs (the dense MLP's shape at the expert width) over tokens dispatched by `dispatcher`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, inner = cfg.moe_num_experts, cfg.hidden_size, cfg.expert_inner_size
        self.num_experts = e
        self.linear1 = ExpertLinear(e, inner, h)
        self.gate = ExpertLinear(e, inner, h) if cfg.gated_mlp else None
        self.linear2 = ExpertLinear(e, inner, h, down=True)
        self.activation = ACTIVATION_FNS[cfg.activation]
        self.dispatcher = SortedDispatch()

    def mlp(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The experts on tokens grouped by expert (rows counts[e] for the e-th expert this module holds)."""
        up = self.linear1(tokens, counts)
        hidden = self.activation(up) if self.gate is None else self.activation(self.gate(tokens, counts)) * up
        return self.linear2(hidden, counts)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                capacity: int | None = None) -> tuple[torch.Tensor, int]:
        """x [N, H], weights and experts [N, k] -> (the weighted sum of each token's experts [N, H], assignments
        dropped by the capacity)."""
        dispatched = self.dispatcher.dispatch(x, experts, self.num_experts, capacity)
        y = self.mlp(dispatched.tokens, dispatched.counts)
        return self.dispatcher.combine(y, dispatched, weights), dispatched.dropped


# --- the block --------------------------------------------------------------------------------------------------

class AttachAuxLoss(torch.autograd.Function):
    """Identity on `out`; in backward also gives `aux` (a scalar) the gradient `scale`, as if scale x aux had been
    added to the loss the backward started from."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_like = (aux.shape, aux.dtype, aux.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.aux_like
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class MoE(nn.Module):
    """The MoE replacement of a block's MLP: [batch, seq, H] -> [batch, seq, H] (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.moe_num_experts, cfg.moe_top_k
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_expert = MLP(cfg, cfg.shared_expert_inner_size) if cfg.moe_num_shared_experts else None
        self.shared_expert_gate = (nn.Linear(cfg.hidden_size, 1, bias=False)
                                   if cfg.moe_num_shared_experts and cfg.moe_shared_expert_gate else None)
        self.capacity_factor = cfg.moe_capacity_factor
        self.aux_loss_coeff, self.z_loss_coeff = cfg.moe_aux_loss_coeff, cfg.moe_z_loss_coeff
        # What the engine multiplies the loss by before backward (set_aux_loss_scale); 1 for loss.backward().
        self.aux_loss_scale = 1.0
        self._stats: torch.Tensor | None = None

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None or not self.training:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = self.router(flat)
        out, dropped = self.experts(flat, routing.weights, routing.experts, self.capacity(flat.shape[0]))
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        if self.training and torch.is_grad_enabled():
            # Counted when autograd records (a reentrant activation checkpoint's no-grad pass is not: its
            # recomputation is); a non-reentrant checkpoint's recomputation counts the same values again.
            balance, z = load_balancing_loss(routing.probs, routing.experts), z_loss(routing.logits)
            self._record(routing.experts, balance, z, dropped)
            if self.aux_loss_coeff or self.z_loss_coeff:
                aux = self.aux_loss_coeff * balance + self.z_loss_coeff * z
                out = AttachAuxLoss.apply(out, aux, self.aux_loss_scale)
        return out.view(shape)

    @torch.no_grad()
    def _record(self, experts: torch.Tensor, balance: torch.Tensor, z: torch.Tensor, dropped: int) -> None:
        counts = torch.bincount(experts.flatten(), minlength=self.num_experts).double()
        losses = torch.stack([balance, z]).double()  # kept on the device: no synchronisation per forward
        one, fixed = counts.new_ones(1), torch.tensor([dropped, experts.numel()], dtype=torch.float64)
        row = torch.cat([one, losses, fixed.to(counts.device), counts])
        self._stats = row if self._stats is None else self._stats + row

    def take_stats(self) -> torch.Tensor:
        """Sums over the training forwards since the last call (STAT_FIELDS, then tokens per expert), as a float64
        tensor (zeros if none ran); resets them."""
        stats = self._stats
        self._stats = None
        if stats is None:
            return torch.zeros(len(STAT_FIELDS) + self.num_experts, dtype=torch.float64,
                               device=self.router.weight.device if not self.router.weight.is_meta else "cpu")
        return stats


# --- helpers for the engines, metrics and the plan ----------------------------------------------------------------

def moe_blocks(model: nn.Module) -> list[tuple[int, MoE]]:
    """(layer index, MoE block) of every MoE layer of a GPTNeoX, a layer sharing an earlier layer's parameters
    (num_unique_layers) listed once, under the first layer running it."""
    found: dict[int, tuple[int, MoE]] = {}
    for index, block in enumerate(getattr(model, "blocks", [])):
        if isinstance(block.mlp, MoE):
            found.setdefault(id(block.mlp), (index, block.mlp))
    return list(found.values())




def params_per_expert(cfg: ModelConfig) -> int:
    return cfg.hidden_size * cfg.expert_inner_size * (3 if cfg.gated_mlp else 2)


def expert_params(cfg: ModelConfig) -> int:
    """Parameters of the routed experts of the whole model (shared layers counted once)."""
    layers = [i for i in cfg.moe_layer_indices if cfg.layer_owners[i] == i]
    return len(layers) * cfg.moe_num_experts * params_per_expert(cfg)


def inactive_params(cfg: ModelConfig) -> int:
    """Routed-expert parameters a token does not use: (E - k) experts of every MoE layer. The active parameters of a
    model of `total` parameters are total - inactive_params (MFU counts FLOPs from them, as Megatron does)."""
    if not cfg.moe_layer_indices:
        return 0
    return expert_params(cfg) * (cfg.moe_num_experts - cfg.moe_top_k) // cfg.moe_num_experts

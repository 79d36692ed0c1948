"""Apply tensor parallelism to a single-device GPTNeoX, in one ordered place (the model file knows nothing of it).

Order: check sizes divide -> swap column/row-parallel linears by module name -> make attention count local
heads, normalise q/k and read the T5 bias of those heads, and draw its dropout masks per tp rank -> vocab-parallel
embedding -> vocab-parallel head (tied to the embedding shard when weights are tied), or for an untied head with
output_layer_parallelism 'row' a head split over the hidden dim -> mark tp-replicated parameters (norms, row-parallel
biases, qk norms, the T5 table) so the gradient norm counts them once. Layers shared by num_unique_layers are
parallelised once. Works on a meta-device model too (neox/parallel/materialize.py fills it).

sequence_parallel (Megatron-LM's, arXiv 2205.05198) then shards the residual stream along the sequence over the tp
ranks: the embedding output is split, norms, dropout and residual adds run on this rank's positions, column-parallel
layers and the head gather, row-parallel layers reduce-scatter (neox/parallel/sequence.py). The replicated
parameters that then see only this rank's positions (norm scales and shifts, row-parallel biases) get their
gradients summed over tp, and hidden dropout draws per tp rank: each rank's positions need masks of their own.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from neox.model import GPTNeoX, causal_lm_loss
from neox.model.moe import MoE
from neox.model.value_head import ValueHead
from neox.parallel.lora import LoraParallelLinear, column_parallel_linear, row_parallel_linear
from neox.parallel.moe import shard_moe
from neox.parallel.sharding import COLUMN_PARALLEL, ROW_PARALLEL
from neox.parallel.tensor import (ColumnParallelLinear, ParallelQKNorm, ParallelRelativePositionBias,
                                  RowParallelHead, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead,
                                  copy_to_tp, mark_parallel, shard_rows, vocab_parallel_lm_loss)
from neox.parallel.rng import use_tp_rank_dropout
from neox.parallel.sequence import gather_for_replicated, scatter_to_sequence
from neox.parallel.topology import Topology, check_model_divides

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _swap(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, new)


def apply_tensor_parallel(model: GPTNeoX, topo: Topology, row_parallel_head: bool = False,
                          sequence_parallel: bool = False) -> GPTNeoX:
    """In place; returns the model. With tp 1 only the parameter marks are set. row_parallel_head (training with
    output_layer_parallelism 'row', untied head): the head's logits come out whole on every rank, not vocab-sharded
    (decoders and evaluators, which gather vocab shards, keep the default). sequence_parallel: shard the residual
    stream along the sequence (no effect with tp 1); a training-memory layout, whose parameters are those of plain
    tensor parallelism, so evaluators and decoders load its checkpoints without it."""
    cfg = model.cfg
    tp, rank, group = topo.tp_size, topo.tp_rank, topo.tp_group
    check_model_divides(cfg, tp, topo.pp_size)
    # The split parameters are new tensors: those frozen (a LoRA base) stay frozen under their unchanged names.
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    if tp > 1:
        relative_bias = None
        for block in dict.fromkeys(model.blocks):  # a block shared by several layers is parallelised once
            for name, module in list(block.named_modules()):
                if not isinstance(module, nn.Linear):
                    continue
                if name in COLUMN_PARALLEL:  # with its LoRA adapter split alike, if it has one
                    _swap(block, name, column_parallel_linear(module, group, rank, tp))
                elif name in ROW_PARALLEL:
                    _swap(block, name, row_parallel_linear(module, group, rank, tp))
            if isinstance(block.mlp, MoE):  # every expert split as the dense MLP is (neox/parallel/moe.py)
                shard_moe(block.mlp, group, rank, tp)
            attn = block.attention
            attn.num_heads //= tp
            attn.kv_heads //= tp
            if attn.alibi_slopes is not None:
                attn.alibi_slopes = attn.alibi_slopes.chunk(tp)[rank].clone()
            if attn.qk_norm is not None:
                attn.qk_norm = ParallelQKNorm(attn.qk_norm, group, rank, tp)
            if attn._relative_bias[0] is not None:
                # One table for the model: every layer reads the same parallel view of it.
                relative_bias = relative_bias or ParallelRelativePositionBias(attn._relative_bias[0], group, rank, tp)
                attn._relative_bias = (relative_bias,)
                if hasattr(attn, "rpe"):
                    attn.rpe = relative_bias
            # Each rank holds other heads: one shared stream would give them the same attention-dropout masks.
            use_tp_rank_dropout(attn, rank, tp)
        tied = getattr(model.head, "weight", None) is model.embedding.word_embeddings.weight
        embedding = VocabParallelEmbedding(model.embedding.word_embeddings, group, rank, tp)
        model.embedding.word_embeddings = embedding
        if isinstance(model.head, ValueHead):
            pass  # a reward model's scalar head stays whole on every rank, like the norms before it
        elif tied:
            model.head = VocabParallelHead(embedding.weight, group, embedding.vocab_start)
        elif row_parallel_head:
            model.head = RowParallelHead(model.head.weight, group, rank, tp)
        else:
            head_weight = mark_parallel(nn.Parameter(shard_rows(model.head.weight.data, rank, tp)), True, rank)
            model.head = VocabParallelHead(head_weight, group, embedding.vocab_start)
        if sequence_parallel:
            _shard_sequence(model, topo)
    for name, param in model.named_parameters():
        if not hasattr(param, "neox_tp_sharded"):
            mark_parallel(param, False, rank)
        if name in frozen:
            param.requires_grad_(False)
    return model


class _SummedOverTP:
    """A norm's `affine()` whose gradients are summed over the tp group (copy_to_tp): under sequence parallelism
    each rank normalises its own positions, so each holds part of the replicated scale's and shift's gradient."""

    def __init__(self, affine: Callable, group):
        self.affine, self.group = affine, group

    def __call__(self) -> tuple[torch.Tensor | None, ...]:
        return tuple(None if p is None else copy_to_tp(p, self.group) for p in self.affine())


def _scatter_output(group, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return scatter_to_sequence(out, group)


def _shard_sequence(model: GPTNeoX, topo: Topology) -> None:
    """Sequence parallelism on a model already tensor-parallelised in place (see the module docstring)."""
    group = topo.tp_group
    # The embedding (and its dropout, with the replicated stream's shared masks) runs on the whole sequence.
    model.embedding.register_forward_hook(partial(_scatter_output, group))
    norms = [model.final_norm]
    for block in dict.fromkeys(model.blocks):
        block_norms = [n for n in (block.input_layernorm, block.post_attention_layernorm) if n is not None]
        norms += block_norms
        row_biases = []
        for module in block.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                module.sequence_parallel = True
            if isinstance(module, RowParallelLinear) and module.bias is not None:
                row_biases.append(module.bias)  # summed over tp in RowParallelLinear's sequence-parallel forward
            if isinstance(module, LoraParallelLinear):
                row_biases.append(module.replicated_adapter)  # summed over tp in the layer's forward
        attn = block.attention
        # Attention runs on the whole sequence of this rank's heads: its qk norm and T5 table keep their own rule.
        whole_sequence = [m for m in (attn.qk_norm, attn._relative_bias[0]) if m is not None]
        _check_replicated_covered(block, [p for m in block_norms + whole_sequence for p in m.parameters()]
                                  + row_biases)
        use_tp_rank_dropout(block, topo.tp_rank, topo.tp_size)  # hidden dropout on this rank's positions
    for norm in norms:
        norm.affine = _SummedOverTP(norm.affine, group)
    if isinstance(model.head, ValueHead):  # replicated: it scores the whole sequence on every rank
        model.head.register_forward_pre_hook(partial(_gather_input, group))
    else:
        model.head.sequence_parallel = True


def _gather_input(group, module: nn.Module, args: tuple) -> tuple:
    return (gather_for_replicated(args[0], group), *args[1:])


def _check_replicated_covered(block: nn.Module, covered: list[nn.Parameter]) -> None:
    """Every parameter a block holds whole on each tp rank must have its gradient made whole: a new one would
    otherwise train on a fraction of the sequence, on each rank differently."""
    known = {id(p) for p in covered}
    left = [n for n, p in block.named_parameters() if not getattr(p, "neox_tp_sharded", False) and id(p) not in known]
    if left:
        raise RuntimeError(f"sequence_parallel does not know how to sum the gradients of {left} over the "
                           "tensor-parallel ranks (neox/parallel/parallelize.py: _shard_sequence)")


def lm_loss_fn(topo: Topology, padded_vocab_size: int, row_parallel_head: bool = False,
               half_precision: bool = False) -> LossFn:
    """The loss for this layout's logits: plain cross entropy, or vocab-parallel when the logits are sharded (not
    with a row-parallel head, whose logits are whole). half_precision: fp16_lm_cross_entropy."""
    if topo.tp_size == 1 or row_parallel_head:
        return partial(causal_lm_loss, half_precision=half_precision)
    vocab_start = topo.tp_rank * (padded_vocab_size // topo.tp_size)

    def loss(local_logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
        return vocab_parallel_lm_loss(local_logits, labels, loss_mask, vocab_start, topo.tp_group, half_precision)

    return loss


@dataclass
class GradNormClipper:
    """Global gradient norm and clipping for DeepSpeed's ZeRO-0 fp32 path, correct under tp and pp.

    Measured after DeepSpeed has all-reduced gradients over dp (and tied weights over stages). A parameter counts
    on this rank when it is a tp shard or this is tp rank 0, and not when it is a pipeline-replicated copy of a
    tied weight; the squares are summed over the model-parallel (pp x tp) group, those of expert-parallel shards
    first over the expert-parallel group. topo None: this rank holds the
    whole model (the data-parallel-only engine). Clip coefficient max_norm / (norm + 1e-6), capped at 1, as
    DeepSpeed's; the squares accumulate in fp64 (squared_norm), as DeepSpeed's ZeRO norms do.
    """
    topo: Topology | None
    max_norm: float
    last_norm: float | None = None
    _norm: torch.Tensor | None = None

    def norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        squares = torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)
        experts = torch.zeros_like(squares)  # expert-parallel shards: the other experts are on the ep group's ranks
        for p in params:
            if p.grad is None or getattr(p, "ds_pipe_replicated", False):
                continue
            if self.topo is None or getattr(p, "neox_tp_sharded", False) or self.topo.tp_rank == 0:
                if getattr(p, "neox_expert_parallel", False):
                    experts = experts + squared_norm(p.grad)
                else:
                    squares = squares + squared_norm(p.grad)
        if self.topo is not None and self.topo.ep_group is not None:
            torch.distributed.all_reduce(experts, group=self.topo.ep_group)
        squares = squares + experts
        group = None if self.topo is None else self.topo.model_group
        if group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(squares, group=group)
        return squares.sqrt()

    def measure(self, module: nn.Module) -> None:
        self._norm = self.norm([p for p in module.parameters() if p.grad is not None])
        self.last_norm = float(self._norm)

    def clip(self, module: nn.Module) -> None:
        if self._norm is None:
            self.measure(module)
        coef = torch.clamp(self.max_norm / (self._norm + 1e-6), max=1.0)
        for p in module.parameters():
            if p.grad is not None:
                p.grad.detach().mul_(coef)
        self._norm = None


_NORM_CHUNK = 256


def squared_norm(grad: torch.Tensor) -> torch.Tensor:
    """sum(grad**2) as an fp64 scalar, accurate to a few 1e-8 relative at any size.

    Not grad.float().norm()**2: torch's CPU norm kernel sums a float32 tensor in one float32 accumulator per lane,
    1e-3 relative off on a GPT-2-sized embedding gradient (3.2M entries) and by a size-dependent amount, so a tp
    shard's error differs from the whole tensor's (pytorch/pytorch#169237). Not vector_norm(dtype=float64) either:
    it converts the whole tensor to fp64 first (218 ms for 25M entries on one core, 70x the fp32 norm). Norms of
    256-entry chunks in fp32 (few enough additions per lane to stay exact to ~3e-8), squared and summed in fp64,
    cost ~2.7x the plain fp32 norm.
    """
    flat = grad.detach().reshape(-1)
    whole = flat.numel() // _NORM_CHUNK * _NORM_CHUNK
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    if whole:
        chunks = torch.linalg.vector_norm(flat[:whole].view(-1, _NORM_CHUNK), dim=1, dtype=torch.float32)
        total = total + chunks.double().square().sum()
    if whole < flat.numel():
        total = total + torch.linalg.vector_norm(flat[whole:], dtype=torch.float32).double().square()
    return total


def install_grad_norm_clipper(engine, topo: Topology | None, max_norm: float) -> GradNormClipper:
    """Measure the global norm before every optimizer step (the loop logs it, clipping on or off) and replace the
    engine's fp32 ZeRO-0 clipping, which counts a pipeline's tied embedding once per stage holding it and sums
    float32 norms, with GradNormClipper's (the engine calls it only when gradient_clipping > 0)."""
    clipper = GradNormClipper(topo, max_norm)
    take_model_step = engine._take_model_step

    def measured_model_step(*args, **kwargs):
        clipper.measure(engine.module)
        return take_model_step(*args, **kwargs)

    engine._take_model_step = measured_model_step
    engine.clip_fp32_gradients = lambda: clipper.clip(engine.module)
    return clipper

"""Parameter counts of the model and of each rank: tensor-parallel shards, pipeline stages, tied embeddings.

Counted from the config, never by building the model, so a 20B plan costs nothing. The layer sequence is the
pipeline's (neox/parallel/pipeline.py): embedding, the blocks, final norm, head; a tied head is a second copy of
the embedding table on the last stage. Per-head tables (qk norms, the T5 bias owned by the first block) are whole on
every tp rank; a layer sharing an earlier layer's parameters (num_unique_layers) counts none of its own. A MoE
layer's MLP is its router (replicated), E experts (each split over tp as the dense MLP is) and the optional shared
expert and its gate; a token uses k of the E experts, so the active parameters (FLOPs, MFU) leave out the other
E - k (neox/model/moe.py:inactive_params). With expert parallelism (moe_expert_parallel_size = ep) a rank holds
E/ep of each MoE layer's experts, each split over tp as before (neox/parallel/expert_parallel.py), and the pipeline
is cut on those per-rank counts (the experts are cut before the stages are). Stages are cut by DeepSpeed's own
functions, with
the weights its PipelineModule gives them: 'parameters' a layer's parameter count, 'type:REGEX' 1 for a layer whose
class name matches and 0 otherwise (partition_balanced); 'uniform' the layer count (partition_uniform).
"""
from __future__ import annotations

from dataclasses import dataclass

from neox.config.errors import ConfigError
from neox.config.model import ModelConfig
from neox.model.moe import expert_params, inactive_params, params_per_expert
from neox.parallel.stages import partition_layers

# Class names of the pipeline's layers, which 'type:REGEX' partitioning matches (case-insensitive).
EMBEDDING_LAYER = "EmbeddingPipe"
BLOCK_LAYER = "TransformerLayerPipe"
NORM_LAYER = "FinalNormPipe"
HEAD_LAYER = "HeadPipe"


@dataclass(frozen=True)
class LayerParams:
    """One pipeline layer: its class name, its parameters in the whole model and on one tensor-parallel rank."""

    kind: str
    full: int
    per_tp_rank: int  # on one rank: its tp shard, and with expert parallelism only its E/ep experts
    moe: bool = False  # a transformer block whose MLP is a mixture of experts
    experts_per_rank: int = 0  # the routed experts' part of per_tp_rank (what ZeRO partitions over dp/ep)


@dataclass(frozen=True)
class StageParams:
    """What one pipeline stage (one of its tensor-parallel ranks) holds."""

    index: int
    layers: tuple[LayerParams, ...]
    is_first: bool  # holds the embedding, reads the tokens
    is_last: bool  # holds the final norm and the head, computes the loss

    @property
    def params(self) -> int:
        return sum(layer.per_tp_rank for layer in self.layers)

    @property
    def blocks(self) -> int:
        return sum(layer.kind == BLOCK_LAYER for layer in self.layers)

    @property
    def moe_blocks(self) -> int:
        return sum(layer.kind == BLOCK_LAYER and layer.moe for layer in self.layers)

    @property
    def expert_params(self) -> int:
        """The routed experts' parameters on one rank of the stage (included in `params`)."""
        return sum(layer.experts_per_rank for layer in self.layers)


@dataclass(frozen=True)
class ModelParams:
    total: int  # the single-device model's parameters (a tied head counted once)
    stages: tuple[StageParams, ...]
    active: int  # the parameters one token uses: total less the E - k experts it is not routed to
    experts: int  # the routed experts' parameters (0 without MoE layers)
    experts_per_tp_rank: int
    experts_per_rank: int = 0  # experts_per_tp_rank / ep: the E/ep experts of each MoE layer on a rank

    @property
    def largest_stage(self) -> StageParams:
        return max(self.stages, key=lambda stage: stage.params)


def norm_params(m: ModelConfig, width: int) -> int:
    """Parameters of one norm of the configured type over `width` values (neox/model/norms.py)."""
    if m.norm == "scalenorm":
        return 1  # one gain
    if m.norm == "non_parametric_layernorm":
        return 0
    return width * (1 + int(m.use_bias_in_norms))


def _dense_mlp(m: ModelConfig, inner: int) -> tuple[int, int]:
    """(tp-split, replicated) parameters of a dense MLP of this inner width."""
    h, bias = m.hidden_size, int(m.use_bias_in_mlp)
    # Column-parallel linear1 (and gate): weight and bias split. Row-parallel linear2: weight split, bias replicated.
    return (2 if m.gated_mlp else 1) * inner * (h + bias) + h * inner, h * bias


def _moe_mlp(m: ModelConfig) -> tuple[int, int]:
    """(tp-split, replicated) parameters of a MoE layer's MLP (neox/model/moe.py)."""
    h = m.hidden_size
    split, replicated = m.moe_num_experts * h * m.expert_inner_size * (3 if m.gated_mlp else 2), m.moe_num_experts * h
    if m.moe_num_shared_experts:
        shared_split, shared_replicated = _dense_mlp(m, m.shared_expert_inner_size)
        split, replicated = split + shared_split, replicated + shared_replicated + h * int(m.moe_shared_expert_gate)
    return split, replicated


def block_params(m: ModelConfig, tp: int, moe: bool = False) -> tuple[int, int]:
    """(parameters of one transformer block, of its shard on one tensor-parallel rank); moe: its MLP is a MoE."""
    h = m.hidden_size
    qkv_rows = (m.num_attention_heads + 2 * m.kv_heads) * m.head_dim
    attn_bias = int(m.use_bias_in_attn_linear)
    norms = (1 if m.gpt_j_residual and m.gpt_j_tied else 2) * norm_params(m, h)
    if m.use_qk_layernorm:
        norms += norm_params(m, m.num_attention_heads * m.head_dim)  # one norm shared by q and k, whole per rank
    mlp_split, mlp_replicated = _moe_mlp(m) if moe else _dense_mlp(m, m.mlp_inner_size)
    # Column-parallel qkv: weight and bias split. Row-parallel dense: weight split, bias replicated. Norms replicated.
    split = qkv_rows * (h + attn_bias) + h * m.num_attention_heads * m.head_dim + mlp_split
    replicated = norms + h * attn_bias + mlp_replicated
    return split + replicated, split // tp + replicated


def model_layers(m: ModelConfig, tp: int, ep: int = 1) -> list[LayerParams]:
    if m.padded_vocab_size is None:
        raise ConfigError("the plan needs the vocabulary size: give a tokenizer that builds ('vocab_file', "
                          "'merge_file') or set 'padded_vocab_size'")
    h, vocab = m.hidden_size, m.padded_vocab_size
    table = vocab * h
    positions = m.max_positions * h if m.pos_emb == "learned" else 0  # replicated over tp
    norm = norm_params(m, h)
    layers = [LayerParams(EMBEDDING_LAYER, table + positions, table // tp + positions)]
    # A layer sharing the parameters of an earlier one (num_unique_layers) holds none of its own.
    moe_layers = set(m.moe_layer_indices)
    routed = m.moe_num_experts * params_per_expert(m) // tp  # one MoE layer's experts on one tp rank
    for layer, owner in enumerate(m.layer_owners):
        moe = layer in moe_layers
        full, per_tp_rank = block_params(m, tp, moe) if owner == layer else (0, 0)
        experts = routed // ep if moe and owner == layer else 0
        if experts:  # the rank keeps E/ep of them (dim 0 of each expert tensor)
            per_tp_rank -= routed - experts
        layers.append(LayerParams(BLOCK_LAYER, full, per_tp_rank, moe=moe, experts_per_rank=experts))
    if m.pos_emb == "rpe":  # the T5 table [buckets, heads], held whole on every tp rank by the first layer
        rpe = m.rpe_num_buckets * m.num_attention_heads
        first = layers[1]
        layers[1] = LayerParams(BLOCK_LAYER, first.full + rpe, first.per_tp_rank + rpe, first.moe,
                                first.experts_per_rank)
    layers.append(LayerParams(NORM_LAYER, norm, norm))
    # A tied head is the embedding table again (a TiedLayerSpec of the embedding in the pipeline).
    layers.append(LayerParams(EMBEDDING_LAYER if not m.no_weight_tying else HEAD_LAYER, table, table // tp))
    return layers


def model_params(m: ModelConfig, tp: int, pp: int, partition_method: str, ep: int = 1) -> ModelParams:
    """ep: moe_expert_parallel_size (each rank holds E/ep of every MoE layer's experts)."""
    layers = model_layers(m, tp, ep)
    total = sum(layer.full for layer in layers) - (0 if m.no_weight_tying else layers[-1].full)
    experts = expert_params(m)
    moe = dict(active=total - inactive_params(m), experts=experts, experts_per_tp_rank=experts // tp,
               experts_per_rank=experts // tp // ep)
    if pp <= 1:
        stage_layers = [layers] if m.no_weight_tying else [layers[:-1]]  # one stage holds one table
        return ModelParams(total, (StageParams(0, tuple(stage_layers[0]), True, True),), **moe)
    bounds = partition(layers, pp, partition_method)
    stages = tuple(StageParams(i, tuple(layers[bounds[i]:bounds[i + 1]]), i == 0, i == pp - 1) for i in range(pp))
    return ModelParams(total, stages, **moe)


def partition(layers: list[LayerParams], parts: int, method: str) -> list[int]:
    """Stage boundaries [0, b1, ..., len(layers)], cut as DeepSpeed's PipelineModule cuts them."""
    return partition_layers([layer.kind for layer in layers], lambda: [layer.per_tp_rank for layer in layers],
                            parts, method)

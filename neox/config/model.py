"""Model architecture keys (gpt-neox names and defaults) and their validation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from neox.config.errors import ConfigError
from neox.config.moe import validate_moe

PosEmb = Literal["learned", "rotary", "sinusoidal", "rpe", "alibi", "none"]
Norm = Literal["layernorm", "rmsnorm", "non_parametric_layernorm", "scalenorm"]
# Gated activations split the MLP into a value and a gate projection: act(gate(x)) * value(x).
PlainActivation = Literal["gelu", "gelu_tanh", "relu", "silu", "swish", "mish", "softsign"]
GatedActivation = Literal["geglu", "reglu", "swiglu", "glu", "bilinear"]
Activation = Literal[PlainActivation, GatedActivation]
InitMethod = Literal[
    "normal",
    "scaled_normal",
    "single_residual_scaled_normal",
    "orthogonal",
    "scaled_orthogonal",
    "xavier_uniform",
    "xavier_normal",
    "wang_init",
    "small_init",
]
POS_EMBS = get_args(PosEmb)
NORMS = get_args(Norm)
GATED_ACTIVATIONS = get_args(GatedActivation)
ACTIVATIONS = get_args(Activation)
INIT_METHODS = get_args(InitMethod)
# attention_config layer types built here; every other gpt-neox type needs a feature this project does not have.
ATTENTION_TYPES = ("global", "flash", "local")
GPT_NEOX_ATTENTION_TYPES = ("global", "local", "sparse_fixed", "sparse_variable", "bigbird", "bslongformer", "gmlp",
                            "amlp", "flash", "rwkv", "mamba")
PARAM_SHARING_STYLES = ("grouped", "spaced")
OUTPUT_LAYER_PARALLELISM = ("column", "row")


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    """The transformer's shape and options; one instance fully determines the parameter set."""

    num_layers: int | None = _help("Number of transformer layers (required).", None)
    hidden_size: int | None = _help("Transformer hidden size (required).", None)
    num_attention_heads: int | None = _help("Number of attention (query) heads (required).", None)
    num_kv_heads: int | None = _help(
        "Key/value heads: None or num_attention_heads = multi-head, 1 = multi-query, else grouped-query "
        "attention; must divide num_attention_heads.",
        None,
    )
    seq_length: int | None = _help("Training sequence length in tokens (required).", None)
    max_position_embeddings: int | None = _help(
        "Rows of the learned position table / longest supported position; None means seq_length.", None
    )
    pos_emb: PosEmb = _help("Position encoding (learned table, rotary, ALiBi bias, or none).", "learned")
    rotary_pct: float = _help("Fraction of each head's dims that rotary embedding rotates, in (0, 1].", 1.0)
    rotary_emb_base: float = _help("Base (theta) of the rotary frequencies.", 10000.0)
    norm: Norm = _help("Normalisation layer.", "layernorm")
    layernorm_epsilon: float = _help("Epsilon of LayerNorm.", 1.0e-5)
    rms_norm_epsilon: float = _help("Epsilon of RMSNorm, added to the mean square.", 1.0e-8)
    gpt_j_residual: bool = _help(
        "Parallel residual (GPT-J / Pythia): x + attn(ln1(x)) + mlp(ln2(x)); false: sequential pre-norm.", False
    )
    activation: Activation = _help(
        "MLP activation; geglu, reglu, swiglu, glu and bilinear are gated (act(gate(x)) * linear1(x)); "
        "gelu_tanh is the tanh approximation (GPT-2's gelu_new).",
        "gelu",
    )
    intermediate_size: int | None = _help(
        "MLP width, gpt-neox meaning: unset = expansion_factor * hidden_size, else 4 * hidden_size; gated "
        "activations make each of their two projections int(2/3 * it) // 2 wide (then mlp_multiple_of rounding).",
        None,
    )
    expansion_factor: float | None = _help(
        "MLP width as a multiple of hidden_size when intermediate_size is unset.", None
    )
    mlp_multiple_of: int = _help("Round the MLP inner width up to a multiple of this.", 1)
    use_bias_in_norms: bool = _help("Give norm layers a bias (shift) term.", True)
    use_bias_in_attn_linear: bool = _help("Give the attention q/k/v and output projections biases.", True)
    use_bias_in_mlp: bool = _help("Give the MLP projections biases.", True)
    no_weight_tying: bool = _help("Untie the output head from the input embedding.", False)
    init_method: InitMethod = _help("Init of every weight matrix except the residual output projections.", "normal")
    output_layer_init_method: InitMethod = _help(
        "Init of the residual output projections (attention dense, MLP linear2).", "scaled_normal"
    )
    init_method_std: float = _help("Standard deviation of the normal init (and base of scaled_normal).", 0.02)
    attention_dropout: float = _help("Dropout probability on attention probabilities.", 0.0)
    hidden_dropout: float = _help("Dropout probability on embeddings and on each residual branch output.", 0.0)
    checkpoint_activations: bool = _help(
        "Recompute the transformer layers in backward (checkpoint_num_layers at a time) instead of keeping their "
        "activations.",
        False,
    )
    attention_softmax_in_fp32: bool = _help("Compute attention in fp32 when the model runs in fp16/bf16.", False)
    make_vocab_size_divisible_by: int = _help(
        "The embedding has the tokenizer's vocab size rounded up to a multiple of this.", 128
    )
    padded_vocab_size: int | None = _help(
        "Rows of the embedding and output head; derived from the tokenizer, not set by hand.", None
    )

    # ---- attention variants ----
    attention_config: list | None = _help(
        "Attention type per layer in gpt-neox's [[types, repeat], ...] form ('all' as repeat fills every layer; a "
        "flat list of num_layers types is taken as is); None = every layer 'global'. 'global' and 'flash' are exact "
        "causal attention through SDPA (its flash kernel on GPU), 'local' is DeepSpeed's local sliding-window block "
        "pattern (sparsity_config 'block', 'num_local_blocks') as a dense mask.",
        None,
    )
    sparsity_config: dict | None = _help(
        "Block pattern of 'local' layers: 'block' (tokens per block, default 16) and 'num_local_blocks' (alias "
        "'num_sliding_window_blocks', default 4): a query sees the causal keys of its own block and the "
        "num_local_blocks // 2 blocks before it.",
        None,
    )
    sliding_window_width: int | None = _help(
        "Sliding-window attention on 'global' and 'flash' layers: a query at position i sees keys i - width .. i "
        "(width + 1 keys, flash-attn's window_size=(width, 0); Hugging Face Mistral's sliding_window = width + 1).",
        None,
    )
    use_qk_layernorm: bool = _help(
        "Normalise queries and keys before rotary (one norm of the configured type shared by q and k, weights per "
        "(head, head dim)); with grouped-query attention the keys are expanded to the query heads first.",
        False,
    )
    apply_query_key_layer_scaling: bool = _help(
        "On 'global' layers: scores q.k / (sqrt(head_dim) * max(1, layer index)) in the model dtype, then x that "
        "factor in fp32 before the fp32 softmax (gpt-neox's fp16 overflow guard; position biases are scaled by it "
        "too). Forces the fp32 softmax.",
        False,
    )
    rpe_num_buckets: int = _help("Buckets of the T5 relative position bias (pos_emb 'rpe').", 32)
    rpe_max_distance: int = _help("Distance from which T5 relative positions share the last bucket.", 128)
    opt_pos_emb_offset: int = _help(
        "Learned positions read row position + offset (OPT checkpoints use 2); the table needs seq_length + "
        "offset rows.",
        0,
    )
    rotary_save_freqs_buffer: bool = _help(
        "Keep each layer's rotary inv_freq buffer in the state dict (attention.rotary_emb.inv_freq), as gpt-neox "
        "checkpoints saved with it carry it; a state dict without it still loads.",
        False,
    )
    scalenorm_epsilon: float = _help("Lower bound of the vector norm in ScaleNorm (norm 'scalenorm').", 1.0e-8)
    gpt_j_tied: bool = _help(
        "With gpt_j_residual: one norm feeds both branches, x + attn(ln(x)) + mlp(ln(x)) (no post-attention norm).",
        False,
    )
    num_unique_layers: int | None = _help(
        "Share parameters across layers: only this many distinct layers (must divide num_layers); None = all "
        "distinct. Not with a multi-stage pipeline.",
        None,
    )
    param_sharing_style: str = _help(
        "Order of the shared layers: 'grouped' = 1 2 1 2, 'spaced' = 1 1 2 2 (for 4 layers, 2 unique).", "grouped"
    )
    output_layer_parallelism: Literal["column", "row"] = _help(
        "Untied output head under tensor parallelism: 'column' splits the vocabulary (vocab-parallel cross "
        "entropy), 'row' splits the hidden dim (partial logits all-reduced). A tied head is always the "
        "vocab-parallel embedding table, as in gpt-neox.",
        "column",
    )

    # ---- mixture of experts (neox/model/moe.py; gpt-neox's keys, then neox's own) ----
    moe_num_experts: int = _help(
        "Experts in each mixture-of-experts layer; 1 = no MoE layers (every layer has a dense MLP).", 1
    )
    moe_expert_interval: int = _help(
        "Every moe_expert_interval-th layer is a MoE layer, counted from layer 0 as gpt-neox does (layers 0, n, "
        "2n, ...).",
        1,
    )
    moe_top_k: int = _help("Experts each token is routed to in a MoE layer.", 1)
    moe_router_type: Literal["sinkhorn", "topk"] = _help(
        "Token routing: 'topk' takes each token's k most probable experts (softmax over all experts); 'sinkhorn' "
        "(gpt-neox) chooses them by Sinkhorn-balanced scores in training, with softmax (k > 1) or sigmoid (k = 1) "
        "weights, and by plain top-k in evaluation.",
        "sinkhorn",
    )
    moe_lbl_in_fp32: bool = _help(
        "Router logits in fp32 (input and weight upcast) when the model trains in fp16/bf16; the routing "
        "probabilities and the load-balancing and z losses are always fp32.",
        False,
    )
    moe_jitter_eps: float | None = _help(
        "Multiply the router's input by uniform noise in [1 - eps, 1 + eps] in training (gpt-neox's router "
        "jitter); None = off.",
        None,
    )
    moe_layers: list[int] | None = _help(
        "Explicit MoE layer indices (from 0), instead of moe_expert_interval's every n-th layer (e.g. Qwen2-MoE's "
        "decoder_sparse_step and mlp_only_layers).",
        None,
    )
    moe_norm_topk_prob: bool = _help(
        "Renormalise each token's k routing weights to sum to 1 (Mixtral: a softmax over the top-k logits; "
        "Qwen2-MoE / OLMoE norm_topk_prob); false: the softmax over all experts at the chosen ones (gpt-neox).",
        False,
    )
    moe_capacity_factor: float | None = _help(
        "Token dropping in training (Switch/GShard): each expert takes at most ceil(factor x tokens x k / experts) "
        "assignments of a micro-batch, first choices before second ones, earlier tokens first; the rest skip the "
        "expert (the residual carries them). None = dropless. Evaluation and generation are always dropless.",
        None,
    )
    moe_aux_loss_coeff: float = _help(
        "Weight of the load-balancing loss added to the training loss, per MoE layer: num_experts x sum over "
        "experts of (fraction of tokens routed to it) x (mean router probability), as transformers' Mixtral.",
        0.0,
    )
    moe_z_loss_coeff: float = _help(
        "Weight of the router z-loss added to the training loss, per MoE layer: mean over tokens of "
        "logsumexp(router logits)^2 (ST-MoE).",
        0.0,
    )
    moe_num_shared_experts: int = _help(
        "Shared experts every token goes through beside its routed ones (Qwen2-MoE, DeepSeek): one dense MLP of "
        "moe_shared_expert_intermediate_size added to the MoE output.",
        0,
    )
    moe_shared_expert_gate: bool = _help(
        "Scale the shared experts' output by sigmoid(x . w), a learned [1, hidden] gate (Qwen2-MoE).", False
    )
    moe_intermediate_size: int | None = _help(
        "Inner width of each expert; None = gpt-neox's rule: intermediate_size as it is, else 4 x hidden_size "
        "(plain) or 8/3 x hidden_size (gated), rounded up to a multiple of 256.",
        None,
    )
    moe_shared_expert_intermediate_size: int | None = _help(
        "Inner width of the shared expert MLP; None = moe_num_shared_experts x the expert width.", None
    )

    # ---- activation checkpointing (with checkpoint_activations) ----
    checkpoint_num_layers: int = _help("Transformer layers recomputed together per activation checkpoint.", 1)
    deepspeed_activation_checkpointing: bool = _help(
        "Checkpoint through deepspeed.checkpointing (configured by the keys below); false: torch.utils.checkpoint "
        "(those keys then have no effect).",
        True,
    )
    partition_activations: bool = _help(
        "Split each saved checkpoint input across the tensor-parallel ranks (gathered again for recompute).", False
    )
    contiguous_checkpointing: bool = _help(
        "Copy partitioned checkpoints into one preallocated buffer (needs partition_activations).", False
    )
    checkpoint_in_cpu: bool = _help("Keep the saved checkpoint inputs in CPU memory.", False)
    synchronize_each_layer: bool = _help("Synchronise the device at the start and end of each checkpoint.", False)
    profile_backward: bool = _help("Log forward/backward times of each checkpointed chunk (DeepSpeed timers).", False)

    # ---- numerics and initialisation ----
    fp16_lm_cross_entropy: bool = _help(
        "Per-token cross entropy of the head computed in fp16 (gpt-neox: needs precision fp16); the mean over "
        "tokens stays fp32.",
        False,
    )
    use_cpu_initialization: bool = _help(
        "Initial weights drawn on the CPU then moved; neox always initialises this way (each rank draws only its "
        "shards of the single-device values, which are drawn in independently seeded tiles), so both values give "
        "the same weights.",
        False,
    )

    # ---- derived values the model reads ----
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_attention_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings if self.max_position_embeddings is not None else self.seq_length

    @property
    def gated_mlp(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def mlp_inner_size(self) -> int:
        """Width of the MLP hidden activation (the input of linear2), following gpt-neox's rule."""
        if self.intermediate_size is not None:
            width = self.intermediate_size
        elif self.expansion_factor is not None:
            width = int(self.expansion_factor * self.hidden_size)
        else:
            width = 4 * self.hidden_size
        if self.gated_mlp:
            # Two projections instead of one: 2/3 of the width keeps the parameter count of a plain MLP.
            width = int(width * 2 / 3) // 2
        multiple = self.mlp_multiple_of
        return multiple * ((width + multiple - 1) // multiple)

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def attention_types(self) -> list[str]:
        """One attention type per layer, expanded from attention_config as gpt-neox expands it."""
        return expand_attention_types(self.attention_config, self.num_layers)

    @property
    def local_attention_blocks(self) -> tuple[int, int]:
        """(block size, blocks a 'local' query looks back) of DeepSpeed's LocalSlidingWindowSparsityConfig."""
        sparsity = self.sparsity_config or {}
        block = sparsity.get("block", 16)
        window_blocks = sparsity.get("num_local_blocks", sparsity.get("num_sliding_window_blocks", 4))
        return block, window_blocks // 2

    @property
    def unique_layer_of(self) -> list[int]:
        """For each layer, the index of the distinct (parameter-owning) layer it runs."""
        unique = self.num_unique_layers or self.num_layers
        if self.param_sharing_style == "grouped":
            return [i % unique for i in range(self.num_layers)]
        return [i // (self.num_layers // unique) for i in range(self.num_layers)]

    @property
    def layer_owners(self) -> list[int]:
        """For each layer, the first layer running the same parameters (itself unless num_unique_layers shares)."""
        first: dict[int, int] = {}
        return [first.setdefault(unique, layer) for layer, unique in enumerate(self.unique_layer_of)]

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        """The layers whose MLP is a mixture of experts (none with moe_num_experts 1)."""
        if self.moe_num_experts <= 1:
            return ()
        if self.moe_layers is not None:
            return tuple(sorted(set(self.moe_layers)))
        return tuple(i for i in range(self.num_layers) if i % self.moe_expert_interval == 0)

    @property
    def expert_inner_size(self) -> int:
        """Inner width of one expert (gpt-neox's rule unless moe_intermediate_size is set)."""
        if self.moe_intermediate_size is not None:
            return self.moe_intermediate_size
        if self.intermediate_size is not None:
            return self.intermediate_size
        width = int(8 * self.hidden_size / 3) if self.gated_mlp else 4 * self.hidden_size
        return 256 * ((width + 255) // 256)

    @property
    def shared_expert_inner_size(self) -> int:
        if self.moe_shared_expert_intermediate_size is not None:
            return self.moe_shared_expert_intermediate_size
        return self.moe_num_shared_experts * self.expert_inner_size

    @property
    def row_parallel_head(self) -> bool:
        """The head is split over the hidden dim under tp (an untied head with output_layer_parallelism 'row')."""
        return self.output_layer_parallelism == "row" and self.no_weight_tying

    def validate(self) -> None:
        """Raise ConfigError naming the first offending key(s)."""
        for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            value = getattr(self, key)
            if value is None:
                raise ConfigError(f"model key '{key}' must be set")
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model key '{key}' must be a positive integer, got {value!r}")
        _choice("pos_emb", self.pos_emb, POS_EMBS)
        _choice("norm", self.norm, NORMS)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("init_method", self.init_method, INIT_METHODS)
        _choice("output_layer_init_method", self.output_layer_init_method, INIT_METHODS)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"'num_attention_heads' ({self.num_attention_heads}) must divide 'hidden_size' ({self.hidden_size})"
            )
        if self.num_kv_heads is not None and (
            self.num_kv_heads <= 0 or self.num_attention_heads % self.num_kv_heads
        ):
            raise ConfigError(
                f"'num_kv_heads' ({self.num_kv_heads}) must be a positive divisor of "
                f"'num_attention_heads' ({self.num_attention_heads})"
            )
        if self.max_position_embeddings is not None and self.max_position_embeddings < self.seq_length:
            raise ConfigError(
                f"'max_position_embeddings' ({self.max_position_embeddings}) must be >= 'seq_length' "
                f"({self.seq_length})"
            )
        if self.pos_emb == "rotary":
            if not 0.0 < self.rotary_pct <= 1.0:
                raise ConfigError(f"'rotary_pct' must be in (0, 1], got {self.rotary_pct}")
            if self.rotary_ndims < 2 or self.rotary_ndims % 2:
                raise ConfigError(
                    f"rotary dims int(head_dim * rotary_pct) = int({self.head_dim} * {self.rotary_pct}) = "
                    f"{self.rotary_ndims} must be even and >= 2: change 'rotary_pct', 'hidden_size' or "
                    "'num_attention_heads'"
                )
            if self.rotary_emb_base <= 0:
                raise ConfigError(f"'rotary_emb_base' must be positive, got {self.rotary_emb_base}")
        for key in ("layernorm_epsilon", "rms_norm_epsilon", "init_method_std", "make_vocab_size_divisible_by",
                    "mlp_multiple_of"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model key '{key}' must be positive, got {getattr(self, key)!r}")
        for key in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model key '{key}' must be in [0, 1), got {getattr(self, key)!r}")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ConfigError(f"'intermediate_size' must be positive, got {self.intermediate_size}")
        if self.expansion_factor is not None and self.expansion_factor <= 0:
            raise ConfigError(f"'expansion_factor' must be positive, got {self.expansion_factor}")
        if self.mlp_inner_size <= 0:
            raise ConfigError("'intermediate_size' / 'expansion_factor' give an empty MLP; raise them")
        if self.padded_vocab_size is not None and self.padded_vocab_size <= 0:
            raise ConfigError(f"'padded_vocab_size' must be positive, got {self.padded_vocab_size}")
        self._validate_variants()
        validate_moe(self)

    def _validate_variants(self) -> None:
        """The gpt-neox options of attention, positions, norms, sharing and checkpointing."""
        types = self.attention_types
        if "local" in types:
            _check_sparsity_config(self.sparsity_config)
        if self.sliding_window_width is not None and (
            isinstance(self.sliding_window_width, bool) or self.sliding_window_width < 0
        ):
            raise ConfigError("'sliding_window_width' must be a non-negative integer, got "
                              f"{self.sliding_window_width!r}")
        if self.pos_emb == "rpe":
            if self.rpe_num_buckets < 2:
                raise ConfigError(f"'rpe_num_buckets' must be >= 2, got {self.rpe_num_buckets}")
            if self.rpe_max_distance <= self.rpe_num_buckets // 2:
                raise ConfigError(f"'rpe_max_distance' ({self.rpe_max_distance}) must exceed half of "
                                  f"'rpe_num_buckets' ({self.rpe_num_buckets}): T5's logarithmic buckets start there")
        if self.pos_emb == "sinusoidal" and self.hidden_size % 2:
            raise ConfigError(f"'pos_emb: sinusoidal' needs an even 'hidden_size', got {self.hidden_size}")
        if self.opt_pos_emb_offset < 0:
            raise ConfigError(f"'opt_pos_emb_offset' must be >= 0, got {self.opt_pos_emb_offset}")
        if self.pos_emb == "learned" and self.opt_pos_emb_offset and \
                self.max_positions < self.seq_length + self.opt_pos_emb_offset:
            raise ConfigError(f"'opt_pos_emb_offset' {self.opt_pos_emb_offset} reads learned position rows up to "
                              f"seq_length + offset = {self.seq_length + self.opt_pos_emb_offset}: raise "
                              f"'max_position_embeddings' (now {self.max_positions}) to at least that")
        if self.scalenorm_epsilon <= 0:
            raise ConfigError(f"'scalenorm_epsilon' must be positive, got {self.scalenorm_epsilon}")
        _choice("param_sharing_style", self.param_sharing_style, PARAM_SHARING_STYLES)
        _choice("output_layer_parallelism", self.output_layer_parallelism, OUTPUT_LAYER_PARALLELISM)
        unique = self.num_unique_layers
        if unique is not None and not (0 < unique <= self.num_layers and self.num_layers % unique == 0):
            raise ConfigError(f"'num_unique_layers' ({unique}) must be a positive divisor of 'num_layers' "
                              f"({self.num_layers})")
        if unique is not None:
            for layer, owner in enumerate(self.layer_owners):
                if types[layer] != types[owner]:
                    raise ConfigError(f"layers {owner} and {layer} share parameters ('num_unique_layers' {unique}, "
                                      f"'param_sharing_style' {self.param_sharing_style}) but 'attention_config' "
                                      f"gives them different types ({types[owner]}, {types[layer]})")
        if self.checkpoint_num_layers < 1:
            raise ConfigError(f"'checkpoint_num_layers' must be >= 1, got {self.checkpoint_num_layers}")
        if self.contiguous_checkpointing and not self.partition_activations:
            raise ConfigError("'contiguous_checkpointing' needs 'partition_activations: true' (DeepSpeed copies "
                              "the partitioned checkpoints into its contiguous buffer)")


def expand_attention_types(attention_config: list | None, num_layers: int) -> list[str]:
    """gpt-neox's expand_attention_types: [[types, n], ...] -> types repeated n times, in order; an item whose n is
    'all' repeats its pattern over every layer (num_layers must be a multiple of its length) and ends the list; a
    list of plain strings is already expanded. Raises ConfigError naming 'attention_config'."""
    if attention_config is None:
        return ["global"] * num_layers
    if not isinstance(attention_config, list):
        raise ConfigError(f"'attention_config' must be a list like [[[\"global\"], {num_layers}]], got "
                          f"{attention_config!r}")
    if all(isinstance(item, str) for item in attention_config):
        types = list(attention_config)
    else:
        types = []
        for item in attention_config:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], list)
                    and all(isinstance(t, str) for t in item[0]) and item[0]
                    and (item[1] == "all" or (isinstance(item[1], int) and not isinstance(item[1], bool)))):
                raise ConfigError(f"'attention_config' item {item!r} is not [[type, ...], count or 'all']")
            pattern, repeat = item
            if repeat == "all":
                if num_layers % len(pattern):
                    raise ConfigError(f"'attention_config': num_layers ({num_layers}) is not a multiple of the "
                                      f"length of the 'all' pattern {pattern}")
                types = pattern * (num_layers // len(pattern))
                break
            types += pattern * repeat
    if len(types) != num_layers:
        raise ConfigError(f"'attention_config' gives {len(types)} layer types but 'num_layers' is {num_layers}")
    for kind in types:
        if kind not in GPT_NEOX_ATTENTION_TYPES:
            raise ConfigError(f"'attention_config' layer type {kind!r} is unknown; gpt-neox's types are "
                              f"{', '.join(GPT_NEOX_ATTENTION_TYPES)}")
        if kind not in ATTENTION_TYPES:
            raise ConfigError(f"'attention_config' layer type {kind!r} is not built by this model (it builds "
                              f"{', '.join(ATTENTION_TYPES)})")
    return types


def _check_sparsity_config(sparsity: dict | None) -> None:
    for key in ("block", "num_local_blocks", "num_sliding_window_blocks"):
        value = (sparsity or {}).get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"'sparsity_config' {key!r} must be a positive integer, got {value!r}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"model key '{key}' is {value!r}; choose one of {', '.join(choices)}")


def check_model_combinations(model: ModelConfig, pipe_parallel_size: int, precision: str | None) -> None:
    """Model keys that depend on the layout or the precision (neox/config/validate.py:check_combinations)."""
    if model.fp16_lm_cross_entropy and precision != "fp16":
        raise ConfigError(f"'fp16_lm_cross_entropy' needs 'precision' fp16 (as in gpt-neox), got {precision}: turn "
                          "it off, or train in fp16 (a GPU: fp16 training is refused on the CPU)")
    if model.num_unique_layers not in (None, model.num_layers) and pipe_parallel_size >= 1:
        raise ConfigError(f"'num_unique_layers' ({model.num_unique_layers}) shares layers, which DeepSpeed's pipeline "
                          f"engine ('pipe_parallel_size' {pipe_parallel_size} >= 1) would hold as separate copies per "
                          "stage (gpt-neox also shares them only without it): set pipe_parallel_size 0")
    if model.pos_emb == "rpe" and pipe_parallel_size >= 2:
        raise ConfigError(f"'pos_emb: rpe' with 'pipe_parallel_size' {pipe_parallel_size}: every layer reads the one "
                          "T5 bias table, which would be split into untied copies per pipeline stage (gpt-neox lets "
                          "them drift apart); use pipe_parallel_size 0 or 1")

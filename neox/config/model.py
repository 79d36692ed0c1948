"""Model architecture keys (gpt-neox names and defaults) and their validation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from neox.config.errors import ConfigError

PosEmb = Literal["learned", "rotary", "alibi", "none"]
Norm = Literal["layernorm", "rmsnorm"]
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
    checkpoint_activations: bool = _help("Recompute each layer in backward instead of keeping activations.", False)
    attention_softmax_in_fp32: bool = _help("Compute attention in fp32 when the model runs in fp16/bf16.", False)
    make_vocab_size_divisible_by: int = _help(
        "The embedding has the tokenizer's vocab size rounded up to a multiple of this.", 128
    )
    padded_vocab_size: int | None = _help(
        "Rows of the embedding and output head; derived from the tokenizer, not set by hand.", None
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


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"model key '{key}' is {value!r}; choose one of {', '.join(choices)}")

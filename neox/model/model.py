"""The GPT-NeoX family on one device: embedding -> blocks -> final norm -> head.

Every piece is its own nn.Module so a pipeline spec can be cut from them, and the parallel layers
(neox/parallel) replace modules by name; nothing here knows about either.

Fused query_key_value layout (output rows), for G = num_kv_heads groups of Q = heads / G query heads:

    [ group 0: q_0 .. q_{Q-1}, k, v | group 1: q_0 .. q_{Q-1}, k, v | ... ]   each slot head_dim rows

With G == heads (multi-head) this is GPT-NeoX's per-head [q, k, v] interleave, so Pythia weights load
as they are; a column-parallel split along the output dim keeps whole groups together.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neox.config.errors import ConfigError
from neox.config.model import ModelConfig
from neox.model.cache import KVCache
from neox.model.init import init_weights
from neox.model.heads import split_heads
from neox.model.loss import token_cross_entropy
from neox.model.positions import RotaryTable, alibi_slopes

ACTIVATION_FNS = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "softsign": F.softsign,
    # gated: the function applied to the gate projection
    "geglu": F.gelu,
    "reglu": F.relu,
    "swiglu": F.silu,
    "glu": torch.sigmoid,
    "bilinear": lambda x: x,
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return out if self.bias is None else out + self.bias


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden_size, cfg.rms_norm_epsilon, cfg.use_bias_in_norms)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, bias=cfg.use_bias_in_norms)


class Embedding(nn.Module):
    """Token embedding (+ learned positions), then embedding dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)
        self.position_embeddings = (
            nn.Embedding(cfg.max_positions, cfg.hidden_size) if cfg.pos_emb == "learned" else None
        )
        self.dropout = cfg.hidden_dropout

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        x = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            if position_ids is None:
                x = x + self.position_embeddings.weight[start : start + tokens.shape[1]]
            else:
                x = x + self.position_embeddings(position_ids)
        return F.dropout(x, self.dropout, self.training) if self.dropout else x


class Attention(nn.Module):
    """Causal self-attention through SDPA, with grouped-query heads and rotary or ALiBi positions."""

    def __init__(self, cfg: ModelConfig, layer_index: int, rotary: RotaryTable | None):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.group_size = self.num_heads // self.kv_heads
        qkv_rows = (self.num_heads + 2 * self.kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, qkv_rows, bias=cfg.use_bias_in_attn_linear)
        self.dense = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.use_bias_in_attn_linear)
        self.rotary = rotary
        self.rotary_ndims = cfg.rotary_ndims if rotary is not None else 0
        self.dropout = cfg.attention_dropout
        self.softmax_in_fp32 = cfg.attention_softmax_in_fp32
        if cfg.pos_emb == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(self.num_heads), persistent=False)
        else:
            self.alibi_slopes = None

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        start = cache.length if cache is not None else 0
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary.lookup(position_ids, start, s, x.device, x.dtype)
        # q [b, heads, s, d], k and v [b, kv_heads, s, d], contiguous, q and k rotated.
        q, k, v = split_heads(self.query_key_value(x), cos, sin, self.kv_heads, self.group_size, self.head_dim,
                              self.rotary_ndims)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)

        out_dtype = q.dtype
        if self.softmax_in_fp32 and q.dtype != torch.float32:
            q, k, v = q.float(), k.float(), v.float()
        is_causal = mask is None and s > 1
        if self.alibi_slopes is not None:
            mask = self._alibi_bias(mask, s, k.shape[2], start, q.dtype)
            is_causal = False
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=self.kv_heads != self.num_heads,
        )
        out = out.to(out_dtype).transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.dense(out)

    def _alibi_bias(
        self, mask: torch.Tensor | None, q_len: int, k_len: int, start: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """Additive bias -slope * (query index - key index), with masked keys at -inf."""
        device = self.alibi_slopes.device
        q_idx = torch.arange(start, start + q_len, device=device)
        k_idx = torch.arange(k_len, device=device)
        distance = (k_idx[None, :] - q_idx[:, None]).to(torch.float32)  # <= 0 for visible keys
        bias = self.alibi_slopes[:, None, None] * distance  # [heads, q, k]
        if mask is None:
            mask = k_idx[None, :] <= q_idx[:, None]
        return bias.masked_fill(~mask, float("-inf")).to(dtype)


class MLP(nn.Module):
    """linear1 -> activation -> linear2; gated activations add a `gate` projection: act(gate) * linear1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inner = cfg.mlp_inner_size
        self.linear1 = nn.Linear(cfg.hidden_size, inner, bias=cfg.use_bias_in_mlp)
        self.gate = nn.Linear(cfg.hidden_size, inner, bias=cfg.use_bias_in_mlp) if cfg.gated_mlp else None
        self.linear2 = nn.Linear(inner, cfg.hidden_size, bias=cfg.use_bias_in_mlp)
        self.activation = ACTIVATION_FNS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.linear2(self.activation(self.linear1(x)))
        return self.linear2(self.activation(self.gate(x)) * self.linear1(x))


class Block(nn.Module):
    """One transformer layer, pre-norm; parallel (GPT-J) or sequential residual."""

    def __init__(self, cfg: ModelConfig, layer_index: int, rotary: RotaryTable | None):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.attention = Attention(cfg, layer_index, rotary)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.parallel_residual = cfg.gpt_j_residual
        self.dropout = cfg.hidden_dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        attn = self._drop(self.attention(self.input_layernorm(x), position_ids, mask, cache))
        if self.parallel_residual:
            return x + attn + self._drop(self.mlp(self.post_attention_layernorm(x)))
        x = x + attn
        return x + self._drop(self.mlp(self.post_attention_layernorm(x)))


class Head(nn.Module):
    """Output projection to the (padded) vocabulary; its weight may be the embedding's (tied)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.padded_vocab_size, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class GPTNeoX(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.padded_vocab_size is None:
            raise ConfigError("model key 'padded_vocab_size' is unset: derive it from the tokenizer before "
                              "building the model")
        self.cfg = cfg
        rotary = None
        if cfg.pos_emb == "rotary":
            rotary = RotaryTable(cfg.rotary_ndims, cfg.rotary_emb_base, cfg.max_positions)
        self.embedding = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i, rotary) for i in range(cfg.num_layers))
        self.final_norm = make_norm(cfg)
        self.head = Head(cfg)
        init_weights(self, cfg)
        if not cfg.no_weight_tying:
            self.head.weight = self.embedding.word_embeddings.weight

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits [batch, seq, padded_vocab_size].

        attention_mask: [batch, cached + seq], 1 for real tokens, 0 for padding (left padding for
        decoding). position_ids default to the running count of real tokens when a mask is given,
        else to cached .. cached + seq - 1. With a cache, the new keys/values are appended to it.
        """
        start = cache.length if cache is not None else 0
        s = tokens.shape[1]
        if self.cfg.pos_emb == "learned" and start + s > self.cfg.max_positions:
            raise ValueError(f"{start + s} positions exceed the learned position table "
                             f"(max_position_embeddings = {self.cfg.max_positions})")
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start : start + s]
        mask = self._attention_mask(attention_mask, s, start, tokens.device)

        x = self.embedding(tokens, position_ids, start)
        recompute = self.cfg.checkpoint_activations and self.training and cache is None
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, position_ids, mask, use_reentrant=False)
            else:
                x = block(x, position_ids, mask, cache)
        if cache is not None:
            cache.advance(s)
        return self.head(self.final_norm(x))

    @staticmethod
    def _attention_mask(
        attention_mask: torch.Tensor | None, q_len: int, start: int, device: torch.device
    ) -> torch.Tensor | None:
        """Boolean [b, 1, q, keys] mask (True = attend), or None when plain causal attention suffices."""
        if attention_mask is None and (start == 0 or q_len == 1):
            return None
        q_idx = torch.arange(start, start + q_len, device=device)[:, None]
        k_idx = torch.arange(start + q_len, device=device)[None, :]
        mask = (k_idx <= q_idx)[None, None]
        if attention_mask is not None:
            if attention_mask.shape[1] != start + q_len:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} positions but the cache holds {start} "
                    f"and {q_len} are new: pass the mask for all {start + q_len}"
                )
            # A padding query attends to itself so its softmax row is never empty (no NaN).
            mask = (mask & attention_mask.bool()[:, None, None, :]) | (k_idx == q_idx)
        return mask

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        return causal_lm_loss(logits, labels, loss_mask)

    def new_cache(self, max_length: int) -> KVCache:
        return KVCache(max_length)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross entropy in fp32 over the unmasked positions.

    labels are already shifted (labels[:, i] is the token after tokens[:, i]), as the data loader
    yields them; loss_mask has the labels' shape, 1 where the loss counts.
    """
    losses = token_cross_entropy(logits.flatten(0, -2), labels.flatten())
    if loss_mask is None:
        return losses.mean()
    weights = loss_mask.flatten().to(losses.dtype)
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)

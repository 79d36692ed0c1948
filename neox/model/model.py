"""The GPT-NeoX family on one device: embedding -> blocks -> final norm -> head.

Every piece is its own nn.Module so a pipeline spec can be cut from them, and the parallel layers
(neox/parallel) replace modules by name; nothing here knows about either. Which keys a query sees (causal
order, padding, each layer's sliding window or local blocks) is neox/model/masks.py.

Fused query_key_value layout (output rows), for G = num_kv_heads groups of Q = heads / G query heads:

    [ group 0: q_0 .. q_{Q-1}, k, v | group 1: q_0 .. q_{Q-1}, k, v | ... ]   each slot head_dim rows

With G == heads (multi-head) this is GPT-NeoX's per-head [q, k, v] interleave, so Pythia weights load
as they are; a column-parallel split along the output dim keeps whole groups together.
"""
from __future__ import annotations

import logging
import math
import os
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neox.config.errors import ConfigError
from neox.config.model import ModelConfig
from neox.model.cache import KVCache
from neox.model.init import default_init_seed, init_weights
from neox.model.heads import split_heads
from neox.model.loss import half_token_cross_entropy, token_cross_entropy
from neox.model.masks import FULL, Pattern, Visibility
from neox.model.mlp import ACTIVATION_FNS, MLP  # noqa: F401 (ACTIVATION_FNS: re-exported)
from neox.model.moe import MoE
from neox.model.mup import MupSetup, apply_mup
from neox.model.norms import QKNorm, make_norm
from neox.model.positions import (RelativePositionBias, RotaryTable, alibi_slopes, rotary_inv_freq, rotate,
                                  sinusoidal_embedding)
from neox.model.state import register_state_dict_hooks
from neox.model.value_head import ValueHead

_log = logging.getLogger("neox.model")
_flash_fallback_said = False


class Embedding(nn.Module):
    """Token embedding (+ learned or sinusoidal positions), then embedding dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)
        self.position_embeddings = (
            nn.Embedding(cfg.max_positions, cfg.hidden_size) if cfg.pos_emb == "learned" else None
        )
        self.sinusoidal = cfg.pos_emb == "sinusoidal"
        self.position_offset = cfg.opt_pos_emb_offset  # OPT's learned table starts at row 2
        self.dropout = cfg.hidden_dropout
        # gpt-neox's mup_rp_embedding_mult and mup_embedding_mult (set by neox/model/mup.py).
        self.position_mult = 1.0
        self.output_mult = 1.0

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        x = self.word_embeddings(tokens)
        positions = None
        if self.position_embeddings is not None:
            first = start + self.position_offset
            if position_ids is None:
                positions = self.position_embeddings.weight[first : first + tokens.shape[1]]
            else:
                positions = self.position_embeddings(position_ids + self.position_offset)
        elif self.sinusoidal:
            if position_ids is None:
                position_ids = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
            positions = sinusoidal_embedding(position_ids, x.shape[-1], x.dtype)
        if positions is not None:
            x = x + (positions * self.position_mult if self.position_mult != 1.0 else positions)
        x = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return x * self.output_mult if self.output_mult != 1.0 else x


class RotaryFrequencies(nn.Module):
    """Holds gpt-neox's rotary inv_freq as a state-dict buffer (rotary_save_freqs_buffer); RotaryTable computes."""

    def __init__(self, ndims: int, base: float):
        super().__init__()
        # Built on the CPU even inside a meta-device build: a derived value, not a weight to materialise.
        self.register_buffer("inv_freq", rotary_inv_freq(ndims, base, device="cpu"))


class Attention(nn.Module):
    """Causal self-attention through SDPA: grouped-query heads; rotary, ALiBi or T5-bias positions; the layer's
    attention type (global / flash: every earlier key, or a sliding window; local: DeepSpeed's block pattern);
    gpt-neox's qk norm and query-key layer scaling."""

    def __init__(self, cfg: ModelConfig, layer_index: int, rotary: RotaryTable | None,
                 relative_bias: RelativePositionBias | None = None):
        super().__init__()
        self.layer_index = layer_index
        if relative_bias is not None and layer_index == 0:
            self.rpe = relative_bias  # one T5 table for the model: owned (saved, trained) here, read by every layer
        self._relative_bias = (relative_bias,)  # a plain reference: not registered again by later layers
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
        self.softmax_scale: float | None = None  # None: SDPA's 1/sqrt(head_dim); muP sets 1/(head_dim * temp)
        if cfg.pos_emb == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(self.num_heads), persistent=False)
        else:
            self.alibi_slopes = None
        if rotary is not None and cfg.rotary_save_freqs_buffer:
            self.rotary_emb = RotaryFrequencies(self.rotary_ndims, cfg.rotary_emb_base)
        kind = cfg.attention_types[layer_index]
        if kind == "local":
            block, blocks_back = cfg.local_attention_blocks
            self.pattern = Pattern(block=block, blocks_back=blocks_back)
        else:
            self.pattern = Pattern(window=cfg.sliding_window_width) if cfg.sliding_window_width is not None else FULL
        # gpt-neox's sparse (local) attention drops its output, the dense kinds drop attention probabilities.
        self.dropout_on_output = kind == "local"
        self.flash = kind == "flash"  # the same exact attention as 'global': SDPA picks its flash kernel on GPUs
        # gpt-neox scales by the layer only on its non-flash dense path ('global'); its layer_number counts from 0.
        self.layer_scale = max(1, layer_index) if cfg.apply_query_key_layer_scaling and kind == "global" else None
        self.qk_norm = QKNorm(cfg) if cfg.use_qk_layernorm else None

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        mask: Visibility | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """mask: the forward's Visibility (GPTNeoX._attention_mask), None when attention starts at the first position
        without padding or is a single query."""
        qkv = self.query_key_value(x)
        # The length the projection sees: under sequence parallelism (neox/parallel) x holds part of the sequence
        # and the projection gathers the rest.
        b, s, _ = qkv.shape
        start = cache.length if cache is not None else 0
        if self.flash and x.device.type == "cpu":
            _say_flash_fallback()
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary.lookup(position_ids, start, s, x.device, x.dtype)
        if self.qk_norm is None:
            # q [b, heads, s, d], k and v [b, kv_heads, s, d], contiguous, q and k rotated.
            q, k, v = split_heads(qkv, cos, sin, self.kv_heads, self.group_size, self.head_dim, self.rotary_ndims)
        else:
            q, k, v = self._normalised_heads(qkv, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)

        relative_bias = self._relative_bias[0]
        if mask is None and (self.pattern.restricts or self.layer_scale is not None or relative_bias is not None
                             or self.alibi_slopes is not None):
            mask = Visibility.build(None, s, start, x.device)
        allowed = None if mask is None else mask.mask(self.pattern)  # None: plain causal (or one query: all keys)
        bias = None
        if self.alibi_slopes is not None:  # -slope * (query index - key index)
            distance = (mask.k_index[None, :] - mask.q_index[:, None]).to(torch.float32)
            bias = (self.alibi_slopes[:, None, None] * distance)[None]
        elif relative_bias is not None:
            bias = relative_bias(mask.q_index, mask.k_index)

        out_dtype = q.dtype
        if self.layer_scale is not None:
            out = self._layer_scaled_attention(q, k, v, allowed, bias)
        else:
            if self.softmax_in_fp32 and q.dtype != torch.float32:
                q, k, v = q.float(), k.float(), v.float()
            attn_mask = allowed if bias is None else bias.to(q.dtype).masked_fill(~allowed, float("-inf"))
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.dropout if self.training and not self.dropout_on_output else 0.0,
                is_causal=attn_mask is None and s > 1,
                scale=self.softmax_scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )
        if self.dropout_on_output and self.training and self.dropout:
            out = F.dropout(out, self.dropout)
        out = out.to(out_dtype).transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.dense(out)

    def _normalised_heads(self, qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """use_qk_layernorm, as gpt-neox: queries and keys normalised by one shared norm before rotary. With grouped
        keys/values gpt-neox repeats them to the query heads first, so each key copy gets its query head's scale."""
        q, k, v = split_heads(qkv, None, None, self.kv_heads, self.group_size, self.head_dim, 0)
        if self.group_size > 1:
            k, v = k.repeat_interleave(self.group_size, dim=1), v.repeat_interleave(self.group_size, dim=1)
        q, k = self.qk_norm(q), self.qk_norm(k)
        if cos is not None:
            q, k = rotate(q, cos, sin, self.rotary_ndims), rotate(k, cos, sin, self.rotary_ndims)
        return q, k, v

    def _layer_scaled_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                                bias: torch.Tensor | None) -> torch.Tensor:
        """gpt-neox's apply_query_key_layer_scaling: scores = q.k / (norm * c) in the model dtype (+ position bias),
        then x c in fp32 (so the bias is x c too), masked, fp32 softmax, probabilities back in the model dtype."""
        c = self.layer_scale
        if k.shape[1] != q.shape[1]:  # grouped-query: gpt-neox repeats the key/value heads on this path
            k, v = k.repeat_interleave(self.group_size, dim=1), v.repeat_interleave(self.group_size, dim=1)
        norm = math.sqrt(self.head_dim) * c if self.softmax_scale is None else 1.0 / self.softmax_scale
        b, h, sq, d = q.shape
        sk = k.shape[2]
        scores = torch.baddbmm(q.new_empty(b * h, sq, sk), q.reshape(b * h, sq, d),
                               k.reshape(b * h, sk, d).transpose(1, 2), beta=0.0, alpha=1.0 / norm).view(b, h, sq, sk)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        scores = (scores.float() * c).masked_fill(~allowed, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        if self.training and self.dropout:
            probs = F.dropout(probs, self.dropout)
        return probs @ v


class Block(nn.Module):
    """One transformer layer, pre-norm; parallel (GPT-J) or sequential residual. gpt_j_tied: the parallel residual
    feeds both branches from the one input norm (no post-attention norm)."""

    def __init__(self, cfg: ModelConfig, layer_index: int, rotary: RotaryTable | None,
                 relative_bias: RelativePositionBias | None = None):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.attention = Attention(cfg, layer_index, rotary, relative_bias)
        tied = cfg.gpt_j_residual and cfg.gpt_j_tied
        self.post_attention_layernorm = None if tied else make_norm(cfg)
        # Every moe_expert_interval-th layer (gpt-neox counts from layer 0), or those moe_layers lists, is a MoE.
        self.mlp = MoE(cfg) if layer_index in cfg.moe_layer_indices else MLP(cfg)
        self.parallel_residual = cfg.gpt_j_residual
        self.dropout = cfg.hidden_dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        mask: Visibility | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        normed = self.input_layernorm(x)
        attn = self._drop(self.attention(normed, position_ids, mask, cache))
        if self.parallel_residual:
            mlp_in = normed if self.post_attention_layernorm is None else self.post_attention_layernorm(x)
            return x + attn + self._drop(self.mlp(mlp_in))
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
    def __init__(self, cfg: ModelConfig, mup: MupSetup | None = None, init_seed: int | None = None,
                 value_head: bool = False):
        super().__init__()
        cfg.validate()
        if cfg.padded_vocab_size is None:
            raise ConfigError("model key 'padded_vocab_size' is unset: derive it from the tokenizer before "
                              "building the model")
        self.cfg = cfg
        # The initial values follow from the config and this seed alone (neox/model/init.py). The modules'
        # constructors draw values that init_weights replaces: the global stream is restored after them.
        self.init_seed = default_init_seed() if init_seed is None else init_seed
        stream = torch.random.get_rng_state()
        rotary = None
        if cfg.pos_emb == "rotary":
            rotary = RotaryTable(cfg.rotary_ndims, cfg.rotary_emb_base, cfg.max_positions)
        self.embedding = Embedding(cfg)
        relative_bias = None
        if cfg.pos_emb == "rpe":
            relative_bias = RelativePositionBias(cfg.rpe_num_buckets, cfg.rpe_max_distance, cfg.num_attention_heads,
                                                 cfg.head_dim)
        # num_unique_layers: blocks lists one entry per layer, a layer sharing parameters holding the very module of
        # the first layer that runs them (which also sets its attention type); the state dict names each parameter
        # once, under that first layer.
        owners = cfg.layer_owners
        built = {layer: Block(cfg, layer, rotary, relative_bias) for layer in sorted(set(owners))}
        self.blocks = nn.ModuleList(built[owner] for owner in owners)
        register_state_dict_hooks(self, shared_layers=len(built) < cfg.num_layers, rotary=rotary is not None)
        # Recomputes a run of layers in backward (checkpoint_activations); neox/parallel may swap in DeepSpeed's.
        self.activation_checkpoint = partial(checkpoint, use_reentrant=False)
        self.final_norm = make_norm(cfg)
        # value_head: a reward model (train_impl rm) scores each position instead of predicting the next token.
        self.head = ValueHead(cfg.hidden_size) if value_head else Head(cfg)
        if not cfg.no_weight_tying and not value_head:
            self.head.weight = self.embedding.word_embeddings.weight
        torch.random.set_rng_state(stream)
        # Any block of any parameter's initial value, from the seed alone: a meta-device build's parameters are
        # filled from it later, one rank's shards only (neox/parallel/materialize.py).
        self.init_plan = init_weights(self, cfg, self.init_seed)
        # muP (use_mup): multipliers on the embedding, attention and the final norm's output, and the init scaled.
        self.mup = mup
        self.mup_widths = apply_mup(self, mup) if mup is not None else {}

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
        if self.cfg.pos_emb == "learned" and start + s + self.cfg.opt_pos_emb_offset > self.cfg.max_positions:
            raise ValueError(f"{start + s} positions (+ opt_pos_emb_offset {self.cfg.opt_pos_emb_offset}) exceed "
                             f"the learned position table (max_position_embeddings = {self.cfg.max_positions})")
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start : start + s]
        mask = self._attention_mask(attention_mask, s, start, tokens.device)

        x = self.embedding(tokens, position_ids, start)
        if self.cfg.checkpoint_activations and self.training and cache is None:
            step = self.cfg.checkpoint_num_layers
            for first in range(0, len(self.blocks), step):
                x = self.activation_checkpoint(layer_run(self.blocks[first:first + step], position_ids, mask), x)
        else:
            for block in self.blocks:
                x = block(x, position_ids, mask, cache)
        if cache is not None:
            cache.advance(s)
        return self.head(self.final_norm(x))

    @staticmethod
    def _attention_mask(
        attention_mask: torch.Tensor | None, q_len: int, start: int, device: torch.device
    ) -> Visibility | None:
        """What every layer's attention needs to know of the batch (causal order, padding), or None when
        attention starts at the first position without padding, or is a single query on an unpadded cache."""
        if attention_mask is None and (start == 0 or q_len == 1):
            return None
        return Visibility.build(attention_mask, q_len, start, device)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        return causal_lm_loss(logits, labels, loss_mask, self.cfg.fp16_lm_cross_entropy)

    def new_cache(self, max_length: int) -> KVCache:
        return KVCache(max_length)


def _say_flash_fallback() -> None:
    global _flash_fallback_said
    if not _flash_fallback_said:
        _flash_fallback_said = True
        if os.environ.get("RANK", "0") != "0":
            return  # every rank falls back alike; rank 0 says it for the job
        _log.warning("attention_config 'flash': no flash-attention kernel on the CPU; those layers run SDPA's math "
                     "kernel (the same exact causal attention)")


def layer_run(blocks: nn.ModuleList, position_ids: torch.Tensor | None, mask: Visibility | None):
    """The layers `blocks` as one function of the hidden states, the unit activation checkpointing recomputes (its
    only argument is the tensor a checkpoint saves, which DeepSpeed may partition or move to the CPU)."""
    def run(x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            x = block(x, position_ids, mask)
        return x
    return run


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
                   half_precision: bool = False) -> torch.Tensor:
    """Mean cross entropy in fp32 over the unmasked positions.

    labels are already shifted (labels[:, i] is the token after tokens[:, i]), as the data loader
    yields them; loss_mask has the labels' shape, 1 where the loss counts. half_precision
    (fp16_lm_cross_entropy): the per-token losses in the logits' dtype, then the same fp32 mean.
    """
    per_token = half_token_cross_entropy if half_precision else token_cross_entropy
    losses = per_token(logits.flatten(0, -2), labels.flatten()).float()
    if loss_mask is None:
        return losses.mean()
    weights = loss_mask.flatten().to(losses.dtype)
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)

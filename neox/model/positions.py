"""Position encodings: rotary tables, ALiBi slopes, T5 relative position bias, sinusoidal embeddings."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RotaryTable:
    """cos/sin of the rotary angles, built once per (device, dtype) and grown on demand.

    Convention: the NeoX / Llama "rotate half" layout (pairs are dims i and i + ndims/2), the same as
    Hugging Face GPTNeoX and Llama, so their weights load unchanged. Not an nn.Module: it holds no
    state worth saving, and every block shares one table.
    """

    def __init__(self, ndims: int, base: float, initial_length: int):
        self.ndims = ndims
        self.base = base
        self.initial_length = initial_length
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < length:
            size = max(length, self.initial_length, 2 * table[0].shape[0] if table is not None else 0)
            # Angles in fp32 whatever the model dtype: bf16 positions lose integers above 256.
            exponents = torch.arange(0, self.ndims, 2, device=device, dtype=torch.float32) / self.ndims
            inv_freq = 1.0 / (self.base**exponents)
            angles = torch.outer(torch.arange(size, device=device, dtype=torch.float32), inv_freq)
            table = (angles.cos().to(dtype), angles.sin().to(dtype))
            self._tables[key] = table
        return table

    def lookup(
        self, position_ids: torch.Tensor | None, start: int, length: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of each rotary pair: [1, length, ndims // 2], or [batch, length, ndims // 2] for position_ids.

        Pair i rotates dims i and i + ndims // 2 of a head (see neox.model.heads).
        position_ids None means positions start .. start + length - 1 for every row (a slice, no gather).
        """
        if position_ids is None:
            cos, sin = self._table(start + length, device, dtype)
            return cos[None, start : start + length], sin[None, start : start + length]
        cos, sin = self._table(int(position_ids.max()) + 1, device, dtype)
        return cos[position_ids], sin[position_ids]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes: a geometric sequence 2^(-8/n), for n the nearest power of two; the heads
    beyond that power take the odd terms of the sequence for 2n (Press et al., 2022)."""
    def geometric(n: int) -> list[float]:
        first = 2.0 ** (-8.0 / n)
        return [first ** (i + 1) for i in range(n)]

    power = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(power)
    if power < num_heads:
        slopes += geometric(2 * power)[0::2][: num_heads - power]
    return torch.tensor(slopes, dtype=torch.float32)


def rotary_inv_freq(ndims: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """1 / base^(2i / ndims) for each rotary pair i, in fp32 (gpt-neox's RotaryEmbedding.inv_freq)."""
    return 1.0 / (base ** (torch.arange(0, ndims, 2, dtype=torch.float32, device=device) / ndims))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ndims: int) -> torch.Tensor:
    """x [b, heads, s, d] with its first ndims rotated ("rotate half", as neox.model.heads); cos/sin from
    RotaryTable.lookup, [1|b, s, ndims // 2]."""
    half = ndims // 2
    c, s = cos[:, None], sin[:, None]
    x1, x2 = x[..., :half], x[..., half:ndims]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, x[..., ndims:]), dim=-1)


def sinusoidal_embedding(positions: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """gpt-neox's SinusoidalPositionalEmbedding: [sin(p f_0) .. sin(p f_{dim/2-1}), cos(p f_0) .. ] with
    f_i = 10000^(-2i / dim), computed in fp32: positions [1|b, s] -> [1|b, s, dim]."""
    inv_freq = rotary_inv_freq(dim, 10000.0, positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return torch.cat((angles.sin(), angles.cos()), dim=-1).to(dtype)


def t5_relative_buckets(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Causal T5 buckets of key index - query index: distances 0 .. num_buckets/2 - 1 get their own bucket, longer
    ones logarithmically spaced buckets up to max_distance, beyond it the last (future keys count as distance 0)."""
    distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    spread = (torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
              * (num_buckets - exact)).long()
    return torch.where(distance < exact, distance, (exact + spread).clamp(max=num_buckets - 1))


class RelativePositionBias(nn.Module):
    """T5 relative position bias, gpt-neox's ParallelRelativePositionBias: a table [num_buckets, heads], initialised
    xavier-normal, looked up per (query, key) bucket and scaled by sqrt(head_dim), added to the attention scores.
    One module serves every layer (gpt-neox hands the same one to each)."""

    own_init = "xavier_normal"  # neox/model/init.py draws it so (as gpt-neox), not by the configured init_method

    def __init__(self, num_buckets: int, max_distance: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.scale = math.sqrt(head_dim)
        self.weight = nn.Parameter(torch.empty(num_buckets, num_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.weight)

    def head_table(self) -> torch.Tensor:
        """[num_buckets, heads] of the heads this module serves (a tensor-parallel rank overrides it)."""
        return self.weight

    def forward(self, q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
        """Cache indices of queries [q] and keys [k] -> bias [1, heads, q, k]."""
        buckets = t5_relative_buckets(k_index[None, :] - q_index[:, None], self.num_buckets, self.max_distance)
        return F.embedding(buckets, self.head_table()).permute(2, 0, 1)[None] * self.scale

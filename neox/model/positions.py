"""Position encodings that live inside attention: rotary tables and ALiBi slopes."""
from __future__ import annotations

import math

import torch


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

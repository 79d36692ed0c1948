"""Key/value cache for incremental decoding: prefill once, then one token per step."""
from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    """More tokens were fed than the cache was sized for."""


class KVCache:
    """Per-layer keys and values in [batch, kv_heads, max_length, head_dim] buffers.

    Buffers are allocated on first use with the dtype/device of the keys. `length` counts the
    positions already stored; the model advances it once per forward, after every layer wrote.
    Layers are told apart by the order of their update calls within a forward (the n-th call is the
    n-th layer run), so layers that share parameters (num_unique_layers) still get their own slots.
    """

    def __init__(self, max_length: int):
        if max_length <= 0:
            raise ValueError(f"KVCache max_length must be positive, got {max_length}")
        self.max_length = max_length
        self.length = 0
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self._next_layer = 0

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values [b, kv, s, d] for the next layer of this forward; return all it stored."""
        layer = self._next_layer
        end = self.length + keys.shape[2]
        if end > self.max_length:
            raise CacheFullError(
                f"KV cache holds {self.max_length} positions but {end} were requested; create it with a larger "
                "max_length (prompt length + new tokens)"
            )
        if layer not in self._keys:
            b, kv, _, d = keys.shape
            self._keys[layer] = keys.new_empty(b, kv, self.max_length, d)
            self._values[layer] = values.new_empty(b, values.shape[1], self.max_length, values.shape[-1])
        self._keys[layer][:, :, self.length : end] = keys
        self._values[layer][:, :, self.length : end] = values
        self._next_layer += 1
        return self._keys[layer][:, :, :end], self._values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
        self._next_layer = 0

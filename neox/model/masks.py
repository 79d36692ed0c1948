"""Which keys each query sees: causal order and padding for the whole model, plus each layer's own pattern.

Patterns (gpt-neox's attention types), for a query at index i of its sequence and a key at index j <= i:
- global / flash: every key; with sliding_window_width w only j >= i - w (flash-attn's window_size=(w, 0), w + 1
  keys; Hugging Face Mistral's sliding_window counts the keys, so it equals w + 1);
- local: DeepSpeed's LocalSlidingWindowSparsityConfig (unidirectional): with block size B and W = num_local_blocks
  // 2, key j is seen when j // B >= i // B - W (the own block, causal inside it, and the W blocks before).
Indices count real tokens: left padding shifts a row without moving its pattern, so a padded batch decodes as each
sequence alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pattern:
    window: int | None = None  # sliding window width (keys i - window .. i)
    block: int | None = None  # local block size
    blocks_back: int = 0  # local: blocks before the query's own block

    @property
    def restricts(self) -> bool:
        return self.window is not None or self.block is not None


FULL = Pattern()


class Visibility:
    """Per forward: cache indices (causality, self) and sequence indices (patterns) of the queries and keys, and
    which keys are real tokens. Masks are built once per pattern and shared by the layers using it."""

    def __init__(self, q_index: torch.Tensor, k_index: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                 real: torch.Tensor | None):
        self.q_index, self.k_index = q_index, k_index  # [q], [k] positions in the cache
        self.q_pos, self.k_pos = q_pos, k_pos  # [1|b, q], [1|b, k] indices within each sequence
        self.real = real  # [b, k] bool, or None: no padding
        self._masks: dict[Pattern, torch.Tensor] = {}

    @classmethod
    def build(cls, attention_mask: torch.Tensor | None, q_len: int, start: int,
              device: torch.device) -> "Visibility":
        """attention_mask [b, start + q_len] (1 real, 0 padding) or None."""
        q_index = torch.arange(start, start + q_len, device=device)
        k_index = torch.arange(start + q_len, device=device)
        if attention_mask is None:
            return cls(q_index, k_index, q_index[None], k_index[None], None)
        if attention_mask.shape[1] != start + q_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} positions but the cache holds {start} "
                f"and {q_len} are new: pass the mask for all {start + q_len}"
            )
        k_pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return cls(q_index, k_index, k_pos[:, start:], k_pos, attention_mask.bool())

    def mask(self, pattern: Pattern = FULL) -> torch.Tensor:
        """Boolean [1|b, 1, q, k], True = attend."""
        if pattern not in self._masks:
            seen = self.k_index[None, :] <= self.q_index[:, None]  # [q, k]
            if pattern.restricts:
                q_pos, k_pos = self.q_pos[:, :, None], self.k_pos[:, None, :]  # [1|b, q, 1], [1|b, 1, k]
                if pattern.window is not None:
                    seen = seen & (k_pos >= q_pos - pattern.window)
                if pattern.block is not None:
                    seen = seen & (k_pos // pattern.block >= q_pos // pattern.block - pattern.blocks_back)
            if self.real is not None:
                # A padding query attends to itself so its softmax row is never empty (no NaN).
                itself = self.k_index[None, :] == self.q_index[:, None]
                seen = (seen & self.real[:, None, :]) | itself
            self._masks[pattern] = (seen if seen.dim() == 3 else seen[None])[:, None]
        return self._masks[pattern]

"""The model as evaluation sees it: token ids in, next-token logits over the real vocabulary out.

Everything in neox/eval talks to a `Runner`, never to the model, so a sharded model needs only another
Runner: tensor/pipeline-parallel runners return the same full logits on every rank of their model-parallel
group (gathered over tp, broadcast from the last pipeline stage) and report their data-parallel group,
which is what the requests are divided over. LocalRunner is the single-device one (tp = pp = 1).
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from neox.model import GPTNeoX, KVCache


class Runner(Protocol):
    vocab_size: int  # the tokenizer's; padded rows of the output layer are never scored or sampled
    max_length: int  # the longest input the model reads (its training seq_length)
    device: torch.device
    dp_rank: int
    dp_size: int
    dp_group: Any  # torch.distributed group of the data-parallel ranks (None: the whole world)

    def logits(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """float32 [batch, seq, vocab_size] for int64 tokens [batch, seq]; with a cache, appends to it."""
        ...

    def new_cache(self, max_length: int) -> KVCache: ...


class LocalRunner:
    """A whole GPTNeoX on this rank; every rank is its own data-parallel replica."""

    def __init__(self, model: GPTNeoX, vocab_size: int, *, max_length: int | None = None,
                 device: torch.device | str = "cpu", dp_rank: int = 0, dp_size: int = 1, dp_group: Any = None):
        padded = model.cfg.padded_vocab_size
        if padded is not None and vocab_size > padded:
            raise ValueError(f"tokenizer vocab_size {vocab_size} exceeds the model's padded_vocab_size {padded}: "
                             "the checkpoint was trained with another tokenizer")
        self.model = model.eval()
        self.vocab_size = int(vocab_size)
        self.max_length = int(max_length if max_length is not None else model.cfg.seq_length)
        self.device = torch.device(device)
        self.dp_rank, self.dp_size, self.dp_group = dp_rank, dp_size, dp_group

    @torch.inference_mode()
    def logits(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        tokens = tokens.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        out = self.model(tokens, attention_mask=attention_mask, cache=cache)
        return out[..., : self.vocab_size].float()

    def new_cache(self, max_length: int) -> KVCache:
        return self.model.new_cache(max_length)

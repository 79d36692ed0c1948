"""Character-level perplexity (gpt-neox's `char_level_ppl`): the token loss rescaled to characters.

gpt-neox wraps the evaluation data iterator in a CharCounter that, for every sample it hands out, adds the sample's
token count and the length of its detokenized text, then reports exp(lm_loss x tokens / characters). The same here:
the text of each evaluated sample (seq_length + 1 tokens for packed data; the unpadded text for the whole-document
pack_impl modes, whose padding gpt-neox would count too) is decoded and counted, summed over every rank.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np

__all__ = ["char_level_ppl", "count_tokens_and_chars", "eval_text_counts"]


def count_tokens_and_chars(rows: Iterable[Sequence[int] | np.ndarray],
                           decode: Callable[[Sequence[int]], str]) -> tuple[int, int]:
    """(tokens, characters of their decoded text) summed over token rows."""
    tokens = chars = 0
    for row in rows:
        ids = [int(t) for t in row]
        tokens += len(ids)
        chars += len(decode(ids))
    return tokens, chars


def eval_text_counts(dataset: Any, micro_batches: Iterable[Sequence[int]], decode: Callable[[Sequence[int]], str]
                     ) -> tuple[int, int]:
    """(tokens, characters) of the samples an evaluation reads: ``micro_batches`` are their dataset indices (the
    loader's own sampler), each sample read as text through ``dataset.text_tokens``."""
    return count_tokens_and_chars((dataset.text_tokens(i) for batch in micro_batches for i in batch), decode)


def char_level_ppl(loss: float, tokens: int, chars: int) -> float:
    """exp(loss x tokens / characters); inf when nothing was counted or it overflows."""
    if chars <= 0:
        return float("inf")
    exponent = loss * tokens / chars
    return math.exp(exponent) if exponent < 700 else float("inf")

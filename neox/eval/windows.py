"""Token windows: what the model sees when it scores a continuation, a long document or a dataset sample.

Every scoring job is reduced to one shape, a `Scored` pair (context ids, continuation ids): the model reads
(context + continuation)[:-1], cut from the LEFT to at most max_length tokens, and the log-probabilities of
the continuation tokens are summed. A context longer than the model keeps its last tokens (lm_eval's rule).
A continuation longer than the window (where lm_eval's HF model stops with an assertion) is scored in
pieces of max_length tokens, each with as much preceding text as fits: the rolling rule of
loglikelihood_rolling, of which a rolling document is the case "context = the prefix token".
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from neox.eval.errors import EvalError


@dataclass(frozen=True)
class Scored:
    context: tuple[int, ...]
    continuation: tuple[int, ...]

    def model_input(self, max_length: int) -> tuple[int, ...]:
        """The input ids: (context + continuation) minus its last token, its last max_length ids."""
        if not self.continuation:
            raise EvalError("nothing to score: the continuation encodes to zero tokens")
        if not self.context:
            raise EvalError("a scored continuation needs at least one context token (the prefix / EOD token)")
        if len(self.continuation) > max_length:
            raise EvalError(
                f"a continuation of {len(self.continuation)} tokens does not fit the model's {max_length}-token "
                "window: split it with pieces() first"
            )
        whole = self.context + self.continuation
        return whole[-(max_length + 1) : -1]

    def pieces(self, max_length: int) -> list["Scored"]:
        """Pairs that each fit the window and together predict the continuation once (one pair if it fits)."""
        if max_length < 1:
            raise EvalError(f"max_length must be >= 1, got {max_length}")
        if len(self.continuation) <= max_length:
            return [self]
        whole = self.context + self.continuation
        start = len(self.context)
        out = []
        for first in range(0, len(self.continuation), max_length):
            last = min(first + max_length, len(self.continuation))
            # the context is cut to what the window can hold; model_input would cut it the same way
            out.append(Scored(whole[max(0, start + last - max_length - 1) : start + first],
                              self.continuation[first:last]))
        return out


def pair(context: Sequence[int], continuation: Sequence[int]) -> Scored:
    return Scored(tuple(int(t) for t in context), tuple(int(t) for t in continuation))


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[Scored]:
    """Windows that predict every token of a document exactly once (lm_eval's loglikelihood_rolling).

    The document is read as [prefix_token] + tokens and cut into consecutive chunks of max_length predicted
    tokens; each chunk is scored with as much preceding text as fits, so the last chunk still gets a full
    window of context even when it predicts only a few tokens.
    """
    if not tokens:
        return []
    return pair([prefix_token], tokens).pieces(max_length)


def stream_windows(tokens: Sequence[int], max_length: int) -> list[Scored]:
    """Disjoint windows over one token stream, as training reads it: samples of max_length + 1 tokens that
    overlap by one, so every token after the first is predicted once, with context from its own window only."""
    if max_length < 1:
        raise EvalError(f"max_length must be >= 1, got {max_length}")
    stream = tuple(int(t) for t in tokens)
    return [
        Scored(stream[start : start + 1], stream[start + 1 : start + max_length + 1])
        for start in range(0, len(stream) - 1, max_length)
    ]

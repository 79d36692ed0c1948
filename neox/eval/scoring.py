"""Batched log-likelihood of scored pairs (see windows.py): sum of continuation log-probs, and whether
greedy decoding would have produced the continuation.

Pairs are sorted by input length, longest first, and batched; inputs are right-padded, which a causal
model never attends to, so each pair's numbers do not depend on its batch-mates. Pairs whose model inputs
are identical are computed once.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from neox.eval.errors import EvalError
from neox.eval.runner import Runner
from neox.eval.windows import Scored


@dataclass(frozen=True)
class Score:
    logprob: float
    is_greedy: bool
    num_tokens: int


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first."""
    if batch_size < 1:
        raise EvalError(f"the eval batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def score_pairs(
    runner: Runner, pairs: Sequence[Scored], batch_size: int, progress: Callable[[int], None] | None = None
) -> list[Score]:
    """One Score per pair; a continuation longer than the window is scored in pieces and summed."""
    pieces: list[Scored] = []
    owner: list[int] = []
    for index, scored in enumerate(pairs):
        for piece in scored.pieces(runner.max_length):
            pieces.append(piece)
            owner.append(index)
    if len(pieces) == len(pairs):
        return _score_fitting(runner, pieces, batch_size, progress)
    totals = [Score(0.0, True, 0) for _ in pairs]
    for index, score in zip(owner, _score_fitting(runner, pieces, batch_size, progress)):
        total = totals[index]
        totals[index] = Score(total.logprob + score.logprob, total.is_greedy and score.is_greedy,
                              total.num_tokens + score.num_tokens)
    return totals


def _score_fitting(
    runner: Runner, pairs: Sequence[Scored], batch_size: int, progress: Callable[[int], None] | None
) -> list[Score]:
    # Pairs with the same model input share one row (one-token answers to the same question, repeats).
    readers: dict[tuple[int, ...], list[int]] = {}
    for index, scored in enumerate(pairs):
        readers.setdefault(scored.model_input(runner.max_length), []).append(index)
    inputs = list(readers)
    out: list[Score | None] = [None] * len(pairs)
    for batch in length_batches([len(x) for x in inputs], batch_size):
        width = len(inputs[batch[0]])
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            tokens[row, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
        logits = runner.logits(tokens)
        for row, i in enumerate(batch):
            end = len(inputs[i])
            for index in readers[inputs[i]]:
                continuation = pairs[index].continuation
                n = len(continuation)
                rows = F.log_softmax(logits[row, end - n : end], dim=-1)
                target = torch.tensor(continuation, dtype=torch.long, device=rows.device)
                logprob = rows.gather(1, target[:, None]).sum().item()
                greedy = bool((rows.argmax(dim=-1) == target).all().item())
                out[index] = Score(logprob, greedy, n)
        if progress is not None:
            progress(sum(len(readers[inputs[i]]) for i in batch))
    return out  # type: ignore[return-value]

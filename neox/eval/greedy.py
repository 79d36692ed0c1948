"""Greedy decoding until a stop string, for lm_eval's generate_until.

Prompts are batched by length and left-padded (the model takes positions from the attention mask, so a
padded prompt decodes as it would alone); one prefill fills the KV cache, then one token per step. A row
stops at the end-of-document token, at its token budget, or once its text holds one of its stop strings;
the returned text is cut before the first stop string (lm_eval's rule).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from neox.eval.errors import EvalError
from neox.eval.runner import Runner
from neox.eval.scoring import length_batches


@dataclass(frozen=True)
class GenerationJob:
    context: tuple[int, ...]
    until: tuple[str, ...]
    max_new_tokens: int


def fit_context(context: Sequence[int], max_new_tokens: int, max_length: int, prefix_token: int) -> tuple[int, ...]:
    """The last tokens of the context that leave room for max_new_tokens in the model's window."""
    if not 1 <= max_new_tokens < max_length:
        raise EvalError(
            f"max_gen_toks {max_new_tokens} must be between 1 and the model's seq_length - 1 ({max_length - 1}) "
            "so that some context fits; lower the task's generation_kwargs.max_gen_toks"
        )
    kept = tuple(int(t) for t in context)[-(max_length - max_new_tokens) :]
    return kept if kept else (int(prefix_token),)


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def greedy_until(
    runner: Runner,
    decode: Callable[[Sequence[int]], str],
    eod: int,
    jobs: Sequence[GenerationJob],
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    out: list[str | None] = [None] * len(jobs)
    for batch in length_batches([len(job.context) for job in jobs], batch_size):
        texts = _decode_batch(runner, decode, eod, [jobs[i] for i in batch])
        for i, text in zip(batch, texts):
            out[i] = text
        if progress is not None:
            progress(len(batch))
    return out  # type: ignore[return-value]


@torch.inference_mode()
def _decode_batch(
    runner: Runner, decode: Callable[[Sequence[int]], str], eod: int, jobs: Sequence[GenerationJob]
) -> list[str]:
    width = max(len(job.context) for job in jobs)
    budget = max(job.max_new_tokens for job in jobs)
    tokens = torch.full((len(jobs), width), eod, dtype=torch.long)
    mask = torch.zeros(len(jobs), width, dtype=torch.long)
    for row, job in enumerate(jobs):
        tokens[row, width - len(job.context) :] = torch.tensor(job.context, dtype=torch.long)
        mask[row, width - len(job.context) :] = 1
    cache = runner.new_cache(width + budget)
    logits = runner.logits(tokens, attention_mask=mask, cache=cache)
    generated: list[list[int]] = [[] for _ in jobs]
    done = [False] * len(jobs)
    for step in range(budget):
        next_tokens = logits[:, -1].argmax(dim=-1).cpu()
        for row, job in enumerate(jobs):
            if done[row]:
                continue
            token = int(next_tokens[row])
            if token == eod:
                done[row] = True
                continue
            generated[row].append(token)
            if len(generated[row]) >= job.max_new_tokens or _has_stop(decode(generated[row]), job.until):
                done[row] = True
        if all(done) or step == budget - 1:
            break
        mask = torch.cat([mask, torch.ones(len(jobs), 1, dtype=torch.long)], dim=1)
        logits = runner.logits(next_tokens[:, None], attention_mask=mask, cache=cache)
    return [cut_at_stops(decode(ids), job.until) for ids, job in zip(generated, jobs)]


def _has_stop(text: str, until: Sequence[str]) -> bool:
    return any(stop and stop in text for stop in until)

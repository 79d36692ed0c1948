"""The decoding loop: a batch of prompts (left-padded) -> continuations, with a KV cache or by recomputation.

The model is anything called as model(tokens, position_ids=None, attention_mask=None, cache=None) -> logits
with a new_cache(max_length) method: the single-device GPTNeoX, or a parallel wrapper whose forward returns
the full-vocabulary logits on the rank that samples. Ranks stay in lock-step by adopting the tokens that
rank `sync.source` sampled, so every rank feeds the same tokens and stops at the same step.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from neox.generate.packed import pack_for_decoding
from neox.generate.sampling import SamplingParams, sample_next, seeded_generators

FinishReason = Literal["eod", "stop", "length"]


class GenerationError(ValueError):
    """A prompt or a request that cannot be generated as asked."""


class DecodableModel(Protocol):
    def __call__(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor: ...

    def new_cache(self, max_length: int): ...


class TokenSync:
    """Every rank adopts the tokens (or other per-row values) of rank `source`: one small broadcast per step."""

    def __init__(self, source: int = 0, group=None):
        self.source = source
        self.group = group

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.broadcast(tokens, self.source, group=self.group)
        return tokens


@dataclass
class Continuation:
    tokens: list[int] = field(default_factory=list)  # generated ids, without the EOD that ended them
    finish_reason: FinishReason = "length"
    text: str | None = None  # set when stop strings are checked (cut before the stop string)
    logits: list[float] | None = None  # with return_logits: the raw logit of each generated token


class StopStrings:
    """Ends a sequence once its decoded continuation contains one of `strings`."""

    def __init__(self, strings: Sequence[str], decode: Callable[[list[int]], str]):
        if any(s == "" for s in strings):
            raise GenerationError("stop strings must not be empty")
        self.strings = list(strings)
        self.decode = decode

    def cut(self, tokens: list[int]) -> str | None:
        """The text before the earliest stop string, or None if no stop string occurs yet."""
        text = self.decode(tokens)
        hits = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return text[: min(hits)] if hits else None


@dataclass(frozen=True)
class DecodeRequest:
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    vocab_size: int | None = None  # logits beyond it (embedding padding) are never sampled
    eod: int | None = None  # a sampled EOD ends the sequence; None: never stop on it
    pad: int = 0  # fed for left padding and after a sequence ended; masked out, any id works
    use_cache: bool = True
    max_positions: int | None = None  # longest prompt of the batch + continuation may not exceed it
    return_logits: bool = False
    packed_gemm: bool = True  # decode steps on packed GEMM weights when the model is fp32/bf16 on CPU (packed.py)


def left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, longest] tokens and their [b, longest] 0/1 mask, shorter prompts padded on the left."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            tokens[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, longest - len(prompt):] = 1
    return tokens, mask


@torch.inference_mode()
def decode(
    model: DecodableModel,
    prompts: Sequence[Sequence[int]],
    request: DecodeRequest,
    seeds: Sequence[int] | None = None,
    stop: StopStrings | None = None,
    sync: TokenSync | None = None,
    device: torch.device | str = "cpu",
) -> list[Continuation]:
    """Continue every prompt until EOD, a stop string, max_new_tokens or max_positions.

    seeds[i] seeds the sampling of prompts[i] (unused when greedy). Prompts of different lengths run as
    one left-padded batch: the attention mask hides the padding and positions count real tokens only.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token (unconditional generation starts from EOD)")
    if request.max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
    batch = len(prompts)
    prompt_len = max(len(p) for p in prompts)
    budget = request.max_new_tokens
    if request.max_positions is not None:
        if prompt_len >= request.max_positions:
            raise GenerationError(f"a prompt of {prompt_len} tokens leaves no room to generate within the "
                                  f"model's {request.max_positions} positions; shorten it")
        budget = min(budget, request.max_positions - prompt_len)
    generators = None
    if not request.sampling.greedy:
        if seeds is None or len(seeds) != batch:
            raise GenerationError(f"sampling {batch} prompts needs {batch} seeds")
        generators = seeded_generators(list(seeds), device)

    tokens, prompt_mask = left_pad(prompts, request.pad)
    tokens = tokens.to(device)
    padded = bool((prompt_mask == 0).any())
    # The mask of every position the batch will ever hold, filled in as tokens are generated.
    mask = torch.zeros((batch, prompt_len + budget), dtype=torch.long, device=device)
    mask[:, :prompt_len] = prompt_mask.to(device)
    cache = model.new_cache(prompt_len + budget) if request.use_cache else None
    if request.packed_gemm and request.use_cache and isinstance(model, torch.nn.Module):
        pack_for_decoding(model, batch)

    def next_logits(step_tokens: torch.Tensor, length: int) -> torch.Tensor | None:
        logits = model(step_tokens, attention_mask=mask[:, :length] if padded else None, cache=cache)
        if logits is None:  # a rank without the last pipeline stage: it adopts the sampled tokens
            return None
        logits = logits[:, -1]
        return logits[:, : request.vocab_size] if request.vocab_size is not None else logits

    results = [Continuation(logits=[] if request.return_logits else None) for _ in range(batch)]
    running = torch.ones(batch, dtype=torch.bool)
    sequence = tokens  # the whole batch so far; only the recompute path feeds it all again
    logits = next_logits(tokens, prompt_len)
    for step in range(budget):
        if logits is not None:
            chosen = sample_next(logits, request.sampling, generators).to(device)
        else:
            chosen = torch.zeros(batch, dtype=torch.long, device=device)
        if sync is not None:
            chosen = sync(chosen.contiguous())
        chosen_list = chosen.tolist()
        chosen_logits = None
        if request.return_logits:
            values = (logits.gather(1, chosen.view(batch, 1)).flatten().float() if logits is not None
                      else torch.zeros(batch, dtype=torch.float32, device=device))
            chosen_logits = (sync(values.contiguous()) if sync is not None else values).tolist()
        for row in running.nonzero().flatten().tolist():
            token = chosen_list[row]
            if request.eod is not None and token == request.eod:
                results[row].finish_reason = "eod"
                running[row] = False
                continue
            results[row].tokens.append(token)
            if chosen_logits is not None:
                results[row].logits.append(chosen_logits[row])
            if stop is not None:
                cut = stop.cut(results[row].tokens)
                if cut is not None:
                    results[row].text, results[row].finish_reason = cut, "stop"
                    running[row] = False
        if not running.any() or step == budget - 1:
            break
        # Ended rows keep decoding (their tokens are discarded): the batch shape stays fixed for the cache.
        length = prompt_len + step + 1
        mask[:, length - 1] = 1
        step_tokens = chosen.view(batch, 1).to(device)
        if cache is None:
            sequence = torch.cat((sequence, step_tokens), dim=1)
            logits = next_logits(sequence, length)
        else:
            logits = next_logits(step_tokens, length)
    return results


def timed_decode(*args, **kwargs) -> tuple[list[Continuation], float]:
    start = time.perf_counter()
    results = decode(*args, **kwargs)
    return results, time.perf_counter() - start

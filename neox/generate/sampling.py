"""Choosing the next token from logits: greedy, temperature, top-k, top-p (gpt-neox semantics).

Each sequence draws from its own seeded generator, so a sample depends only on (seed, its index) and
not on which other prompts shared its batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class SamplingError(ValueError):
    """Sampling parameters out of range."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy, as in gpt-neox
    top_k: int = 0  # 0 disables
    top_p: float = 0.0  # 0 disables

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in [0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set to -inf every logit outside the top k, then outside the nucleus of mass top_p.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p; the most
    likely token is always kept. logits: [batch, vocab]; returns a new tensor.
    """
    logits = logits.clone()
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (so the first one always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits.masked_fill_(drop, float("-inf"))
    return logits


def seeded_generators(seeds: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    generators = []
    for seed in seeds:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        generators.append(generator)
    return generators


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """Next token per row of logits [batch, vocab] (already cut to the real vocabulary) -> [batch] int64.

    Sampling draws row i from generators[i]; greedy needs no generator.
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    if generators is None or len(generators) != logits.shape[0]:
        raise SamplingError(f"sampling {logits.shape[0]} rows needs one generator per row")
    scaled = logits.float()
    if params.temperature != 1.0:
        scaled = scaled / params.temperature
    probs = filter_logits(scaled, params.top_k, params.top_p).softmax(dim=-1)
    return torch.cat([torch.multinomial(row, 1, generator=gen) for row, gen in zip(probs, generators)])

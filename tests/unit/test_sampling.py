"""Next-token rules: greedy, temperature, top-k, top-p (against hand-computed sets and empirical frequencies)."""
from __future__ import annotations

import math

import pytest
import torch

from neox.generate.sampling import SamplingError, SamplingParams, filter_logits, sample_next, seeded_generators


def _logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])


def test_top_k_keeps_exactly_the_k_largest() -> None:
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 1.0], [9.0, 8.0, 7.0, 6.0, 5.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    assert torch.equal(filter_logits(logits, top_k=0), logits)
    assert torch.equal(filter_logits(logits, top_k=99), logits)


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.45, [True, False, False, False]),  # 0.5 alone reaches 0.45
        (0.7, [True, True, False, False]),  # 0.5 < 0.7 <= 0.8
        (0.9, [True, True, True, False]),  # 0.8 < 0.9 <= 0.95
        (0.99, [True, True, True, True]),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_the_mass(top_p: float, expected: list[bool]) -> None:
    # Shuffled order: the nucleus is found by probability, not by position.
    probs = [0.15, 0.5, 0.05, 0.3]
    order = [1, 3, 0, 2]  # positions by decreasing probability
    kept = filter_logits(_logits_of(probs), top_p=top_p).isfinite()[0].tolist()
    assert [kept[i] for i in order] == expected


def test_top_k_then_top_p_and_the_most_likely_token_always_survives() -> None:
    logits = _logits_of([0.4, 0.3, 0.2, 0.1])
    kept = filter_logits(logits, top_k=3, top_p=0.6).isfinite()[0].tolist()
    # top-3 renormalised: 0.444, 0.333, 0.222 -> the nucleus of 0.6 is the first two
    assert kept == [True, True, False, False]
    assert filter_logits(logits, top_p=1e-6).isfinite()[0].tolist() == [True, False, False, False]


def test_greedy_is_argmax_and_needs_no_generator() -> None:
    logits = torch.tensor([[0.1, 2.0, 1.0], [5.0, -1.0, 4.9]])
    assert sample_next(logits, SamplingParams(temperature=0.0)).tolist() == [1, 0]


def test_sampling_follows_the_tempered_filtered_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    params = SamplingParams(temperature=0.7, top_k=3)
    draws = 6000
    generators = seeded_generators([11])
    counts = torch.zeros(5)
    batch = logits.expand(1, -1)
    for _ in range(draws):
        counts[sample_next(batch, params, generators)[0]] += 1
    expected = torch.zeros(5)
    top3 = torch.tensor([0, 1, 4])
    expected[top3] = torch.softmax(logits[top3] / 0.7, dim=0)
    assert counts[2] == 0 and counts[3] == 0
    assert torch.allclose(counts / draws, expected, atol=0.025), (counts / draws, expected)


def test_each_row_draws_from_its_own_seed() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0)

    def run(seeds: list[int], rows: torch.Tensor) -> list[list[int]]:
        gens = seeded_generators(seeds)
        return torch.stack([sample_next(rows, params, gens) for _ in range(20)], dim=1).tolist()

    together = run([1, 2, 3], logits)
    assert together == run([1, 2, 3], logits)  # reproducible
    assert run([2], logits[1:2]) == [together[1]]  # row 1 alone draws the same as inside the batch
    assert run([9, 2, 3], logits)[0] != together[0]  # another seed, another stream


def test_sampling_without_enough_generators_is_an_error() -> None:
    with pytest.raises(SamplingError, match="one generator per row"):
        sample_next(torch.zeros(2, 4), SamplingParams(temperature=1.0), seeded_generators([1]))


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_k=-1), dict(top_p=1.5), dict(top_p=-0.1)])
def test_out_of_range_parameters_are_refused(kwargs: dict) -> None:
    with pytest.raises(SamplingError):
        SamplingParams(**kwargs)

"""Divide a list of jobs over the data-parallel ranks and give every rank all the results.

Jobs are dealt out longest first, round robin, so each rank gets a similar amount of work; every rank
of a data-parallel group must call `run_sharded` with the same jobs in the same order (they all run the
same lm_eval flow, which guarantees it). Results travel with torch.distributed.all_gather_object (gloo
on CPU), so they must pickle.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

Job = TypeVar("Job")
Result = TypeVar("Result")


def deal(costs: Sequence[int], num_shards: int) -> list[list[int]]:
    """Job indices per shard: sorted by cost, largest first, dealt round robin (each shard sorted back)."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    return [sorted(order[shard::num_shards]) for shard in range(num_shards)]


def run_sharded(
    jobs: Sequence[Job],
    costs: Sequence[int],
    work: Callable[[list[Job]], list[Result]],
    *,
    dp_rank: int,
    dp_size: int,
    group: Any = None,
) -> list[Result]:
    """work() on this rank's share of jobs; returns every job's result, in the order of `jobs`."""
    if dp_size == 1:
        return work(list(jobs))
    mine = deal(costs, dp_size)[dp_rank]
    results = work([jobs[i] for i in mine])
    if len(results) != len(mine):
        raise RuntimeError(f"rank {dp_rank}: {len(results)} results for {len(mine)} jobs")
    gathered: list[Any] = [None] * dp_size
    torch.distributed.all_gather_object(gathered, (mine, results), group=group)
    out: list[Any] = [None] * len(jobs)
    for indices, values in gathered:
        for i, value in zip(indices, values):
            out[i] = value
    return out

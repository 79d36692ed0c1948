"""Token windows, length batching, request sharding and the eval CLI folding (no model)."""
from __future__ import annotations

import os

import pytest
import torch
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from neox.eval.cli import fold_eval_overrides
from neox.eval.errors import EvalError
from neox.eval.greedy import cut_at_stops, fit_context
from neox.eval.scoring import length_batches
from neox.eval.sharding import deal, run_sharded
from neox.eval.windows import pair, rolling_windows, stream_windows
from neox.parallel.testing import run_distributed


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 8, 9, 17])
@pytest.mark.parametrize("max_length", [1, 2, 4, 5])
def test_rolling_windows_match_lm_eval(length: int, max_length: int) -> None:
    tokens = list(range(100, 100 + length))
    reference = [make_disjoint_window(w) for w in
                 get_rolling_token_windows(token_list=tokens, prefix_token=7, max_seq_len=max_length, context_len=1)]
    ours = rolling_windows(tokens, 7, max_length)
    assert [w.continuation for w in ours] == [tuple(b) for _, b in reference]
    # what the model reads: (context + continuation)[:-1], its last max_length tokens
    assert [w.model_input(max_length) for w in ours] == [
        tuple((list(a) + list(b))[-(max_length + 1):][:-1]) for a, b in reference]
    predicted = [t for w in ours for t in w.continuation]
    assert predicted == tokens  # every token exactly once


def test_long_context_is_cut_from_the_left_and_long_continuation_is_an_error() -> None:
    scored = pair(range(10), [20, 21, 22])
    assert scored.model_input(5) == (7, 8, 9, 20, 21)
    assert scored.model_input(100) == (*range(10), 20, 21)
    with pytest.raises(EvalError, match="3 tokens does not fit the model.s 2-token window: split it"):
        scored.model_input(2)
    with pytest.raises(EvalError, match="zero tokens"):
        pair([1], []).model_input(4)


def test_stream_windows_predict_every_token_after_the_first_once() -> None:
    stream = list(range(11))
    windows = stream_windows(stream, 4)
    assert [w.context for w in windows] == [(0,), (4,), (8,)]
    assert [w.continuation for w in windows] == [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10)]


def test_length_batches_longest_first() -> None:
    assert length_batches([3, 9, 1, 9, 5], 2) == [[1, 3], [4, 0], [2]]
    with pytest.raises(EvalError):
        length_batches([1], 0)


def test_deal_balances_and_covers_every_job() -> None:
    costs = [5, 1, 9, 3, 7, 2, 8]
    shards = deal(costs, 3)
    assert sorted(i for s in shards for i in s) == list(range(len(costs)))
    assert [sorted(costs[i] for i in s) for s in shards] == [[1, 5, 9], [3, 8], [2, 7]]  # 9 8 7 | 5 3 2 | 1 dealt in turn
    assert deal([4], 2) == [[0], []]


def _sharded_squares(jobs: list[int]) -> tuple[list[int], list[int]]:
    rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    seen: list[int] = []

    def work(mine: list[int]) -> list[int]:
        seen.extend(mine)
        return [j * j for j in mine]

    return run_sharded(jobs, jobs, work, dp_rank=rank, dp_size=size), seen


def test_run_sharded_on_two_gloo_ranks_gives_every_rank_all_results() -> None:
    jobs = [3, 1, 4, 1, 5, 9, 2]
    (all0, seen0), (all1, seen1) = run_distributed(_sharded_squares, 2, jobs)
    assert all0 == all1 == [j * j for j in jobs]
    assert sorted(seen0 + seen1) == sorted(jobs) and seen0 and seen1


def test_generation_context_fits_and_stops_cut() -> None:
    assert fit_context(range(10), 4, 8, prefix_token=0) == (6, 7, 8, 9)
    assert fit_context([], 4, 8, prefix_token=5) == (5,)
    with pytest.raises(EvalError, match="max_gen_toks 8"):
        fit_context([1], 8, 8, prefix_token=0)
    assert cut_at_stops("a cat. And\nmore", ["\n", "."]) == "a cat"
    assert cut_at_stops("no stop", ["\n\n"]) == "no stop"


def test_fold_eval_overrides() -> None:
    folded = fold_eval_overrides(["--eval_tasks", "piqa", "arc_easy", "perplexity", "--eval_limit", "5",
                                  "--include_path", "my_tasks", "--tasks=piqa,arc_easy", "--eval-batch-size", "4",
                                  "--eval_perplexity_files", "a.jsonl", "b.txt"])
    assert folded == ["--eval_tasks", '["piqa", "arc_easy", "perplexity"]', "--eval_limit", "5",
                      "--eval_tasks_path", f'["{os.path.abspath("my_tasks")}"]',
                      "--eval_tasks", '["piqa", "arc_easy"]', "--eval_batch_size", "4",
                      "--eval_perplexity_files", f'["{os.path.abspath("a.jsonl")}", "{os.path.abspath("b.txt")}"]']
    assert fold_eval_overrides(["--eval_tasks", "[piqa, arc_easy]"]) == ["--eval_tasks", "[piqa, arc_easy]"]


def test_a_continuation_longer_than_the_window_is_scored_in_rolling_pieces() -> None:
    context, continuation = list(range(50, 53)), list(range(10))
    pieces = pair(context, continuation).pieces(4)
    assert [p.continuation for p in pieces] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    # each piece reads the 4 tokens before its last prediction (the last piece gets a full window)
    assert [p.model_input(4) for p in pieces] == [(52, 0, 1, 2), (3, 4, 5, 6), (5, 6, 7, 8)]
    assert pair(context, continuation[:4]).pieces(4) == [pair(context, continuation[:4])]


class _CountingRunner:
    """A fake model: logits depend on the last input token only; counts the rows it is asked for."""
    vocab_size, max_length, device, dp_rank, dp_size, dp_group = 5, 8, torch.device("cpu"), 0, 1, None

    def __init__(self) -> None:
        self.rows = 0

    def logits(self, tokens, attention_mask=None, cache=None):
        self.rows += tokens.shape[0]
        return torch.nn.functional.one_hot(tokens % 5, 5).float() * 3.0


def test_pairs_with_the_same_input_share_one_row() -> None:
    from neox.eval.scoring import score_pairs

    runner = _CountingRunner()
    # the same question with one-token answers 3 and 4, a repeat, and a different pair
    pairs = [pair([1, 2], [3]), pair([1, 2], [4]), pair([1, 2], [3]), pair([2], [2, 2])]
    scores = score_pairs(runner, pairs, batch_size=2)
    assert runner.rows == 2  # inputs (1, 2) and (2, 2)
    log_p = torch.log_softmax(torch.tensor([0.0, 0, 0, 0, 0]).index_fill(0, torch.tensor([2]), 3.0), 0)
    assert scores[0].logprob == pytest.approx(log_p[3].item()) == scores[2].logprob
    assert scores[1].logprob == pytest.approx(log_p[4].item())
    assert [s.is_greedy for s in scores] == [False, False, False, True]
    assert scores[3].num_tokens == 2

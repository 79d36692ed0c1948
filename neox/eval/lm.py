"""NeoXLM: lm-evaluation-harness's LM interface over a Runner (the launched model, any layout).

lm_eval runs the same flow on every rank and each rank's NeoXLM gets every request; the model calls are
divided over the data-parallel ranks (sharding.py) and every rank gets all the answers back, so lm_eval's
metrics come out the same everywhere and rank 0 writes them. Tokenisation follows lm_eval's TemplateLM
(context/continuation split, trailing spaces moved to the continuation, EOD as the context of an empty one).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from neox.eval.errors import EvalError
from neox.eval.greedy import GenerationJob, fit_context, greedy_until
from neox.eval.runner import Runner
from neox.eval.scoring import Score, score_pairs
from neox.eval.sharding import run_sharded
from neox.eval.windows import Scored, pair, rolling_windows
from neox.tokenizer import Tokenizer

DEFAULT_MAX_GEN_TOKS = 256


class NeoXLM(TemplateLM):
    def __init__(self, runner: Runner, tokenizer: Tokenizer, batch_size: int = 8, *, show_progress: bool = True,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS):
        super().__init__()
        if batch_size < 1:
            raise EvalError(f"'eval_batch_size' must be >= 1, got {batch_size}")
        self.runner = runner
        self.neox_tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.show_progress = show_progress
        self._device = runner.device

    # --- what TemplateLM needs
    @property
    def eot_token_id(self) -> int:
        return self.neox_tokenizer.eod

    @property
    def max_length(self) -> int:
        return self.runner.max_length

    @property
    def tokenizer_name(self) -> str:
        return self.neox_tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.neox_tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.neox_tokenizer.decode(list(tokens))

    # --- the three request types
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = [pair(context, continuation) for _, context, continuation in requests]
        scores = self._score(pairs, "loglikelihood", disable_tqdm)
        answers = [(s.logprob, s.is_greedy) for s in scores]
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows: list[Scored] = []
        owner: list[int] = []
        for index, request in enumerate(requests):
            (text,) = request.args
            for window in rolling_windows(self.tok_encode(text), self.prefix_token_id, self.max_length):
                windows.append(window)
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, score in zip(owner, self._score(windows, "loglikelihood_rolling", disable_tqdm)):
            totals[index] += score.logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        jobs = [self._generation_job(*request.args) for request in requests]
        with self._progress(len(jobs), "generate_until", disable_tqdm) as bar:
            texts = run_sharded(
                jobs, [len(j.context) + j.max_new_tokens for j in jobs],
                lambda mine: greedy_until(self.runner, self.tok_decode, self.eot_token_id, mine, self.batch_size,
                                          self._bar_update(bar)),
                dp_rank=self.runner.dp_rank, dp_size=self.runner.dp_size, group=self.runner.dp_group,
            )
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    # --- helpers
    def _generation_job(self, context: str, gen_kwargs: dict[str, Any]) -> GenerationJob:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
            raise EvalError(
                f"generate_until asks for sampling ({gen_kwargs}); evaluation decodes greedily: set the task's "
                "generation_kwargs do_sample: false / temperature: 0 (use `deepy.py generate` for sampling)"
            )
        context_ids = fit_context(self.tok_encode(context), max_new, self.max_length, self.prefix_token_id)
        return GenerationJob(context_ids, tuple(str(u) for u in until), max_new)

    def _score(self, pairs: list[Scored], what: str, disable_tqdm: bool) -> list[Score]:
        with self._progress(len(pairs), what, disable_tqdm) as bar:
            return run_sharded(
                pairs, [len(p.context) + len(p.continuation) for p in pairs],
                lambda mine: score_pairs(self.runner, mine, self.batch_size, self._bar_update(bar)),
                dp_rank=self.runner.dp_rank, dp_size=self.runner.dp_size, group=self.runner.dp_group,
            )

    def _progress(self, total: int, what: str, disable_tqdm: bool) -> tqdm:
        # Each rank counts its own share; only the first rank shows it.
        shown = self.show_progress and not disable_tqdm and self.runner.dp_rank == 0
        return tqdm(total=total // max(self.runner.dp_size, 1), desc=f"neox {what}", disable=not shown)

    @staticmethod
    def _bar_update(bar: tqdm) -> Callable[[int], None]:
        return bar.update

"""Evaluation keys (gpt-neox names); read by the eval entrypoint (lm-evaluation-harness)."""
from __future__ import annotations

from dataclasses import dataclass

from neox.config.errors import ConfigError
from neox.config.fields import option


@dataclass
class EvalConfig:
    eval_tasks: list[str] | None = option(None, "lm-evaluation-harness task names, e.g. [piqa, arc_easy].")
    eval_results_prefix: str = option("", "Prefix of the results file {prefix}_eval_results_<date>.json.")
    eval_limit: int | None = option(None, "Evaluate at most this many examples per task (quick checks).")
    num_fewshot: int = option(0, "Few-shot examples prepended to each prompt.")

    def validate(self) -> None:
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"'eval_limit' must be >= 1, got {self.eval_limit}")
        if self.num_fewshot < 0:
            raise ConfigError(f"'num_fewshot' must be >= 0, got {self.num_fewshot}")

"""Evaluation keys (gpt-neox names where gpt-neox has them); read by the eval entrypoint (lm-evaluation-harness)."""
from __future__ import annotations

from dataclasses import dataclass

from neox.config.errors import ConfigError
from neox.config.fields import option

PERPLEXITY_SPLITS = ("valid", "test")


@dataclass
class EvalConfig:
    eval_tasks: list[str] | None = option(
        None, "lm-evaluation-harness task names, e.g. [piqa, arc_easy]; 'perplexity' scores the data splits and files."
    )
    eval_tasks_path: list[str] | None = option(
        None, "Extra lm_eval task folders (lm_eval's --include_path); a task there replaces one of the same name."
    )
    eval_results_prefix: str = option("", "Prefix of the results file {prefix}_eval_results_<date>.json.")
    eval_limit: int | None = option(
        None, "Evaluate at most this many examples per task (perplexity: windows per source) for quick checks."
    )
    num_fewshot: int = option(0, "Few-shot examples prepended to each prompt.")
    eval_batch_size: int = option(8, "Sequences per forward pass of each rank during evaluation.")
    eval_iteration: int | None = option(
        None, "Checkpoint iteration to evaluate (global_step{N} under 'load'); None: the latest complete one."
    )
    eval_perplexity_splits: list[str] = option(
        list(PERPLEXITY_SPLITS), "Splits of the config's data that the 'perplexity' task scores (valid, test)."
    )
    eval_perplexity_files: list[str] | None = option(
        None, "Text files (jsonl 'text' field, txt, ...; anything preprocess_data reads) 'perplexity' also scores."
    )

    def validate(self) -> None:
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"'eval_limit' must be >= 1, got {self.eval_limit}")
        if self.num_fewshot < 0:
            raise ConfigError(f"'num_fewshot' must be >= 0, got {self.num_fewshot}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"'eval_batch_size' must be >= 1, got {self.eval_batch_size}")
        if self.eval_iteration is not None and self.eval_iteration < 0:
            raise ConfigError(f"'eval_iteration' must be >= 0, got {self.eval_iteration}")
        unknown = sorted(set(self.eval_perplexity_splits) - set(PERPLEXITY_SPLITS))
        if unknown:
            raise ConfigError(f"'eval_perplexity_splits' takes {list(PERPLEXITY_SPLITS)}, got {unknown}")

"""The per-rank evaluation program: `python -m neox.eval --config RESOLVED.yml` (started by `deepy eval`).

resolved config -> runtime -> the checkpoint at `load` (model + its tokenizer) -> a Runner -> lm_eval tasks
through NeoXLM and/or the 'perplexity' task -> rank 0 prints the tables and writes the results JSON.
Every rank runs the same lm_eval flow; the model calls are divided over the data-parallel ranks.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neox.config.neox_config import NeoXConfig
from neox.config.resolved import to_dict
from neox.entrypoint import RankProgram, run_rank_program
from neox.eval.errors import EvalError
from neox.eval.lm import NeoXLM
from neox.eval.perplexity import PERPLEXITY_TASK, Perplexity, run_perplexity
from neox.eval.results import lm_eval_tables, perplexity_table, results_path, write_results
from neox.eval.runner import LocalRunner, Runner
from neox.eval.task_index import check_task_names, task_manager
from neox.parallel.runtime import Runtime
from neox.tokenizer import Tokenizer

_STEP_DIR = re.compile(r"^global_step(\d+)$")


@dataclass
class EvalOutcome:
    checkpoint: Path
    iteration: int | None
    lm_eval: dict[str, Any] | None = None  # lm_eval's results dict (rank 0), None without lm_eval tasks
    perplexity: list[Perplexity] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    results_file: Path | None = None


def checkpoint_iteration(checkpoint_dir: Path) -> int | None:
    """N of a global_stepN directory, or the iteration a consolidated model's marker records."""
    step = _STEP_DIR.match(checkpoint_dir.name)
    if step:
        return int(step.group(1))
    try:
        marker = json.loads((checkpoint_dir / "complete.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    iteration = marker.get("iteration") if isinstance(marker, dict) else None
    return iteration if isinstance(iteration, int) else None


def load_runner(cfg: NeoXConfig, runtime: Runtime) -> tuple[Runner, NeoXConfig, Tokenizer, Path]:
    """The checkpoint at `load` (any training layout: it is consolidated) as the Runner of this launch's layout:
    whole on every rank unless the launch is model-parallel, else sharded tp x pp ways as training would cut it."""
    from neox.checkpoint import find_checkpoint, load_model

    if cfg.train.load is None:
        raise EvalError("eval needs 'load': the checkpoint directory to evaluate (e.g. --load runs/demo/checkpoints)")
    checkpoint_dir = find_checkpoint(cfg.train.load, cfg.eval.eval_iteration)
    model, ckpt_cfg, tokenizer = load_model(checkpoint_dir, device=runtime.device, dtype=torch.float32)
    par = cfg.parallel
    if par.is_model_parallel:
        from neox.eval.parallel_runner import ShardedRunner
        from neox.parallel.topology import build_topology

        runner: Runner = ShardedRunner(model, build_topology(par.model_parallel_size, par.pipe_parallel_size),
                                       tokenizer.vocab_size, partition_method=par.pipe_partition_method,
                                       max_length=ckpt_cfg.model.seq_length, device=runtime.device)
    else:
        runner = LocalRunner(model, tokenizer.vocab_size, max_length=ckpt_cfg.model.seq_length,
                             device=runtime.device, dp_rank=runtime.rank, dp_size=runtime.world_size)
    return runner, ckpt_cfg, tokenizer, checkpoint_dir


def evaluate(cfg: NeoXConfig, runner: Runner, tokenizer: Tokenizer, *, show_progress: bool = True
             ) -> tuple[dict[str, Any] | None, list[Perplexity], list[str]]:
    """Run the configured tasks; lm_eval's results come back on the first local rank only (lm_eval's rule)."""
    settings = cfg.eval
    names = list(settings.eval_tasks or [])
    if not names:
        raise EvalError("no 'eval_tasks': pass e.g. --eval_tasks piqa arc_easy perplexity")
    lm_names = [n for n in names if n != PERPLEXITY_TASK]
    lm_results = None
    if lm_names:
        manager = task_manager(settings.eval_tasks_path, lm_names)
        check_task_names(manager, lm_names, settings.eval_tasks_path)
        lm_results = _simple_evaluate(cfg, NeoXLM(runner, tokenizer, settings.eval_batch_size,
                                                  show_progress=show_progress), manager, lm_names)
    perplexity, notes = run_perplexity(runner, cfg, tokenizer) if PERPLEXITY_TASK in names else ([], [])
    return lm_results, perplexity, notes


def _simple_evaluate(cfg: NeoXConfig, lm: NeoXLM, manager: Any, names: list[str]) -> dict[str, Any] | None:
    from lm_eval import evaluator

    settings = cfg.eval
    try:
        return evaluator.simple_evaluate(
            model=lm, tasks=names, num_fewshot=settings.num_fewshot, limit=settings.eval_limit,
            task_manager=manager, log_samples=False, random_seed=cfg.train.seed, numpy_random_seed=cfg.train.seed,
            torch_random_seed=cfg.train.seed, fewshot_random_seed=cfg.train.seed,
        )
    except (EvalError, torch.OutOfMemoryError):
        raise
    except (KeyError, FileNotFoundError, ConnectionError, OSError, ImportError) as err:
        raise EvalError(f"lm_eval could not load or prepare the tasks {names}: {type(err).__name__}: {err}. "
                        "Offline, only tasks whose data is on this machine load (piqa and arc_easy ship with "
                        "neox; add folders with --eval_tasks_path)") from None


def run(cfg: NeoXConfig, runtime: Runtime) -> EvalOutcome:
    if runtime.rank != 0:  # one copy of lm_eval's logging (and of its per-task warnings) is enough
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    runner, _, tokenizer, checkpoint_dir = load_runner(cfg, runtime)
    lm_results, perplexity, notes = evaluate(cfg, runner, tokenizer, show_progress=runtime.rank == 0)
    outcome = EvalOutcome(checkpoint_dir, checkpoint_iteration(checkpoint_dir), lm_results, perplexity, notes)
    if runtime.rank == 0:
        outcome.results_file = report(cfg, outcome)
    return outcome


def report(cfg: NeoXConfig, outcome: EvalOutcome) -> Path:
    document: dict[str, Any] = dict(outcome.lm_eval or {})
    document["neox"] = {
        "checkpoint": str(outcome.checkpoint),
        "iteration": outcome.iteration,
        "eval_tasks": list(cfg.eval.eval_tasks or []),
        "config": to_dict(cfg),
    }
    if outcome.perplexity or PERPLEXITY_TASK in (cfg.eval.eval_tasks or []):
        document["perplexity"] = [p.as_dict() for p in outcome.perplexity]
        document["perplexity_notes"] = outcome.notes
    directory = cfg.log.log_dir if cfg.log.log_dir is not None else str(outcome.checkpoint)
    path = write_results(results_path(directory, cfg.eval.eval_results_prefix), document)
    print(f"neox.eval: checkpoint {outcome.checkpoint} (iteration {outcome.iteration})", flush=True)
    if outcome.lm_eval is not None:
        print(lm_eval_tables(outcome.lm_eval), flush=True)
    if outcome.perplexity:
        print(perplexity_table(outcome.perplexity), flush=True)
    for note in outcome.notes:
        print(f"neox.eval: note: {note}", flush=True)
    print(f"neox.eval: results written to {path}", flush=True)
    return path


def _run(cfg: NeoXConfig, config_path: Path, runtime: Runtime) -> None:
    run(cfg, runtime)


PROGRAM = RankProgram(module="neox.eval", launch_command="deepy eval", description=__doc__.splitlines()[0],
                      body=_run, input_errors=(EvalError,))


def main(argv: list[str] | None = None) -> int:
    return run_rank_program(PROGRAM, argv)

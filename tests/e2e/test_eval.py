"""`deepy eval` as a user runs it: a real tiny training run, then a 2-rank gloo eval launch with PIQA, ARC-Easy
and perplexity, checked against the same evaluation in one process (the ranks' shares must add up exactly)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neox.config import load_resolved
from neox.eval.run import evaluate, load_runner
from neox.parallel.runtime import Runtime
from tests.conftest import REPO_ROOT
from tests.e2e.train_helpers import (CPU_LAUNCH_CONFIG, DEEPY, LAUNCH_TIMEOUT_S, deepy_train, free_port,
                                     preprocess_kjv, write_config)

pytestmark = pytest.mark.slow
LIMIT = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(model config, run dir) of a 20-step char-level run on one rank, checkpointed at iterations 10 and 20."""
    work = tmp_path_factory.mktemp("eval_e2e")
    config = write_config(work / "tiny_test.yml", preprocess_kjv(work / "data"))
    launch = deepy_train(work / "run", config, num_gpus=1, zero_stage=0, extra={"save_interval": 10})
    return config, launch.run_dir


def deepy_eval(config: Path, run_dir: Path, *args: str, num_gpus: int = 2) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(DEEPY), "eval", str(config), str(CPU_LAUNCH_CONFIG), "--num_gpus", str(num_gpus),
            "--master_port", str(free_port()), "--load", str(run_dir / "ckpt"), "--log_dir", str(run_dir / "eval"),
            *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)


def test_two_rank_eval_matches_one_process(trained) -> None:
    config, run_dir = trained
    result = deepy_eval(config, run_dir, "--eval_tasks", "piqa", "arc_easy", "perplexity", "--eval_limit",
                        str(LIMIT), "--eval_batch_size", "4", "--eval_iteration", "20")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    (results_file,) = (run_dir / "eval").glob("eval_results_*.json")
    document = json.loads(results_file.read_text())
    assert document["neox"]["iteration"] == 20
    assert document["neox"]["checkpoint"].endswith("global_step20")
    for task in ("piqa", "arc_easy"):
        assert document["n-samples"][task]["effective"] == LIMIT
        assert f"|{task}" in output.replace(" ", "")  # lm_eval's table on stdout
    valid, test = document["perplexity"]  # split 949,50,1
    assert (valid["source"], test["source"]) == ("valid", "test")
    assert valid["windows"] == LIMIT and valid["tokens"] == LIMIT * 64
    assert valid["loss"] < 6.24 - 1.5  # it has learned: ln(512) = 6.24 is uniform guessing

    # The same evaluation in this process (one rank, all requests): the 2-rank shares must add up to it.
    cfg = load_resolved(run_dir / "eval" / "eval_config.yml")
    runner, _, tokenizer, _ = load_runner(cfg, Runtime(0, 1, 0, torch.device("cpu")))
    lm_results, (alone, _), _ = evaluate(cfg, runner, tokenizer, show_progress=False)
    for task in ("piqa", "arc_easy"):
        for metric in ("acc,none", "acc_norm,none"):
            assert round(document["results"][task][metric], 4) == round(lm_results["results"][task][metric], 4)
    assert valid["loss"] == pytest.approx(alone.loss, rel=1e-6) and valid["tokens"] == alone.tokens


def test_unknown_task_fails_with_a_clear_error(trained) -> None:
    config, run_dir = trained
    result = deepy_eval(config, run_dir, "--eval_tasks", "piqa", "not_a_task", num_gpus=1)
    assert result.returncode == 2, (result.stdout + result.stderr)[-4000:]
    assert "lm_eval cannot load eval task(s) 'not_a_task'" in result.stderr
    assert "arc_easy, piqa" in result.stderr and "Traceback" not in result.stderr

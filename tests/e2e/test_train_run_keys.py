"""gpt-neox's training-loop and checkpoint keys through `deepy train`, as a user runs them: three short launches
of one CPU rank share this module.

- `epochs`: train_epochs (train_iters from the data), exponential decay over lr_decay_fraction of it, checkpoints
  at log-scale powers of 2 plus extra_save_iters [0, 3], exit_interval 5, the forward-pass check, config_files;
- `resumed`: iteration 2 of that run with no_load_optim, saving with no_save_optim and no_save_rng;
- `evaluated`: do_train false on the weights-only checkpoint: evaluation only.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from neox.checkpoint import consolidate
from neox.checkpoint.layout_state import read_layout_free_state
from neox.data.build import split_document_ranges
from neox.data.indexed import IndexedDataset
from tests.e2e.train_helpers import CPU_LAUNCH_CONFIG, TINY_MODEL, Launch, deepy_train, preprocess_kjv

pytestmark = pytest.mark.slow

MAX_LR, MIN_LR, FRACTION = 2.0e-3, 2.0e-4, 0.001


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("run_keys")


@pytest.fixture(scope="module")
def data_path(work) -> Path:
    return preprocess_kjv(work / "data")


@pytest.fixture(scope="module")
def config(work, data_path) -> Path:
    # No train_iters and no lr_decay_iters: train_epochs and lr_decay_fraction give them.
    keys = {k: v for k, v in TINY_MODEL.items() if k not in ("train_iters", "lr_decay_iters")}
    keys.update(data_path=str(data_path), train_epochs=1, lr_decay_style="exponential", lr_decay_fraction=FRACTION,
                warmup=0.0, checkpoint_factor=2, checkpoint_scale="log", extra_save_iters=[0, 3],
                checkpoint_validation_with_forward_pass=True)
    path = work / "epochs.yml"
    path.write_text("# gpt-neox-style keys of the training loop\n" + yaml.safe_dump(keys, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def expected_iters(data_path) -> int:
    """gpt-neox's count: (tokens of the train split - 1) // seq_length samples, // (micro 2 x dp 1), // accum 4."""
    sizes = np.asarray(IndexedDataset(str(data_path)).sizes, dtype=np.int64)
    start, end = split_document_ranges(TINY_MODEL["split"], len(sizes))[0]
    samples = (int(sizes[start:end].sum()) - 1) // TINY_MODEL["seq_length"]
    return samples // 2 // 4


@pytest.fixture(scope="module")
def epochs(work, config) -> Launch:
    return deepy_train(work / "epochs", config, extra={"exit_interval": 5})


@pytest.fixture(scope="module")
def resumed(work, config, epochs) -> Launch:
    return deepy_train(work / "resumed", config, extra={
        "load": str(epochs.save_dir), "iteration": 2, "no_load_optim": True, "train_epochs": "null",
        "train_iters": 6, "no_save_optim": True, "no_save_rng": True})


@pytest.fixture(scope="module")
def evaluated(work, config, resumed) -> Launch:
    return deepy_train(work / "evaluated", config, extra={
        "load": str(resumed.save_dir), "do_train": False, "train_epochs": "null", "train_iters": 6})


def _exponential_lr(step: int, decay_iters: int) -> float:
    return max(MAX_LR * math.exp(-0.693 * step / decay_iters), MIN_LR)


def _steps(save_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("global_step")) for p in save_dir.glob("global_step*"))


def test_train_epochs_exit_interval_and_log_checkpoints(epochs, expected_iters, config):
    assert epochs.result.returncode == 0
    assert f"-> train_iters {expected_iters}" in epochs.output
    assert "exit_interval 5: exiting after iteration 5" in epochs.output
    train = [r for r in epochs.records() if "lm_loss" in r]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4, 5]
    assert not [r for r in epochs.records() if "valid_loss" in r or "test_loss" in r]  # exited: no final evaluation
    decay_iters = math.floor(expected_iters * FRACTION)
    assert [r["lr"] for r in train] == pytest.approx([_exponential_lr(i, decay_iters) for i in range(5)], rel=1e-12)
    # log scale, factor 2: 1, 2, 4; extra_save_iters: 0 (before the first step) and 3; nothing at 5 (exit_interval)
    assert _steps(epochs.save_dir) == [0, 1, 2, 3, 4]
    assert (epochs.save_dir / "latest").read_text().strip() == "global_step4"
    for step in (0, 4):
        ckpt = epochs.save_dir / f"global_step{step}"
        assert json.loads((ckpt / "complete.json").read_text())["engine_state"] is True
        state = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)
        assert state["iteration"] == step and state["optimizer"] is not None
        assert state["lr_schedule"] == {"max_lr": MAX_LR, "min_lr": MIN_LR, "warmup_iters": 0,
                                        "decay_iters": decay_iters, "decay_style": "exponential", "num_iters": step}
        assert (ckpt / "forward_check.pt").is_file()
        # config_files: the YAML files as given to deepy, comments and all, under configs/ (as gpt-neox)
        assert (ckpt / "configs" / "epochs.yml").read_text() == config.read_text()
        assert (ckpt / "configs" / "cpu.yml").read_text() == CPU_LAUNCH_CONFIG.read_text()
    step0 = torch.load(epochs.save_dir / "global_step0" / "mp_rank_00_model_states.pt", weights_only=False)
    assert step0["optimizer"]["state"] == {}  # saved before the first step: untrained


def test_resume_at_an_iteration_with_a_fresh_optimizer(epochs, resumed):
    out = resumed.output
    assert re.search(r"global_step2: resuming at iteration 2 with a fresh optimizer and LR schedule \(no_load_optim\)",
                     out), out[-3000:]
    assert "gives the saved loss" in out  # checkpoint_validation_with_forward_pass after the load
    train = [r for r in resumed.records() if "lm_loss" in r]
    assert [r["iteration"] for r in train] == [3, 4, 5, 6]
    assert [r["consumed_samples"] for r in train] == [24, 32, 40, 48]  # the data position is kept
    # Step 3 of both runs: the weights of step 2 on the batch of step 3, so the same loss to the bit.
    assert train[0]["lm_loss"] == epochs.losses()[3]
    # A fresh schedule (as gpt-neox, which loads optimizer and scheduler together): decay_iters max(1, 6 x 0.001)
    assert [r["lr"] for r in train] == pytest.approx([_exponential_lr(i, 1) for i in range(4)], rel=1e-12)
    # no_save_optim: only the fp32 weights (layout_free/), no DeepSpeed files; no_save_rng: no rng/
    assert _steps(resumed.save_dir) == [3, 4, 6]
    for step in (3, 4, 6):
        ckpt = resumed.save_dir / f"global_step{step}"
        assert json.loads((ckpt / "complete.json").read_text())["engine_state"] is False
        assert not list(ckpt.glob("*model_states.pt")) and not list(ckpt.glob("*optim_states.pt"))
        assert not (ckpt / "rng").exists()
        shard = read_layout_free_state(ckpt)
        assert shard.client_state["iteration"] == step and shard.weights
        assert not any(shard.moments.values())
    # eval, generate and the converters read such a checkpoint as any other
    _, weights = consolidate(resumed.save_dir / "global_step6")
    _, full = consolidate(epochs.save_dir / "global_step4")
    assert weights.keys() == full.keys()
    assert all(torch.equal(weights[k], shard.weights[k]) for k in shard.weights)


def test_do_train_false_evaluates_a_weights_only_checkpoint(resumed, evaluated):
    out = evaluated.output
    assert "global_step6: resuming at iteration 6 with a fresh optimizer and LR schedule (the checkpoint was " \
           "saved with no_save_optim)" in out
    assert "do_train is false" in out
    assert "gives the saved loss" in out  # the weights came back exactly from the weights-only checkpoint
    records = evaluated.records()
    assert not [r for r in records if "lm_loss" in r]
    scores = [(r["iteration"], "valid_loss" in r) for r in records if "valid_loss" in r or "test_loss" in r]
    assert scores == [(6, True), (6, False)]  # the last validation (do_valid), then the test split (do_test)
    assert _steps(evaluated.save_dir) == []  # nothing trained, nothing saved

"""Training through `deepy train` as a user runs it: real DeepSpeed launches of 1 and 2 CPU ranks (gloo).

One uninterrupted 20-step run on one rank at ZeRO 0 (module fixture `reference`) is the yardstick for stop + resume,
finetuning and the architecture check; every other launch is made by the test that needs it. Data parallelism at
ZeRO 0-3 against one rank is tests/distributed/test_parity_matrix.py's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from neox.config.resolved import load_resolved
from tests.e2e.train_helpers import Launch, deepy_train, preprocess_kjv, read_metrics, write_config

pytestmark = pytest.mark.slow

TRAIN_KEYS = ("iteration", "lm_loss", "lr", "grad_norm", "tokens_per_sec", "samples_per_sec", "tflops", "mfu",
              "consumed_samples", "elapsed_s")
GLOBAL_BATCH = 8  # dp=1: micro 2 x accum 4; dp=2: micro 2 x accum 2 x 2 ranks


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def kjv_data(work) -> Path:
    return preprocess_kjv(work / "data")


@pytest.fixture(scope="module")
def model_config(work, kjv_data) -> Path:
    return write_config(work / "tiny_test.yml", kjv_data)


@pytest.fixture(scope="module")
def reference(work, model_config) -> Launch:
    """20 steps, dp=1, ZeRO 0, a checkpoint every 10 steps."""
    return deepy_train(work / "reference", model_config, num_gpus=1, zero_stage=0, extra={"save_interval": 10})


def test_metrics_and_checkpoint_files(reference):
    records = reference.records()
    train = [r for r in records if "lm_loss" in r]
    assert [r["iteration"] for r in train] == list(range(1, 21))
    for r in train:
        missing = [k for k in TRAIN_KEYS if r.get(k) is None]
        assert not missing, f"iteration {r['iteration']} lacks {missing}"
        assert r["consumed_samples"] == r["iteration"] * GLOBAL_BATCH
        assert r["tokens_per_sec"] > 0 and r["grad_norm"] > 0 and 0 < r["mfu"] < 1
        assert r["tokens_per_sec"] == pytest.approx(r["samples_per_sec"] * 64)
    assert [r["elapsed_s"] for r in train] == sorted(r["elapsed_s"] for r in train)
    # warmup 0.1 of 20 = 2 iterations, then cosine from 2e-3 down to min_lr 2e-4 at iteration 20
    assert [r["lr"] for r in train[:2]] == pytest.approx([1e-3, 2e-3])
    assert train[-1]["lr"] == pytest.approx(2e-4 + 1.8e-3 * 0.5 * (1 + math.cos(math.pi * 17 / 18)))
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 1.5  # it learns: ln(512) = 6.24 at the start

    valid = [r for r in records if "valid_loss" in r]
    assert [r["iteration"] for r in valid] == [10, 20]
    for r in valid:
        assert r["valid_ppl"] == pytest.approx(math.exp(r["valid_loss"]), rel=1e-9)

    save_dir = reference.save_dir
    assert (save_dir / "latest").read_text().strip() == "global_step20"
    resolved = (save_dir / "resolved_config.yml").read_text()
    for step in (10, 20):
        ckpt = save_dir / f"global_step{step}"
        assert json.loads((ckpt / "complete.json").read_text())["iteration"] == step
        assert (ckpt / "config.yml").read_text() == resolved
        assert (ckpt / "tokenizer").is_dir()  # CharLevelTokenizer has no files; the unit tests cover copying
        rng = torch.load(ckpt / "rng" / "rank0.pt", weights_only=True)
        assert rng["torch"].dtype == torch.uint8
    saved = load_resolved(save_dir / "global_step20" / "config.yml")
    assert (saved.model.hidden_size, saved.model.padded_vocab_size, saved.data.tokenizer_type) == (
        64, 512, "CharLevelTokenizer")
    assert (saved.train.train_batch_size, saved.optim.zero_optimization["stage"]) == (GLOBAL_BATCH, 0)


def test_stop_and_resume_is_exact(work, model_config, reference):
    run = work / "stop_resume"
    first = deepy_train(run, model_config, extra={"train_iters": 10})
    assert sorted(first.losses()) == list(range(1, 11))
    # A newer checkpoint cut off mid-write (no complete.json) that `latest` even names must be skipped.
    (run / "ckpt" / "global_step15").mkdir()
    (run / "ckpt" / "latest").write_text("global_step15\n")
    second = deepy_train(run, model_config, extra={"train_iters": 20, "load": str(run / "ckpt")})
    assert "resuming at iteration 10" in second.output
    losses = second.losses()
    reference_losses = reference.losses()
    assert [losses[i] for i in range(11, 21)] == [reference_losses[i] for i in range(11, 21)]
    resumed = [r for r in read_metrics(second.log_dir) if "lm_loss" in r and r["iteration"] > 10]
    assert resumed[0]["consumed_samples"] == 11 * GLOBAL_BATCH
    valid = {r["iteration"]: r["valid_loss"] for r in second.records() if "valid_loss" in r}
    ref_valid = {r["iteration"]: r["valid_loss"] for r in reference.records() if "valid_loss" in r}
    assert valid == ref_valid
    assert (run / "ckpt" / "latest").read_text().strip() == "global_step20"


def test_stop_and_resume_with_dropout_on_two_ranks_is_exact(work, kjv_data, reference):
    # Dropout draws from every rank's own RNG stream, which the checkpoint must restore; the peak-FLOPs probe runs
    # at every start (peak_flops unset) and must not shift those streams either.
    config = write_config(work / "tiny_dropout.yml", kjv_data, hidden_dropout=0.1, attention_dropout=0.1,
                          peak_flops=None)
    launch = dict(num_gpus=2, zero_stage=1)
    # The uninterrupted run loads from its own, still empty, save directory as configs/local_setup.yml does: that
    # must be a fresh start exactly like the stopped run's first launch, which has no `load`.
    whole_dir = work / "dropout_whole"
    whole = deepy_train(whole_dir, config, **launch,
                        extra={"gradient_accumulation_steps": 2, "load": str(whole_dir / "ckpt")})
    run = work / "dropout_resume"
    deepy_train(run, config, **launch, extra={"gradient_accumulation_steps": 2, "train_iters": 10})
    second = deepy_train(run, config, **launch,
                         extra={"gradient_accumulation_steps": 2, "train_iters": 20, "load": str(run / "ckpt")})
    assert sorted((run / "ckpt" / "global_step10" / "rng").iterdir()) == [
        run / "ckpt" / "global_step10" / "rng" / f"rank{r}.pt" for r in (0, 1)]
    whole_losses, resumed_losses = whole.losses(), second.losses()
    assert [resumed_losses[i] for i in range(1, 21)] == [whole_losses[i] for i in range(1, 21)]
    # dropout is really on: the same data and weights without it give other losses
    assert whole_losses[5] != reference.losses()[5]


def test_finetune_starts_at_iteration_zero_from_the_weights(work, model_config, reference):
    run = work / "finetune"
    tuned = deepy_train(run, model_config, extra={"load": str(reference.save_dir), "finetune": True,
                                                  "train_iters": 4, "lr_decay_iters": 4, "warmup": 0.5})
    assert "weights only (finetune)" in tuned.output
    records = [r for r in tuned.records() if "lm_loss" in r]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert [r["consumed_samples"] for r in records] == [8, 16, 24, 32]
    # the new schedule's warmup (2 iterations up to 2e-3), not the trained run's lr at iteration 20 (~2e-4)
    assert [r["lr"] for r in records[:2]] == pytest.approx([1e-3, 2e-3])
    reference_losses = reference.losses()
    # Iteration 1 sees the same first batch as the reference's iteration 1, at the trained model's loss level.
    assert records[0]["lm_loss"] < reference_losses[1] - 1.5
    assert records[0]["lm_loss"] == pytest.approx(reference_losses[20], rel=0.05)
    # a fresh optimizer: Adam has taken 4 steps, not 20 + 4
    state = torch.load(run / "ckpt" / "global_step4" / "mp_rank_00_model_states.pt", weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {4}
    assert state["iteration"] == 4


def test_checkpoint_of_another_architecture_is_refused(work, kjv_data, reference):
    config = write_config(work / "tiny_hidden96.yml", kjv_data, hidden_size=96)
    refused = deepy_train(work / "hidden96", config, num_gpus=2, extra={"gradient_accumulation_steps": 2,
                                                                        "load": str(reference.save_dir)},
                          check=False)
    assert refused.result.returncode == 2
    assert refused.seconds < 60  # refused at start-up, before any data or model is built; no rank left hanging
    assert "mismatched keys: hidden_size: checkpoint 64 vs config 96" in refused.result.stderr
    assert "Traceback" not in refused.output
    assert not (work / "hidden96" / "logs" / "metrics.jsonl").exists()

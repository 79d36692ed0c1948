"""gpt-neox's training-loop and checkpoint keys, in one process: the save-iteration arithmetic (checkpoint_factor,
checkpoint_scale, extra_save_iters, save_iters, save_interval), the LR schedule (exponential, lr_decay_fraction)
and the scheduler's checkpoint rules (override_lr_scheduler / use_checkpoint_lr_scheduler), train_epochs
arithmetic, no_save_optim / no_save_rng / no_load_optim / config_files in neox.checkpoint.engine_state, the forward-pass
check, and the config rules between these keys."""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from neox.config import ConfigError, load_config
from neox.config.train import TrainConfig
from neox.data.errors import DataError
from neox.data.indexed import IndexedDatasetWriter
from neox.checkpoint import engine_state
from neox.checkpoint.engine_state import RunFiles
from neox.train import epochs, forward_check
from neox.train.save_schedule import SaveSchedule, schedule_from_config
from neox.train.schedule import LRSchedule, ScheduleMismatch, decay_iters_for, resume_schedule
from tests.malicious_pickle import DeepSpeedsReader

# --- save iterations -------------------------------------------------------------------------------------------


def test_documented_examples_of_checkpoint_factor():
    # gpt-neox's neox_arguments.md, checkpoint_factor: "linear ... [20, 40, 60, 80, 100]", "log ... [1, 2, 4, 8,
    # 16, 32, 64, 100]" (the last iteration is always saved).
    assert SaveSchedule(factor=20, scale="linear").iterations(100) == [20, 40, 60, 80, 100]
    assert SaveSchedule(factor=2, scale="log").iterations(100) == [1, 2, 4, 8, 16, 32, 64, 100]


def test_log_scale_with_a_fractional_factor_and_extra_iterations():
    # gpt-neox's is_save_iter: the integer parts of 1, 1.5, 2.25, 3.375, 5.06, 7.59, 11.4 ...
    log15 = SaveSchedule(factor=1.5, scale="log", extra=(0, 6))
    assert log15.iterations(12) == [0, 1, 2, 3, 5, 6, 7, 11, 12]
    assert log15.due(0) and not log15.due(4)
    # resumed at 5: 5 itself is not saved again; 0 only belongs to a run that starts at 0
    assert log15.iterations(12, start=5) == [6, 7, 11, 12]


def test_explicit_save_iters_and_save_interval():
    assert SaveSchedule(explicit=(3, 7)).iterations(10) == [3, 7, 10]
    assert SaveSchedule().iterations(10) == [10]  # no schedule: the final checkpoint only
    train = TrainConfig(save_interval=4)
    train.validate()
    assert schedule_from_config(train).iterations(10) == [4, 8, 10]
    same = TrainConfig(save_interval=4, checkpoint_factor=4, extra_save_iters=[1])
    same.validate()
    assert schedule_from_config(same).iterations(10) == [1, 4, 8, 10]


@pytest.mark.parametrize("keys, message", [
    ({"save_interval": 10, "checkpoint_factor": 20}, "same setting with different values"),
    ({"save_interval": 10, "checkpoint_scale": "log"}, "set 'checkpoint_factor' instead"),
    ({"checkpoint_factor": 2.5}, "whole number"),
    ({"checkpoint_factor": 1, "checkpoint_scale": "log"}, "> 1 with checkpoint_scale log"),
    ({"save_iters": [5], "extra_save_iters": [1]}, "cannot be combined with 'extra_save_iters'"),
    ({"extra_save_iters": [-1]}, "'extra_save_iters' holds iterations"),
    ({"train_iters": 10, "train_epochs": 1}, "not both"),
    ({"iteration": -3, "load": "ckpt"}, "'iteration' must be >= 0"),
    ({"iteration": 3}, "'load', which is not set"),
    ({"config_files": {"../x.yml": ""}}, "not a file name"),
])
def test_conflicting_checkpoint_keys_are_config_errors(keys, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**keys).validate()


# --- learning-rate schedule ------------------------------------------------------------------------------------


def test_exponential_decay_is_gpt_neox_formula():
    s = LRSchedule(max_lr=1.0, min_lr=0.1, warmup_iters=4, decay_iters=24, decay_style="exponential")
    assert [s.lr_at(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for step in (4, 9, 14, 24, 30):
        # gpt-neox: start_lr * exp(-0.693 * (iters - warmup) / (end - warmup)), floored at min_lr
        expected = max(math.exp(-0.693 * (step - 4) / 20), 0.1)
        assert s.lr_at(step) == pytest.approx(expected, rel=1e-12)
    assert s.lr_at(24) == pytest.approx(0.5, rel=1e-3)  # halved at the end of the span
    assert s.lr_at(10_000) == 0.1  # and it goes on decaying past it, down to min_lr


def test_lr_decay_fraction():
    assert decay_iters_for(None, 0.5, 101) == 50  # floor(train_iters x fraction)
    assert decay_iters_for(30, 0.5, 101) == 30  # lr_decay_iters first, as gpt-neox
    assert decay_iters_for(None, None, 101) == 101
    assert decay_iters_for(None, 0.001, 100) == 1  # at least 1
    s = LRSchedule(max_lr=1.0, min_lr=0.0, warmup_iters=0, decay_iters=decay_iters_for(None, 0.5, 40),
                   decay_style="linear")
    assert [s.lr_at(i) for i in (0, 10, 19, 20, 39)] == pytest.approx([1.0, 0.5, 0.05, 0.0, 0.0])


def _load(tmp_path: Path, text: str, *overrides: str):
    path = tmp_path / "c.yml"
    path.write_text(textwrap.dedent(text))
    return load_config([path], list(overrides), local_gpus=0)


BASE = """\
    num_layers: 2
    hidden_size: 64
    num_attention_heads: 4
    seq_length: 64
    max_position_embeddings: 64
    train_micro_batch_size_per_gpu: 2
"""


def test_config_derives_decay_iters_from_the_fraction_and_mirrors_iteration(tmp_path):
    cfg = _load(tmp_path, BASE + "    train_iters: 90\n    lr_decay_fraction: 0.5\n    lr_decay_style: exponential\n",
                "--eval_iteration", "7", "--load", "ckpt")
    assert cfg.optim.lr_decay_iters == 45 and cfg.optim.lr_decay_style == "exponential"
    assert "lr_decay_fraction" in cfg.origin("lr_decay_iters")
    assert (cfg.train.iteration, cfg.eval.eval_iteration) == (7, 7)
    assert _load(tmp_path, BASE, "--iteration", "5", "--load", "ckpt").eval.eval_iteration == 5
    with pytest.raises(ConfigError, match="'iteration' \\(5\\) and 'eval_iteration' \\(6\\)"):
        _load(tmp_path, BASE, "--iteration", "5", "--eval_iteration", "6", "--load", "ckpt")
    with pytest.raises(ConfigError, match="'override_lr_scheduler'.*'use_checkpoint_lr_scheduler'"):
        _load(tmp_path, BASE, "--override_lr_scheduler", "true", "--use_checkpoint_lr_scheduler", "true")
    with pytest.raises(ConfigError, match="'train_epochs' cannot be used with unequal 'train_data_weights'"):
        _load(tmp_path, BASE + "    train_epochs: 2\n    train_data_paths: [a, b]\n    train_data_weights: [1, 2]\n")


# --- the scheduler's checkpoint rules (gpt-neox AnnealingLR.load_state_dict) ------------------------------------

CONFIGURED = LRSchedule(max_lr=1e-3, min_lr=1e-4, warmup_iters=10, decay_iters=100, decay_style="cosine")


def test_schedule_state_round_trip_and_agreement():
    saved = CONFIGURED.state(37)
    assert saved == {"max_lr": 1e-3, "min_lr": 1e-4, "warmup_iters": 10, "decay_iters": 100,
                     "decay_style": "cosine", "num_iters": 37}
    assert resume_schedule(CONFIGURED, saved, override=False, use_checkpoint=False) == (CONFIGURED, [])


def test_schedule_mismatch_names_the_key_unless_told_which_wins():
    saved = LRSchedule(max_lr=1e-3, min_lr=1e-4, warmup_iters=10, decay_iters=200, decay_style="linear").state(50)
    with pytest.raises(ScheduleMismatch, match="decay_iters = 200 but the config gives 100.*'lr_decay_iters'"):
        resume_schedule(CONFIGURED, saved, override=False, use_checkpoint=False)
    mine, notes = resume_schedule(CONFIGURED, saved, override=True, use_checkpoint=False)
    assert mine == CONFIGURED and len(notes) == 2
    theirs, notes = resume_schedule(CONFIGURED, saved, override=False, use_checkpoint=True)
    assert (theirs.decay_iters, theirs.decay_style, theirs.max_lr) == (200, "linear", 1e-3)
    assert [n.split(":")[0] for n in notes] == ["decay_iters", "decay_style"]
    with pytest.raises(ScheduleMismatch, match="both true"):
        resume_schedule(CONFIGURED, saved, override=True, use_checkpoint=True)


# --- train_epochs ------------------------------------------------------------------------------------------------


def test_train_epochs_arithmetic(tmp_path):
    prefix = tmp_path / "docs"
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for length in [100] * 10:
            writer.add_document(np.arange(length) % 50)
    # split 80,20: 8 train documents = 800 tokens -> (800 - 1) // 16 = 49 samples per epoch (gpt-neox's count)
    samples = epochs.train_epoch_samples(str(prefix), None, "80,20", 16)
    assert samples == 49
    assert epochs.train_epoch_samples(None, [str(prefix), str(prefix)], "969,30,1", 16) == 2 * (999 // 16)
    # (49 // (micro 2 x dp 2)) = 12 loader batches x 3 epochs // 4 accumulation = 9 iterations
    assert epochs.iterations_for_epochs(3, samples, micro_batch=2, dp_size=2, grad_accum=4) == 9
    with pytest.raises(DataError, match="gives 0 iterations"):
        epochs.iterations_for_epochs(1, 3, micro_batch=2, dp_size=2, grad_accum=1)


# --- checkpoint files ---------------------------------------------------------------------------------------------


class FakeEngine:
    def __init__(self):
        self.loaded: list[dict] = []
        self.checkpoint_engine = DeepSpeedsReader()  # engine_state.load reads through a weights-only one instead
        self.module = torch.nn.Linear(2, 2)  # every parameter trains: no frozen ones to leave out

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool,
                        exclude_frozen_parameters: bool = False) -> None:
        ckpt = Path(save_dir) / tag
        ckpt.mkdir(parents=True, exist_ok=True)
        torch.save({"client_state": client_state}, ckpt / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir: str, tag: str, **kwargs):
        self.loaded.append(kwargs)
        return str(Path(load_dir) / tag), self.checkpoint_engine.load(
            str(Path(load_dir) / tag / "mp_rank_00_model_states.pt"))["client_state"]


@pytest.fixture
def run_files(tmp_path) -> RunFiles:
    config = tmp_path / "resolved_config.yml"
    config.write_text("num_layers: 2\n")
    return RunFiles(config, ())


def test_no_save_optim_no_save_rng_and_config_files(tmp_path, run_files):
    weights = []
    engine_state.save(FakeEngine(), tmp_path / "ckpt", 4, {"iteration": 4}, run_files, 0, lambda: None,
                    write_extra=lambda d: weights.append((d / "layout_free").mkdir()), engine_state=False,
                    save_rng=False, config_files={"tiny.yml": "# mine\nnum_layers: 2\n", "x.json": {"a": 1}})
    ckpt = tmp_path / "ckpt" / "global_step4"
    assert sorted(p.name for p in ckpt.iterdir()) == ["complete.json", "config.yml", "configs", "layout_free",
                                                        "tokenizer"]
    assert (ckpt / "configs" / "tiny.yml").read_text() == "# mine\nnum_layers: 2\n"
    assert json.loads((ckpt / "configs" / "x.json").read_text()) == {"a": 1}
    assert json.loads((ckpt / "complete.json").read_text())["engine_state"] is False
    assert not engine_state.has_engine_state(ckpt)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "global_step4"
    # a checkpoint written before the marker recorded it has engine state
    (ckpt / "complete.json").write_text(json.dumps({"iteration": 4}))
    assert engine_state.has_engine_state(ckpt)


def test_no_load_optim_loads_module_only_but_keeps_client_state_and_rng(tmp_path, run_files):
    engine = FakeEngine()
    torch.manual_seed(3)
    engine_state.save(engine, tmp_path, 10, {"iteration": 10, "consumed_train_samples": 80}, run_files, 0,
                    lambda: None)
    expected = torch.rand(3)
    torch.manual_seed(99)
    state = engine_state.load(engine, tmp_path, "global_step10", 0, finetune=False, load_optimizer=False)
    assert state == {"iteration": 10, "consumed_train_samples": 80}
    assert engine.loaded[-1] == {"load_module_only": True, "load_optimizer_states": False,
                                 "load_lr_scheduler_states": False, "load_module_strict": True}
    assert torch.equal(torch.rand(3), expected)  # the RNG streams still come back
    torch.manual_seed(99)
    before = torch.random.get_rng_state()
    engine_state.load(engine, tmp_path, "global_step10", 0, finetune=False, load_rng=False)
    assert torch.equal(torch.random.get_rng_state(), before)  # no_load_rng leaves them alone
    assert engine.loaded[-1]["load_optimizer_states"] is True


# --- checkpoint_validation_with_forward_pass ----------------------------------------------------------------------


def test_forward_check_record_and_comparison(tmp_path):
    text = forward_check.reference_text(micro_batch=2, seq_length=5, vocab_size=4)
    assert text.tolist() == [[0, 1, 2, 3, 0, 1]] * 2  # gpt-neox's arange(seq_length + 1), within the vocabulary
    forward_check.save_record(tmp_path, text, 2.5, iteration=7)
    record = forward_check.read_record(tmp_path)
    assert record["loss"] == 2.5 and record["iteration"] == 7
    assert forward_check.input_for(record, micro_batch=3, seq_length=5).shape == (3, 6)
    assert forward_check.input_for(record, micro_batch=3, seq_length=8) is None
    assert forward_check.compare(tmp_path, 2.5, 2.5) is None
    assert "close to but not exactly" in forward_check.compare(tmp_path, 2.5, 2.5 * (1 + 1e-7))
    with pytest.raises(engine_state.CheckpointError, match="not the ones saved"):
        forward_check.compare(tmp_path, 2.5, 2.6)

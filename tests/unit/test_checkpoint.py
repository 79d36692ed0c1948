"""neox.checkpoint.engine_state without DeepSpeed: which tag gets loaded, RNG round trips, the save layout and pruning,
refusing a crafted pickle and a missing RNG file; neox.checkpoint.load_folder: what `load` may name."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from neox.checkpoint import engine_state, load_folder, safe_load
from neox.checkpoint.engine_state import RunFiles, resolve_load_tag
from neox.checkpoint.errors import CheckpointError
from neox.config.errors import ConfigError
from tests.malicious_pickle import DeepSpeedsReader, plant


def make_checkpoint(save_dir: Path, iteration: int, complete: bool = True) -> Path:
    ckpt = save_dir / f"global_step{iteration}"
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    if complete:
        (ckpt / engine_state.COMPLETE_MARKER).write_text(json.dumps({"iteration": iteration}))
    return ckpt


# --- which checkpoint is loaded ---------------------------------------------------------------------------------

def test_nothing_to_load(tmp_path):
    assert resolve_load_tag(tmp_path / "missing") is None
    assert resolve_load_tag(tmp_path) is None
    make_checkpoint(tmp_path, 5, complete=False)
    assert resolve_load_tag(tmp_path) is None


def test_latest_naming_a_complete_checkpoint_wins(tmp_path):
    for it in (10, 20, 30):
        make_checkpoint(tmp_path, it)
    (tmp_path / "latest").write_text("global_step20\n")
    assert resolve_load_tag(tmp_path) == "global_step20"


def test_incomplete_checkpoint_named_by_latest_is_skipped(tmp_path):
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20)
    make_checkpoint(tmp_path, 30, complete=False)  # cut off mid-write
    (tmp_path / "latest").write_text("global_step30")
    assert resolve_load_tag(tmp_path) == "global_step20"


@pytest.mark.parametrize("latest_text", ["", "\n", "global_step99\n", "not-a-tag"])
def test_stale_or_empty_latest_falls_back_to_newest_complete(tmp_path, latest_text):
    make_checkpoint(tmp_path, 9)
    make_checkpoint(tmp_path, 100)  # numeric, not lexical, order: 100 > 9
    make_checkpoint(tmp_path, 200, complete=False)
    (tmp_path / "latest").write_text(latest_text)
    assert resolve_load_tag(tmp_path) == "global_step100"


def test_no_latest_file_uses_newest_complete(tmp_path):
    make_checkpoint(tmp_path, 3)
    make_checkpoint(tmp_path, 12)
    (tmp_path / "global_step50").mkdir()  # no marker
    (tmp_path / "notes").mkdir()          # not a checkpoint at all
    assert resolve_load_tag(tmp_path) == "global_step12"
    assert engine_state.complete_tags(tmp_path) == ["global_step3", "global_step12"]


def test_requested_iteration(tmp_path):
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20)
    make_checkpoint(tmp_path, 30, complete=False)
    (tmp_path / "latest").write_text("global_step20")
    assert resolve_load_tag(tmp_path, requested_iteration=10) == "global_step10"
    with pytest.raises(CheckpointError, match=r"global_step30 is not a complete checkpoint .*"
                                              r"\['global_step10', 'global_step20'\]"):
        resolve_load_tag(tmp_path, requested_iteration=30)
    with pytest.raises(CheckpointError, match="global_step7 is not a complete checkpoint"):
        resolve_load_tag(tmp_path, requested_iteration=7)


# --- RNG ---------------------------------------------------------------------------------------------------------

def draws() -> tuple:
    return (torch.rand(5).tolist(), torch.nn.functional.dropout(torch.ones(16), 0.5).tolist(),
            np.random.rand(3).tolist(), np.random.randn(), random.random(), random.gauss(0, 1))


def test_rng_state_round_trips_through_weights_only_torch_load(tmp_path):
    torch.manual_seed(7)
    np.random.seed(8)
    random.seed(9)
    np.random.randn()  # leaves a cached gaussian in numpy's state, which must survive too
    random.gauss(0, 1)
    path = tmp_path / "rank0.pt"
    torch.save(engine_state.rng_state(), path)
    expected = draws()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    assert draws() != expected
    engine_state.set_rng_state(torch.load(path, weights_only=True))
    assert draws() == expected


# --- save: layout, latest, pruning ------------------------------------------------------------------------------

class FakeEngine:
    """What engine_state.save/load use of a DeepSpeed engine: it writes one file per save and records the calls;
    like DeepSpeed's, its load_checkpoint reads through its checkpoint_engine."""

    def __init__(self):
        self.saved: list[tuple[str, str, dict, bool]] = []
        self.loaded: list[dict] = []
        self.checkpoint_engine = DeepSpeedsReader()
        self.module = torch.nn.Linear(2, 2)  # every parameter trains: no frozen ones to leave out

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool,
                        exclude_frozen_parameters: bool = False) -> None:
        assert not exclude_frozen_parameters
        self.saved.append((save_dir, tag, dict(client_state), save_latest))
        ckpt = Path(save_dir) / tag
        ckpt.mkdir(parents=True, exist_ok=True)
        torch.save({"client_state": client_state}, ckpt / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir: str, tag: str, **kwargs):
        self.loaded.append({"load_dir": load_dir, "tag": tag, **kwargs})
        state = self.checkpoint_engine.load(str(Path(load_dir) / tag / "mp_rank_00_model_states.pt"))
        return str(Path(load_dir) / tag), state["client_state"]


@pytest.fixture
def run_files(tmp_path) -> RunFiles:
    config = tmp_path / "resolved_config.yml"
    config.write_text("num_layers: 2\n")
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text('{"a": 0}')
    merges.write_text("#version: 0.2\n")
    return RunFiles(config, (vocab, merges))


def test_save_layout_and_keep_last_pruning(tmp_path, run_files):
    save_dir = tmp_path / "ckpt"
    engine = FakeEngine()
    barriers = []
    for it in (1, 2, 3, 4):
        path = engine_state.save(engine, save_dir, it, {"iteration": it, "consumed_train_samples": 8 * it},
                               run_files, rank=0, barrier=lambda: barriers.append(1), keep_last=2)
        assert path == save_dir / f"global_step{it}"
        assert (save_dir / "latest").read_text().strip() == f"global_step{it}"
    assert sorted(p.name for p in save_dir.iterdir()) == ["global_step3", "global_step4", "latest"]
    assert all(not latest for *_, latest in engine.saved)  # DeepSpeed must never write `latest` itself
    assert len(barriers) == 4 * 3
    ckpt = save_dir / "global_step4"
    assert json.loads((ckpt / "complete.json").read_text())["iteration"] == 4
    assert (ckpt / "config.yml").read_text() == "num_layers: 2\n"
    assert (ckpt / "tokenizer" / "vocab.json").read_text() == '{"a": 0}'
    assert (ckpt / "tokenizer" / "merges.txt").read_text() == "#version: 0.2\n"
    assert set(torch.load(ckpt / "rng" / "rank0.pt", weights_only=True)) >= {"torch", "numpy", "python"}
    assert not [p for p in save_dir.rglob("*") if ".tmp" in p.name]


def test_keep_last_none_keeps_everything(tmp_path, run_files):
    engine = FakeEngine()
    for it in (1, 2, 3):
        engine_state.save(engine, tmp_path, it, {}, run_files, rank=0, barrier=lambda: None)
    assert engine_state.complete_tags(tmp_path) == ["global_step1", "global_step2", "global_step3"]


def test_leftover_of_an_interrupted_save_is_replaced(tmp_path, run_files):
    stale = make_checkpoint(tmp_path, 5, complete=False)
    (stale / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"from a dead run")
    engine_state.save(FakeEngine(), tmp_path, 5, {}, run_files, rank=0, barrier=lambda: None)
    assert not (stale / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    assert engine_state.is_complete(tmp_path, "global_step5")


def test_non_zero_rank_writes_only_its_rng_file(tmp_path, run_files):
    engine_state.save(FakeEngine(), tmp_path, 3, {}, run_files, rank=1, barrier=lambda: None)
    ckpt = tmp_path / "global_step3"
    assert (ckpt / "rng" / "rank1.pt").is_file()
    assert not (ckpt / "complete.json").exists() and not (tmp_path / "latest").exists()


# --- load -------------------------------------------------------------------------------------------------------

def test_resume_restores_client_state_and_rng_finetune_only_weights(tmp_path, run_files):
    engine = FakeEngine()
    torch.manual_seed(3)
    engine_state.save(engine, tmp_path, 10, {"iteration": 10, "consumed_train_samples": 80}, run_files, rank=0,
                    barrier=lambda: None)
    expected = torch.rand(4)
    torch.manual_seed(99)
    state = engine_state.load(engine, tmp_path, "global_step10", rank=0, finetune=False)
    assert state == {"iteration": 10, "consumed_train_samples": 80}
    assert torch.equal(torch.rand(4), expected)
    assert engine.loaded[-1]["load_module_only"] is False and engine.loaded[-1]["load_optimizer_states"] is True

    torch.manual_seed(99)
    after_seed = torch.random.get_rng_state()
    assert engine_state.load(engine, tmp_path, "global_step10", rank=0, finetune=True) == {}
    assert torch.equal(torch.random.get_rng_state(), after_seed)  # finetune keeps its own fresh RNG
    assert engine.loaded[-1]["load_module_only"] is True and engine.loaded[-1]["load_optimizer_states"] is False


def test_load_failure_is_an_error(tmp_path):
    class NothingLoaded(FakeEngine):
        def load_checkpoint(self, load_dir, tag, **kwargs):
            return None, None

    with pytest.raises(CheckpointError, match="could not load"):
        engine_state.load(NothingLoaded(), tmp_path, "global_step1", rank=0, finetune=False)


def test_architecture_mismatch_names_every_key(tmp_path):
    saved = {"hidden_size": 64, "num_layers": 2, "norm": "layernorm"}
    current = {"hidden_size": 96, "num_layers": 3, "norm": "layernorm"}
    with pytest.raises(CheckpointError) as err:
        engine_state.check_same_architecture(saved, current, ("hidden_size", "num_layers", "norm"), tmp_path)
    message = str(err.value)
    assert "hidden_size: checkpoint 64 vs config 96" in message and "num_layers: checkpoint 2 vs config 3" in message
    assert "norm" not in message.split("mismatched keys:")[1]
    engine_state.check_same_architecture(saved, dict(saved), ("hidden_size", "num_layers", "norm"), tmp_path)


# --- untrusted files and missing pieces -------------------------------------------------------------------------

def test_resume_refuses_a_pickle_that_runs_code(tmp_path, run_files):
    engine = FakeEngine()
    engine_state.save(engine, tmp_path, 10, {"iteration": 10}, run_files, rank=0, barrier=lambda: None)
    states = plant(tmp_path / "global_step10" / "mp_rank_00_model_states.pt", tmp_path / "pwned")
    engine.load_checkpoint(str(tmp_path), "global_step10")  # DeepSpeed's own read runs the payload
    assert (tmp_path / "pwned").exists()
    (tmp_path / "pwned").unlink()
    reader = engine.checkpoint_engine
    with pytest.raises(CheckpointError) as err:
        engine_state.load(engine, tmp_path, "global_step10", rank=0, finetune=False)
    assert f"refusing to load {states}" in str(err.value) and "posix.system" in str(err.value)
    assert not (tmp_path / "pwned").exists()
    assert engine.checkpoint_engine is reader  # DeepSpeed's engine is handed back for saving


def test_deepspeeds_direct_torch_loads_are_weights_only_too(tmp_path):
    """A universal checkpoint's files are read by torch.load(weights_only=False) calls outside the checkpoint
    engine: inside the load they are weights-only all the same."""
    crafted = tmp_path / "fp32.pt"
    torch.save({"param": torch.ones(2)}, crafted)
    plant(crafted, tmp_path / "pwned")
    with pytest.raises(CheckpointError, match=rf"refusing to load checkpoint {tmp_path}: one of its files holds "
                                              r"posix.system"):
        with safe_load.deepspeed_loads_weights_only(FakeEngine(), tmp_path):
            torch.load(crafted, weights_only=False)
    assert not (tmp_path / "pwned").exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_a_missing_rng_file_is_an_error_unless_no_load_rng(tmp_path, run_files):
    engine = FakeEngine()
    engine_state.save(engine, tmp_path, 4, {"iteration": 4}, run_files, rank=0, barrier=lambda: None)
    ckpt = tmp_path / "global_step4"
    assert engine_state.missing_rng_warning(ckpt, 0) is None
    engine_state.rng_file(ckpt, 0).unlink()
    with pytest.raises(CheckpointError) as err:
        engine_state.load(engine, tmp_path, "global_step4", rank=0, finetune=False)
    assert f"{ckpt / 'rng' / 'rank0.pt'} is missing" in str(err.value) and "'no_load_rng: true'" in str(err.value)
    with pytest.raises(CheckpointError, match="rank1.pt is missing"):
        engine_state.read_rng_state(ckpt, 1)
    assert engine_state.load(engine, tmp_path, "global_step4", rank=0, finetune=False, load_rng=False) == \
        {"iteration": 4}
    warning = engine_state.missing_rng_warning(ckpt, 0)
    assert warning.startswith("WARNING: ") and str(ckpt / "rng" / "rank0.pt") in warning and "\n" not in warning
    # Saved with no_save_rng: there is nothing missing, and the run reseeds quietly.
    engine_state.save(engine, tmp_path, 5, {"iteration": 5}, run_files, rank=0, barrier=lambda: None,
                      save_rng=False)
    assert engine_state.load(engine, tmp_path, "global_step5", rank=0, finetune=False) == {"iteration": 5}
    assert engine_state.missing_rng_warning(tmp_path / "global_step5", 0) is None


# --- what `load` may name ---------------------------------------------------------------------------------------

def test_load_naming_a_file_is_a_config_error(tmp_path):
    file = tmp_path / "model.pt"
    file.write_bytes(b"not a folder")
    for call in (lambda: load_folder.require_folder(file), lambda: load_folder.start_from_scratch(file, None)):
        with pytest.raises(ConfigError, match=rf"'load': {file} is a file, not a checkpoint folder"):
            call()
    load_folder.require_folder(tmp_path)
    load_folder.require_folder(tmp_path / "missing")


def test_first_run_folders_start_from_scratch_with_one_line(tmp_path):
    missing = tmp_path / "ckpt"
    assert load_folder.start_from_scratch(missing, str(missing)) == (
        f"load: {missing} does not exist yet: starting from scratch (gpt-neox's first-run convention, save == load)")
    missing.mkdir()
    assert "holds no checkpoint yet: starting from scratch" in load_folder.start_from_scratch(missing, None)
    # deepy writes resolved_config.yml into save before the ranks start; a first save may have been cut off
    (missing / "resolved_config.yml").write_text("num_layers: 2\n")
    make_checkpoint(missing, 5, complete=False)
    assert "holds no checkpoint yet" in load_folder.start_from_scratch(missing, str(tmp_path / "." / "ckpt"))


def test_a_folder_that_is_not_a_checkpoint_is_a_config_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.bin", "a.idx", "notes.txt"):
        (data / name).write_text("x")
    with pytest.raises(ConfigError) as err:
        load_folder.start_from_scratch(data, str(tmp_path / "ckpt"))
    message = str(err.value)
    assert message.startswith(f"'load': {data} is not a checkpoint folder") and "a.bin, a.idx, notes.txt" in message
    other_run = tmp_path / "run1"
    make_checkpoint(other_run, 3, complete=False)
    with pytest.raises(ConfigError, match=r"its global_step3 has no complete.json \(the save was cut off"):
        load_folder.start_from_scratch(other_run, str(tmp_path / "run2"))
    hf_model = tmp_path / "pythia-hf"
    hf_model.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (hf_model / name).write_text("{}")
    with pytest.raises(ConfigError, match="looks like a Hugging Face model: convert it with tools/convert_hf_to_neox"):
        load_folder.start_from_scratch(hf_model, None)
    step = make_checkpoint(tmp_path / "run3", 7)
    with pytest.raises(ConfigError, match=rf"one checkpoint of the save directory {tmp_path / 'run3'}: set "
                                          rf"'load: {tmp_path / 'run3'}' and 'iteration: 7'"):
        load_folder.start_from_scratch(step, None)

"""neox.checkpoint.engine_state without DeepSpeed: which tag gets loaded, RNG round trips, the save layout and pruning."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from neox.checkpoint import engine_state
from neox.checkpoint.engine_state import RunFiles, resolve_load_tag
from neox.checkpoint.errors import CheckpointError


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
    """What engine_state.save/load use of a DeepSpeed engine: it writes one file per save and records the calls."""

    def __init__(self):
        self.saved: list[tuple[str, str, dict, bool]] = []
        self.loaded: list[dict] = []

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        self.saved.append((save_dir, tag, dict(client_state), save_latest))
        ckpt = Path(save_dir) / tag
        ckpt.mkdir(parents=True, exist_ok=True)
        torch.save({"client_state": client_state}, ckpt / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir: str, tag: str, **kwargs):
        self.loaded.append({"load_dir": load_dir, "tag": tag, **kwargs})
        state = torch.load(Path(load_dir) / tag / "mp_rank_00_model_states.pt", weights_only=True)
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

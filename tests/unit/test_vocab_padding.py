"""The padded vocabulary of a run loading a checkpoint of another tp (neox/checkpoint/vocab_padding.py), and the
gradient norm the tp layouts and the single rank must measure alike (GradNormClipper)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from neox.checkpoint.engine_state import COMPLETE_MARKER
from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.layout_engine import FlatRange
from neox.checkpoint.layout_sources import fill, open_source
from neox.checkpoint.layout_state import OfflineWriter, StageShard
from neox.checkpoint.regions import Rect
from neox.checkpoint.vocab_padding import VOCAB_ROWS, Repad, adopt_checkpoint_padding, check_checkpoint_model
from neox.config import load_config, save_resolved
from neox.parallel.parallelize import GradNormClipper, squared_norm
from neox.train.run import ARCHITECTURE_KEYS
from tests.conftest import GPT2_MERGES, GPT2_VOCAB

GPT2_IDS = 50258  # HFGPT2Tokenizer: GPT-2's 50257 ids and the <|padding|> gpt-neox adds
EMBED = "embedding.word_embeddings.weight"
MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
         "max_position_embeddings": 64, "train_micro_batch_size_per_gpu": 2, "train_iters": 6,
         "tokenizer_type": "HFGPT2Tokenizer", "vocab_file": str(GPT2_VOCAB), "merge_file": str(GPT2_MERGES),
         "precision": "fp32", "data_path": "unused"}


def _config(tmp_path: Path, name: str, **keys):
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump({**MODEL, **keys}))
    return load_config([path], vocab_size=GPT2_IDS, local_gpus=0)


def _checkpoint(tmp_path: Path, **keys) -> Path:
    """A save directory whose latest complete checkpoint was resolved with these keys (its config is what counts)."""
    save = tmp_path / "ckpt"
    ckpt = save / "global_step3"
    ckpt.mkdir(parents=True)
    save_resolved(_config(tmp_path, "saved", **keys), ckpt / "config.yml")
    (ckpt / COMPLETE_MARKER).write_text(json.dumps({"iteration": 3}))
    (save / "latest").write_text("global_step3\n")
    return save


def test_tp2_adopts_a_tp1_checkpoints_padding(tmp_path):
    load = _checkpoint(tmp_path)
    cfg = _config(tmp_path, "tp2", model_parallel_size=2, num_gpus=2, load=str(load))
    assert cfg.model.padded_vocab_size == 50432  # what tp2 pads GPT-2 to on its own
    note = adopt_checkpoint_padding(cfg, GPT2_IDS)
    assert cfg.model.padded_vocab_size == 50304
    assert "50304 adopted" in note and "50432" in note and str(load / "global_step3") in note
    assert cfg.provenance["padded_vocab_size"].startswith("derived: adopted from checkpoint")


@pytest.mark.parametrize("saved_keys,run_keys,expected", [
    ({}, {"padded_vocab_size": 50432}, 50432),  # pinned by the user: kept (the trainer re-pads)
    ({"make_vocab_size_divisible_by": 3}, {}, 50432),  # 50259 rows: tp2 cannot split them (re-padded)
    ({}, {"make_vocab_size_divisible_by": 64}, 50304),  # the run's own padding is the checkpoint's already
])
def test_padding_is_not_adopted(tmp_path, saved_keys, run_keys, expected):
    load = _checkpoint(tmp_path, **saved_keys)
    cfg = _config(tmp_path, "tp2", model_parallel_size=2, num_gpus=2, load=str(load), **run_keys)
    provenance = cfg.provenance["padded_vocab_size"]
    assert adopt_checkpoint_padding(cfg, GPT2_IDS) is None
    assert cfg.model.padded_vocab_size == expected and cfg.provenance["padded_vocab_size"] == provenance


def test_fresh_run_with_save_equal_to_load_has_nothing_to_adopt(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = _config(tmp_path, "tp2", model_parallel_size=2, num_gpus=2, load=str(tmp_path / "empty"))
    assert adopt_checkpoint_padding(cfg, GPT2_IDS) is None and cfg.model.padded_vocab_size == 50432


def test_checkpoint_model_check(tmp_path):
    saved = _config(tmp_path, "saved", make_vocab_size_divisible_by=3).model
    tp2 = _config(tmp_path, "tp2", model_parallel_size=2, num_gpus=2).model
    repad = check_checkpoint_model(saved, tp2, GPT2_IDS, ARCHITECTURE_KEYS, tmp_path)
    assert repad == Repad(saved=50259, padded=50432, vocab=GPT2_IDS)
    assert repad.note(2) == ("vocabulary re-padded from the checkpoint's 50259 rows to 50432 (model_parallel_size 2 "
                             "does not divide 50259): the tokenizer's 50258 rows load unchanged, rows 50259..50431 "
                             "start at zero")
    assert check_checkpoint_model(tp2, tp2, GPT2_IDS, ARCHITECTURE_KEYS, tmp_path) is None
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint 64 vs config 128"):
        check_checkpoint_model(saved, _config(tmp_path, "wide", hidden_size=128).model, GPT2_IDS,
                               ARCHITECTURE_KEYS, tmp_path)
    small = dataclasses.replace(saved, padded_vocab_size=50000)  # trained with a smaller tokenizer
    with pytest.raises(CheckpointError, match="50000 vocabulary rows, fewer than the tokenizer's 50258"):
        check_checkpoint_model(small, tp2, GPT2_IDS, ARCHITECTURE_KEYS, tmp_path)


@pytest.mark.parametrize("saved,padded", [(50259, 50432), (50432, 50304)])
def test_repad_keeps_every_row_below_the_new_size_bit_for_bit(tmp_path, saved, padded):
    """A layout-free checkpoint with `saved` vocabulary rows read into a model with `padded`: weights and Adam moments
    alike keep the rows both have, and start new rows at zero (the path a resume takes, layout_state.fill)."""
    gen = torch.Generator().manual_seed(0)
    weights = {EMBED: torch.randn(saved, 8, generator=gen), "head.weight": torch.randn(saved, 8, generator=gen),
               "final_norm.weight": torch.randn(8, generator=gen)}
    moments = {key: {name: torch.rand(t.shape, generator=gen) for name, t in weights.items()}
               for key in ("exp_avg", "exp_avg_sq")}
    writer = OfflineWriter(tmp_path)
    writer.add(StageShard(0, 1, 0, 1), 3.0, {"iteration": 3}, weights, moments)
    writer.finish({"tp": 1, "pp": 1, "dp": 1})
    loaded = {kind: {name: torch.full(((padded, 8) if name in VOCAB_ROWS else t.shape), 7.0)
                     for name, t in weights.items()} for kind in ("weight", *moments)}
    ranges = []
    for name, t in weights.items():
        shape = tuple(loaded["weight"][name].shape)
        rows, cols = (shape[0], 8) if len(shape) == 2 else (1, shape[0])
        ranges.append(FlatRange(name, shape, Rect(0, rows, 0, cols), 0, rows * cols,
                                {kind: loaded[kind][name].view(-1) for kind in loaded}))
    fill(open_source(tmp_path), ranges, resizable_rows=frozenset(VOCAB_ROWS))
    kept = min(saved, padded)
    for before, after in [(weights, loaded["weight"]), *((moments[k], loaded[k]) for k in moments)]:
        assert torch.equal(after["final_norm.weight"], before["final_norm.weight"])
        for name in (EMBED, "head.weight"):
            assert after[name].shape == (padded, 8)
            assert torch.equal(after[name][:kept], before[name][:kept])
            assert not after[name][kept:].any()


def test_gradient_norm_of_a_gpt2_embedding_is_the_same_whole_or_split_over_tp():
    """The squares of a 50304 x 64 gradient (GPT-2's embedding at tp1), and of its two tp halves summed, agree with
    the fp64 reference to 1e-7; torch's float32 CPU norm misses it by ~1e-4 here (pytorch/pytorch#169237)."""
    gen = torch.Generator().manual_seed(0)
    # Like a tied embedding's gradient: softmax terms on every row, larger rows where tokens occurred.
    grad = torch.rand(50304, 64, generator=gen) * 2e-5
    grad[torch.randint(0, 50304, (500,), generator=gen)] += torch.randn(500, 64, generator=gen) * 1e-2
    reference = grad.double().pow(2).sum()
    halves = squared_norm(grad[:25152]) + squared_norm(grad[25152:])
    assert float(abs(squared_norm(grad) - reference) / reference) < 1e-7
    assert float(abs(halves - reference) / reference) < 1e-7
    assert float(abs(grad.norm().double() ** 2 - reference) / reference) > 1e-5  # what it replaces

    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros_like(grad))
    module.weight.grad = grad.clone()
    clipper = GradNormClipper(topo=None, max_norm=0.05)  # the single-rank / data-parallel engine's clipper
    clipper.measure(module)
    assert clipper.last_norm == pytest.approx(float(reference.sqrt()), rel=1e-7)
    clipper.clip(module)
    assert float(squared_norm(module.weight.grad).sqrt()) == pytest.approx(0.05, rel=1e-5)

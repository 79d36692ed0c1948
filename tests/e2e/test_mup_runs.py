"""muP through `deepy train`, in gpt-neox's order (README-MUP): save_base_shapes, coord_check, then training.

The two modes write their files and end the run normally (exit 0, no checkpoint); the training run reads the base
shapes at start, and its checkpoint loads back as a muP model.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import mup
import pytest
import torch

from neox.checkpoint import load_model
from tests.e2e.train_helpers import deepy_train, preprocess_kjv, read_metrics, train_losses, write_config

pytestmark = pytest.mark.slow

# One attention head: gpt-neox's coord-check widths heads x 2^2..2^8 are then 8..256 (4 has no room for rotary
# dims), small enough for a CPU.
MUP_KEYS = {"num_attention_heads": 1, "use-mup": True, "train_iters": 4, "eval_iters": 0, "lr_decay_iters": 4}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mup")


@pytest.fixture(scope="module")
def model_config(work) -> Path:
    return write_config(work / "mup.yml", preprocess_kjv(work / "data"), base_shapes_file=str(work / "base.bsh"),
                        **MUP_KEYS)


@pytest.fixture(scope="module")
def base_shapes(work, model_config) -> Path:
    launch = deepy_train(work / "save", model_config, extra={"save_base_shapes": True})
    assert "save_base_shapes: wrote" in launch.output
    assert not launch.save_dir.exists() or not any(launch.save_dir.glob("global_step*"))  # nothing trained
    return work / "base.bsh"


def test_save_base_shapes_writes_mups_file(base_shapes) -> None:
    shapes = {k: v.base_shape() for k, v in mup.load_base_shapes(str(base_shapes)).items()}
    assert shapes["embedding.word_embeddings.weight"] == [None, 64]
    assert shapes["blocks.1.attention.query_key_value.weight"] == [192, 64]
    assert shapes["blocks.0.mlp.linear2.weight"] == [64, 256]
    assert len(shapes) == 2 * 12 + 3  # 12 per block, embedding and the final norm's two


def test_coord_check_writes_csv_and_plots(work, model_config, base_shapes) -> None:
    launch = deepy_train(work / "coord", model_config, extra={"coord_check": True})
    assert "coord_check: widths [8, 16, 32, 64, 128, 256]" in launch.output
    assert not any(launch.save_dir.glob("global_step*"))  # nothing trained
    for name in ("coord_check_up.jpg", "coord_check_sp.jpg"):
        assert (launch.log_dir / name).read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG
    with open(launch.log_dir / "coord_check.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    l1 = {(r["parametrization"], int(r["width"]), r["module"], int(r["t"])): float(r["l1"]) for r in rows}
    assert len({k[1] for k in l1}) == 6 and {k[3] for k in l1} == {1, 2, 3, 4}
    assert all(math.isfinite(v) for v in l1.values())
    # From the base width 64 to 4x it, after 3 steps the blocks' outputs are flat in muP and grow in standard
    # parametrisation (measured: muP 0.85 and 0.96, SP 5.8 and 8.0).
    for module in ("blocks.0", "blocks.1"):
        mup_growth = l1[("mup", 256, module, 4)] / l1[("mup", 64, module, 4)]
        sp_growth = l1[("sp", 256, module, 4)] / l1[("sp", 64, module, 4)]
        assert 0.6 < mup_growth < 1.5 and sp_growth > 3.0, (module, mup_growth, sp_growth)


def test_training_reads_the_base_shapes_and_saves_a_mup_model(work, model_config, base_shapes) -> None:
    # Twice the base width: width_mult 2 (hidden matrices at lr / 2, readout input / 2).
    launch = deepy_train(work / "train", model_config, extra={"hidden_size": 128})
    losses = train_losses(read_metrics(launch.log_dir))
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    model, cfg, _ = load_model(launch.save_dir)
    assert cfg.mup.use_mup and model.mup is not None and model.mup.enabled
    assert model.mup_widths["blocks.0.attention.query_key_value.weight"].width_mult == 2.0
    assert model.blocks[0].attention.softmax_scale == pytest.approx(1 / 128)  # 1 / head_dim, not 1 / sqrt(head_dim)
    assert torch.isfinite(model(torch.arange(16)[None])).all()

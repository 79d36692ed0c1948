import json
import math

import pytest

from neox.train.flops import matmul_params, measure_peak_flops, train_flops_per_token
from neox.train.metrics import build_sinks
from neox.train.schedule import LRSchedule, warmup_iters_from_fraction


def test_warmup_is_linear_and_reaches_max():
    s = LRSchedule(max_lr=1e-3, min_lr=1e-4, warmup_iters=10, decay_iters=100, decay_style="cosine")
    assert [s.lr_at(i) for i in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])


def test_cosine_midpoint_and_floor():
    s = LRSchedule(max_lr=1e-3, min_lr=1e-4, warmup_iters=10, decay_iters=110, decay_style="cosine")
    assert s.lr_at(10) == pytest.approx(1e-3)
    assert s.lr_at(60) == pytest.approx((1e-3 + 1e-4) / 2)
    assert s.lr_at(85) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert s.lr_at(110) == pytest.approx(1e-4)
    assert s.lr_at(10_000) == pytest.approx(1e-4)


def test_linear_and_constant():
    lin = LRSchedule(max_lr=2.0, min_lr=0.0, warmup_iters=0, decay_iters=4, decay_style="linear")
    assert [lin.lr_at(i) for i in range(6)] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0, 0.0])
    const = LRSchedule(max_lr=2.0, min_lr=0.0, warmup_iters=2, decay_iters=4, decay_style="constant")
    assert [const.lr_at(i) for i in range(5)] == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.0])


def test_schedule_errors():
    with pytest.raises(ValueError, match="lr_decay_style"):
        LRSchedule(1.0, 0.0, 0, 10, "inverse_sqrt")
    with pytest.raises(ValueError, match="min_lr"):
        LRSchedule(1.0, 2.0, 0, 10)
    with pytest.raises(ValueError, match="warmup"):
        warmup_iters_from_fraction(1.5, 100)
    assert warmup_iters_from_fraction(0.01, 320000) == 3200


def test_flops_formula():
    # 2 layers, d=64, s=128, tied head over a 1000-row vocab, 200k params in all
    n = matmul_params(200_000, vocab_rows=1000, hidden_size=64, tied_head=True)
    assert n == 200_000
    untied = matmul_params(264_000, vocab_rows=1000, hidden_size=64, tied_head=False, learned_pos_rows=128)
    assert untied == 264_000 - 64_000 - 128 * 64
    assert train_flops_per_token(n, 2, 64, 128) == 6 * 200_000 + 12 * 2 * 64 * 128


def test_peak_probe_is_plausible():
    flops = measure_peak_flops(size=256, seconds=0.05)
    assert 1e8 < flops < 1e14


def test_jsonl_and_tensorboard_sinks(tmp_path):
    sinks = build_sinks(tmp_path / "logs", tensorboard_dir=tmp_path / "tb", console=False)
    sinks.write({"iteration": 1, "lm_loss": 3.5, "lr": 1e-3})
    sinks.write({"iteration": 2, "lm_loss": 3.25, "lr": 1e-3, "valid_loss": float("nan")})
    sinks.close()
    lines = [json.loads(l) for l in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [l["lm_loss"] for l in lines] == [3.5, 3.25]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("lm_loss")] == [(1, 3.5), (2, 3.25)]
    assert "valid_loss" not in acc.Tags()["scalars"]  # NaN is not plotted


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(RuntimeError, match="pip install wandb"):
        build_sinks(None, wandb_project="proj", console=False)

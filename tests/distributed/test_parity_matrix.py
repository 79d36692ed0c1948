"""The parity matrix: every (dp, tp, pp, ZeRO) layout trains like one rank, through `deepy train` as a user runs it.

Same seed, data, global batch (8 sequences), fp32, dropout 0, 20 steps with gradient clipping 1.0 on the tiny
2-layer / hidden-64 / char-level model of tests/e2e/train_helpers.py. The per-step lm_loss of each layout must
agree with dp=1 within 1e-5 relative; the layout change trains at tp2 x pp2, resumes at tp1 (and back), and from
ZeRO-1 into ZeRO-3 and into bf16's ZeRO-0 optimizers, and must continue like the run that never changed layout
(weights, Adam moments and step count carried over).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import subprocess
import sys

import pytest
import torch

from neox.checkpoint.consolidated import consolidate
from neox.checkpoint.layout_state import consolidated_weights, read_layout_free_state
from neox.parallel.sharding import shard_tensor
from tests.conftest import REPO_ROOT
from tests.e2e.train_helpers import Launch, deepy_train, max_relative_diff, preprocess_kjv, write_config

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
# name -> (ranks, ZeRO stage, overrides). Global batch 8 = micro 2 x accum x dp.
LAYOUTS: dict[str, tuple[int, int, dict]] = {
    "dp2-zero0": (2, 0, {"gradient_accumulation_steps": 2}),
    "dp2-zero1": (2, 1, {"gradient_accumulation_steps": 2}),
    "dp2-zero2": (2, 2, {"gradient_accumulation_steps": 2}),
    "dp2-zero3": (2, 3, {"gradient_accumulation_steps": 2}),
    "tp2": (2, 0, {"model_parallel_size": 2}),
    # pp2 also recomputes activations and balances transformer layers; pp2xtp2 splits layers uniformly.
    "pp2": (2, 0, {"pipe_parallel_size": 2, "checkpoint_activations": True,
                   "pipe_partition_method": "type:transformer"}),
    "tp2xdp2-zero1": (4, 1, {"model_parallel_size": 2, "gradient_accumulation_steps": 2}),
    "pp2xdp2-zero1": (4, 1, {"pipe_parallel_size": 2, "gradient_accumulation_steps": 2}),
    "pp2xtp2": (4, 0, {"pipe_parallel_size": 2, "model_parallel_size": 2, "pipe_partition_method": "uniform"}),
}
TP2_PP2 = {"pipe_parallel_size": 2, "model_parallel_size": 2}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("parity")


@pytest.fixture(scope="module")
def model_config(work) -> Path:
    return write_config(work / "tiny_parity.yml", preprocess_kjv(work / "data"))


@pytest.fixture(scope="module")
def reference(work, model_config) -> Launch:
    """dp=1, ZeRO 0, 20 steps, a checkpoint at 10 (the layout change resumes from it)."""
    return deepy_train(work / "reference", model_config, num_gpus=1, zero_stage=0, extra={"save_interval": 10})


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_like_one_rank(work, model_config, reference, layout):
    ranks, zero_stage, extra = LAYOUTS[layout]
    launch = deepy_train(work / layout, model_config, num_gpus=ranks, zero_stage=zero_stage, extra=extra)
    worst = max_relative_diff(reference.losses(), launch.losses())
    print(f"{layout}: worst relative lm_loss difference vs dp=1 over 20 steps = {worst:.2e}")
    assert worst < TOLERANCE
    records = [r for r in launch.records() if "lm_loss" in r]
    ref_records = [r for r in reference.records() if "lm_loss" in r]
    # The clipped global norm counts tp-replicated parameters and a pipeline's tied embedding once.
    norm_diff = max(_relative(r["grad_norm"], ref["grad_norm"]) for r, ref in zip(records, ref_records))
    assert norm_diff < 1e-4, f"grad_norm differs by {norm_diff:.2e}"
    assert [r["consumed_samples"] for r in records] == [8 * i for i in range(1, 21)]  # global batch 8 per step
    for r in records:
        assert r["tokens_per_sec_per_rank"] == pytest.approx(r["tokens_per_sec"] / ranks)
    valid = [r["valid_loss"] for r in launch.records() if "valid_loss" in r]
    ref_valid = [r["valid_loss"] for r in reference.records() if "valid_loss" in r]
    assert len(valid) == len(ref_valid) == 2
    assert max(_relative(v, rv) for v, rv in zip(valid, ref_valid)) < TOLERANCE


@pytest.fixture(scope="module")
def tp2pp2_step10(work, model_config) -> Launch:
    """tp2 x pp2, ZeRO 0, the first 10 of the reference's 20 steps."""
    return deepy_train(work / "change-tp2pp2", model_config, num_gpus=4, zero_stage=0,
                       extra={**TP2_PP2, "train_iters": 10, "save_interval": 10})


def test_layout_change_tp2_pp2_to_tp1_and_back(work, model_config, reference, tp2pp2_step10):
    ref_losses = reference.losses()
    # tp2 x pp2 for 10 steps, then resume on one rank without a pipeline.
    first = tp2pp2_step10
    # Every rank wrote its own shard of the layout-free state.
    assert sorted(p.name for p in (first.save_dir / "global_step10" / "layout_free").glob("rank*.safetensors")) == [
        f"rank{r:05d}.safetensors" for r in range(4)]
    _check_merge_against_pipeline_files(first.save_dir / "global_step10", num_layers=2, tp=2)
    resumed = deepy_train(work / "change-tp1", model_config, num_gpus=1, zero_stage=0,
                          extra={"load": str(first.save_dir)})
    assert "loaded its layout-free state" in resumed.output
    to_single = resumed.losses()
    assert sorted(to_single) == list(range(11, 21))
    worst_down = max(_relative(to_single[i], ref_losses[i]) for i in to_single)
    # The same checkpoint resumed at its own layout goes through DeepSpeed's pipeline checkpoint files instead.
    same = deepy_train(work / "change-same-tp2pp2", model_config, num_gpus=4, zero_stage=0,
                       extra={**TP2_PP2, "load": str(first.save_dir)})
    assert "layout-free" not in same.output
    worst_same = max(_relative(loss, ref_losses[i]) for i, loss in same.losses().items())
    assert sorted(same.losses()) == list(range(11, 21)) and worst_same < TOLERANCE

    # And back: the single-rank reference's step-10 checkpoint resumed at tp2 x pp2.
    load_dir = work / "reference-step10"
    shutil.copytree(reference.save_dir / "global_step10", load_dir / "global_step10")
    (load_dir / "latest").write_text("global_step10\n")
    back = deepy_train(work / "change-back-tp2pp2", model_config, num_gpus=4, zero_stage=0,
                       extra={**TP2_PP2, "load": str(load_dir)})
    to_parallel = back.losses()
    assert sorted(to_parallel) == list(range(11, 21))
    worst_up = max(_relative(to_parallel[i], ref_losses[i]) for i in to_parallel)
    print(f"layout change: tp2pp2 -> tp1 worst {worst_down:.2e}, tp1 -> tp2pp2 worst {worst_up:.2e}, "
          f"tp2pp2 -> tp2pp2 worst {worst_same:.2e}")
    assert worst_down < TOLERANCE and worst_up < TOLERANCE


def test_layout_change_carries_zero1_partitioned_adam_state(work, model_config, reference):
    """Moments sharded by ZeRO-1 over 2 replicas of a 2-stage pipeline, resumed as one tp2 replica with ZeRO-1."""
    first = deepy_train(work / "zero1-pp2xdp2", model_config, num_gpus=4, zero_stage=1,
                        extra={"pipe_parallel_size": 2, "gradient_accumulation_steps": 2, "train_iters": 10,
                               "save_interval": 10})
    resumed = deepy_train(work / "zero1-tp2", model_config, num_gpus=2, zero_stage=1,
                          extra={"model_parallel_size": 2, "load": str(first.save_dir)})
    losses, ref_losses = resumed.losses(), reference.losses()
    assert sorted(losses) == list(range(11, 21))
    worst = max(_relative(losses[i], ref_losses[i]) for i in losses)
    # Into ZeRO-3, which keeps weights and Adam state in per-parameter partitions over dp.
    zero3 = deepy_train(work / "zero1-to-dp2-zero3", model_config, num_gpus=2, zero_stage=3,
                        extra={"gradient_accumulation_steps": 2, "load": str(first.save_dir)})
    assert "loaded its layout-free state" in zero3.output
    assert sorted(zero3.losses()) == list(range(11, 21))
    worst_zero3 = max(_relative(loss, ref_losses[i]) for i, loss in zero3.losses().items())
    print(f"layout change pp2xdp2-zero1 -> tp2-zero1: worst {worst:.2e}; -> dp2-zero3: worst {worst_zero3:.2e}")
    assert worst < TOLERANCE and worst_zero3 < TOLERANCE


BF16 = {"precision": "bfloat16", "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1}


def test_layout_change_into_bf16_zero0_loads_the_fp32_masters_and_moments(work, model_config):
    """bf16 ZeRO-1 at step 10 resumed at bf16 ZeRO-0: DeepSpeed's unfused optimizer (one rank) and its bf16
    optimizer (a pipeline), which both step fp32 copies of the bf16 weights. The first resumed step sees the very
    bf16 weights (equal loss), the second the first Adam update from the carried moments and step count; after that
    the optimizers differ from ZeRO-1 only in bf16 rounding (measured <= 4e-5)."""
    reference = deepy_train(work / "bf16-zero1", model_config, num_gpus=1, zero_stage=1,
                            extra={**BF16, "save_interval": 10})
    ref_losses = reference.losses()
    load_dir = work / "bf16-zero1-step10"
    shutil.copytree(reference.save_dir / "global_step10", load_dir / "global_step10")
    (load_dir / "latest").write_text("global_step10\n")
    for name, ranks, extra in (("bf16-zero0", 1, {}), ("bf16-zero0-pp2", 2, {"pipe_parallel_size": 2})):
        resumed = deepy_train(work / name, model_config, num_gpus=ranks, zero_stage=0,
                              extra={**BF16, **extra, "load": str(load_dir)})
        assert "loaded its layout-free state" in resumed.output
        losses = resumed.losses()
        assert sorted(losses) == list(range(11, 21))
        diffs = {i: _relative(loss, ref_losses[i]) for i, loss in losses.items()}
        print(f"layout change bf16 zero1 -> {name}: step 11 {diffs[11]:.1e}, step 12 {diffs[12]:.1e}, "
              f"worst {max(diffs.values()):.2e}")
        assert diffs[11] == 0.0 and diffs[12] < 2e-5 and max(diffs.values()) < 1e-4, name


def _check_merge_against_pipeline_files(ckpt_dir: Path, num_layers: int, tp: int) -> None:
    """The merged layout-free weights, re-sharded, equal what DeepSpeed itself saved for every layer and tp rank."""
    merged = consolidated_weights(ckpt_dir, tied_head=True)
    expected_names = set(merged)
    seen = set()
    for layer in range(num_layers + 2):  # embedding, blocks, final norm (the tied head has no file of its own)
        for rank in range(tp):
            saved = torch.load(ckpt_dir / f"layer_{layer:02d}-model_{rank:02d}-model_states.pt", weights_only=True)
            for key, tensor in saved.items():
                prefix, _, rest = key.partition(".")
                name = {"embedding": key, "block": f"blocks.{layer - 1}.{rest}", "norm": f"final_norm.{rest}"}[prefix]
                assert torch.equal(shard_tensor(name, merged[name], rank, tp), tensor), (name, rank)
                seen.add(name)
    assert expected_names - seen == {"head.weight"}


def test_model_that_does_not_split_is_refused_before_launch(work, model_config):
    launch = deepy_train(work / "bad-tp", model_config, num_gpus=3, zero_stage=0,
                         extra={"model_parallel_size": 3}, check=False)
    assert launch.result.returncode == 2
    assert "model_parallel_size" in launch.output and "num_attention_heads" in launch.output
    assert "Traceback" not in launch.output


def test_tp2_with_dropout_resumes_exactly(work, model_config):
    """Attention dropout draws per-tp-rank masks from a stream derived from the saved default stream, so a run
    resumed at step 10 repeats the uninterrupted run's masks and losses bit for bit."""
    dropout = {"model_parallel_size": 2, "attention_dropout": 0.2, "hidden_dropout": 0.1}
    full = deepy_train(work / "tp2-dropout", model_config, num_gpus=2, zero_stage=0,
                       extra={**dropout, "save_interval": 10})
    load_dir = work / "tp2-dropout-step10"
    shutil.copytree(full.save_dir / "global_step10", load_dir / "global_step10")
    (load_dir / "latest").write_text("global_step10\n")
    resumed = deepy_train(work / "tp2-dropout-resumed", model_config, num_gpus=2, zero_stage=0,
                          extra={**dropout, "load": str(load_dir)})
    losses, full_losses = resumed.losses(), full.losses()
    assert sorted(losses) == list(range(11, 21))
    assert all(losses[i] == full_losses[i] for i in losses), (losses, full_losses)


def _reshard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "reshard_checkpoint.py"), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_checkpoint_without_layout_free_copy_is_resharded_offline(work, model_config, reference, tp2pp2_step10):
    """checkpoint_layout_free: false saves only DeepSpeed's files; another layout refuses them with a pointer to
    tools/reshard_checkpoint.py, which rebuilds the copy (here from tp2 ZeRO-1 partitions), and the resumed tp1 run
    continues like the run that never changed layout. The tool rebuilds exactly what training writes (checked on the
    tp2 x pp2 ZeRO-0 checkpoint, whose optimizer state is indexed by pipeline-stage parameter order)."""
    saved = deepy_train(work / "no-copy-tp2-zero1", model_config, num_gpus=2, zero_stage=1,
                        extra={"model_parallel_size": 2, "train_iters": 10, "save_interval": 10,
                               "checkpoint_layout_free": False})
    ckpt = saved.save_dir / "global_step10"
    assert (ckpt / "complete.json").is_file() and not (ckpt / "layout_free").exists()
    refused = deepy_train(work / "no-copy-refused", model_config, num_gpus=1, zero_stage=0,
                          extra={"load": str(saved.save_dir)}, check=False)
    assert refused.result.returncode == 2 and "reshard_checkpoint.py" in refused.output
    assert "Traceback" not in refused.output

    resharded = work / "no-copy-resharded"
    result = _reshard("--checkpoint", str(saved.save_dir), "--output", str(resharded))
    assert result.returncode == 0, result.stderr
    assert not (ckpt / "layout_free").exists()  # --output leaves the original untouched
    # Export / eval read the weights of a checkpoint without the copy straight from DeepSpeed's files.
    _, direct = consolidate(ckpt)
    _, via_copy = consolidate(resharded / "global_step10")
    assert sorted(direct) == sorted(via_copy) and all(torch.equal(direct[k], via_copy[k]) for k in direct)
    resumed = deepy_train(work / "no-copy-tp1", model_config, num_gpus=1, zero_stage=0,
                          extra={"load": str(resharded)})
    assert "loaded its layout-free state" in resumed.output
    losses, ref_losses = resumed.losses(), reference.losses()
    assert sorted(losses) == list(range(11, 21))
    worst = max(_relative(losses[i], ref_losses[i]) for i in losses)
    print(f"tp2-zero1 without copy, resharded offline -> tp1: worst {worst:.2e}")
    assert worst < TOLERANCE

    rebuilt_dir = work / "tp2pp2-rebuilt"
    result = _reshard("--checkpoint", str(tp2pp2_step10.save_dir), "--output", str(rebuilt_dir))
    assert result.returncode == 0, result.stderr
    want = read_layout_free_state(tp2pp2_step10.save_dir / "global_step10")
    got = read_layout_free_state(rebuilt_dir / "global_step10")
    assert got.step == want.step and got.client_state == want.client_state
    assert sorted(got.weights) == sorted(want.weights) and sorted(got.moments) == ["exp_avg", "exp_avg_sq"]
    for key, tensor in want.weights.items():
        assert torch.equal(got.weights[key], tensor), key
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got.moments[moment][key], want.moments[moment][key]), (key, moment)
    again = _reshard("--checkpoint", str(rebuilt_dir))
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr

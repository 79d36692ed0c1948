"""Honest throughput and MFU: logged tokens/s are the logged steps' own speed even when evaluations and checkpoints
fall inside a log window; MFU's denominator is the datasheet peak of a known GPU (else the config's, else a
probe, labelled as measured) and metrics.jsonl says which; the FLOP count is what torch's FLOP counter counts."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from neox.data.indexed import IndexedDatasetWriter
from neox.parallel.testing import run_distributed
from neox.train.flops import PROBE_SECONDS, PROBE_SIZE, matmul_params, mfu_peak, train_flops_per_token

LOG_INTERVAL, EVAL_INTERVAL, SAVE_INTERVAL, STEPS = 10, 25, 15, 30  # log and eval as in the issue
SLOW_EVAL_S = SLOW_SAVE_S = 0.3


def _train(root: str) -> dict:
    """One rank trains STEPS steps with evaluations and checkpoints made slow; returns each step's own duration."""
    from neox.config import load_config
    from neox.parallel.runtime import Runtime
    from neox.train.run import Trainer

    config = Path(root) / "run.yml"
    cfg = load_config([config], vocab_size=512, local_gpus=1)
    trainer = Trainer(cfg, config, Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    step_seconds: list[float] = []
    saved_at: list[int] = []
    train_step, validate = trainer.train_step, trainer.validate

    def timed_step(data_iter):
        start = time.perf_counter()
        result = train_step(data_iter)
        step_seconds.append(time.perf_counter() - start)
        return result

    def slow_validate():
        record = validate()
        time.sleep(SLOW_EVAL_S)
        return record

    def slow_save():  # stands in for a checkpoint write: only its duration matters here
        time.sleep(SLOW_SAVE_S)
        trainer._last_saved = trainer.progress.iteration
        saved_at.append(trainer.progress.iteration)

    trainer.train_step, trainer.validate, trainer.save = timed_step, slow_validate, slow_save
    try:
        trainer.run()
    finally:
        trainer.close()
    records = [json.loads(line) for line in (Path(root) / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {"records": records, "step_seconds": step_seconds, "saved_at": saved_at,
            "flops_per_token": trainer.flops_per_token,
            "tokens_per_step": trainer.global_batch * cfg.model.seq_length}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("throughput")
    rng = np.random.RandomState(0)
    with IndexedDatasetWriter(root / "d", np.uint16) as writer:
        for _ in range(200):
            writer.add_document(list(rng.randint(1, 200, size=rng.randint(20, 80))) + [0])
    (root / "run.yml").write_text(yaml.safe_dump({
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "seq_length": 32,
        "max_position_embeddings": 32, "pos_emb": "rotary", "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "tokenizer_type": "CharLevelTokenizer", "precision": "fp32", "data_path": str(root / "d"),
        "split": "90,10,0", "do_test": False,
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_iters": STEPS,
        "log_interval": LOG_INTERVAL, "eval_interval": EVAL_INTERVAL, "eval_iters": 1,
        "save": str(root / "ckpt"), "save_interval": SAVE_INTERVAL, "num_workers": 0,
        "log_dir": str(root / "logs"), "optimizer": {"type": "Adam", "params": {"lr": 1.0e-3}},
        # peak_flops unset: on this CPU the MFU denominator is the probe, which the run must label as measured
    }))
    (result,) = run_distributed(_train, 1, str(root), timeout_s=180)
    return result


def test_logged_throughput_is_the_logged_steps_own_speed(run: dict) -> None:
    train = [r for r in run["records"] if "lm_loss" in r]
    assert [r["iteration"] for r in train] == [10, 20, 30]
    assert [r["iteration"] for r in run["records"] if "valid_loss" in r] == [25, 30]  # the loop's, then run()'s
    assert run["saved_at"] == [15, 30]
    steps = run["step_seconds"]
    assert len(steps) == STEPS
    # Windows 11-20 (a checkpoint after 15) and 21-30 (an evaluation after 25) hold 0.3 s pauses that take longer
    # than all their steps: counting the steps before a pause with the time after it doubled their speed.
    assert SLOW_EVAL_S > sum(steps[20:25]), "the test model's steps are too slow for the pauses to show"
    for record in train:
        window = steps[record["iteration"] - LOG_INTERVAL:record["iteration"]]
        mean = statistics.fmean(window)
        # The loop's timing of a step encloses the wrapper's: never below it, above it by the loop's own overhead
        # (generous bound: a busy machine may preempt between the two clocks).
        assert mean * (1 - 1e-9) <= record["step_time_s"] <= mean * 1.5, (record["iteration"], window)
        assert record["tokens_per_sec"] == pytest.approx(run["tokens_per_step"] / record["step_time_s"], rel=1e-9)
        assert record["tflops"] == pytest.approx(record["tokens_per_sec"] * run["flops_per_token"] / 1e12, rel=1e-9)
        assert record["mfu"] == pytest.approx(record["tflops_per_rank"] * 1e12 / _peak(run)["mfu_peak_flops"],
                                              rel=1e-9)


def test_metrics_say_where_the_mfu_peak_comes_from(run: dict) -> None:
    peak = _peak(run)
    assert peak["mfu_peak_source"] == f"measured: float32 matmul probe {PROBE_SIZE}x{PROBE_SIZE}, {PROBE_SECONDS} s"
    assert 1e8 < peak["mfu_peak_flops"] < 1e14
    assert peak["iteration"] == 0


def _peak(run: dict) -> dict:
    (peak,) = [r for r in run["records"] if "mfu_peak_source" in r]
    return peak



# --- the MFU denominator ------------------------------------------------------------------------------------------

def _no_probe(dtype: torch.dtype) -> float:
    raise AssertionError("a GPU the table knows must not be probed")


@pytest.mark.parametrize("device_name, precision, peak, entry", [
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12, "A100-80GB"),
    ("NVIDIA A100-PCIE-40GB", "fp16", 312e12, "A100-40GB"),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12, "H100-SXM"),
    ("NVIDIA H100 PCIe", "fp32", 51e12, "H100-PCIe"),
    ("Tesla V100-SXM2-32GB", "fp16", 125e12, "V100-32GB"),
])
def test_a_known_gpu_takes_its_datasheet_peak(device_name: str, precision: str, peak: float, entry: str) -> None:
    chosen = mfu_peak(None, precision, device_name, _no_probe)
    assert chosen.flops == peak
    assert chosen.source.startswith(f"datasheet: {device_name} ({entry}) {precision} {peak / 1e12:g} TFLOP/s dense")


def test_peak_flops_wins_and_the_rest_is_measured_and_labelled() -> None:
    probed: list[torch.dtype] = []

    def probe(dtype: torch.dtype) -> float:
        probed.append(dtype)
        return 2.5e12

    config = mfu_peak(7e13, "bfloat16", "NVIDIA A100-SXM4-80GB", _no_probe)
    assert (config.flops, config.source) == (7e13, "config peak_flops (7e+13 FLOP/s)")
    cpu = mfu_peak(None, "bfloat16", None, probe)
    assert (cpu.flops, cpu.source) == (2.5e12, f"measured: bfloat16 matmul probe {PROBE_SIZE}x{PROBE_SIZE}, "
                                                f"{PROBE_SECONDS} s")
    unknown = mfu_peak(None, None, "NVIDIA GeForce RTX 4090", probe)  # precision unset: fp32
    assert unknown.flops == 2.5e12 and unknown.source.startswith("measured: float32 matmul probe")
    assert "'NVIDIA GeForce RTX 4090', which neox/train/accelerators.py does not list: set peak_flops" in unknown.source
    no_bf16 = mfu_peak(None, "bfloat16", "Tesla V100-SXM2-32GB", probe)
    assert no_bf16.flops == 2.5e12 and "gives no bfloat16 peak" in no_bf16.source
    assert probed == [torch.bfloat16, torch.float32, torch.bfloat16]


# --- the FLOP count -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [
    {"pos_emb": "rotary", "no_weight_tying": False, "activation": "gelu"},
    {"pos_emb": "learned", "no_weight_tying": True, "activation": "swiglu", "num_kv_heads": 2},
], ids=["tied-rotary-gelu", "untied-learned-swiglu-gqa"])
def test_flops_per_token_is_what_torch_counts_on_a_real_forward_and_backward(shape: dict) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from neox.config.model import ModelConfig
    from neox.model import GPTNeoX, causal_lm_loss

    layers, hidden, seq, vocab, batch = 2, 64, 64, 512, 2
    cfg = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=4, seq_length=seq,
                      max_position_embeddings=seq, padded_vocab_size=vocab, hidden_dropout=0.0,
                      attention_dropout=0.0, **shape)
    torch.manual_seed(0)
    model = GPTNeoX(cfg)
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    counter = FlopCounterMode(display=False)
    # The math kernel spells attention as matmuls, which the counter sees; CPU's fused SDPA kernel it does not know.
    with counter, sdpa_kernel(SDPBackend.MATH):
        logits = model(tokens[:, :-1])
        causal_lm_loss(logits, tokens[:, 1:], torch.ones(batch, seq)).backward()
    counted = counter.get_total_flops() / (batch * seq)

    total = sum(p.numel() for p in model.parameters())
    n = matmul_params(total, vocab, hidden, tied_head=not cfg.no_weight_tying,
                      learned_pos_rows=seq if cfg.pos_emb == "learned" else 0)
    formula = train_flops_per_token(n, layers, hidden, seq)
    assert formula == pytest.approx(counted, rel=0.02)
    # The whole gap: 6 FLOPs a token for each bias and norm gain, which N holds (PaLM's convention) and the counter,
    # counting matmuls only, does not see.
    vectors = sum(p.numel() for p in model.parameters() if p.ndim == 1)
    assert formula - 6 * vectors == counted

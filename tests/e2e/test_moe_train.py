"""A mixture-of-experts config trains through `deepy train` as a user runs it (one rank): metrics.jsonl carries the
router losses and each MoE layer's expert load beside lm_loss, and MFU counts FLOPs from the active parameters (the
k routed experts of E), the figure `deepy plan` prints for the same file."""
from __future__ import annotations

import re

import pytest
import torch
import yaml

from launcher import deepy
from neox.config import load_config
from neox.model import GPTNeoX
from neox.train.flops import matmul_params, train_flops_per_token
from tests.e2e.train_helpers import CPU_LAUNCH_CONFIG, deepy_train, preprocess_kjv, read_metrics, write_config

EXPERTS, TOP_K, AUX, Z = 4, 2, 0.01, 0.001
# Layer 0 is a MoE (gpt-neox counts the interval from layer 0), layer 1 keeps its dense MLP.
MOE = {"moe_num_experts": EXPERTS, "moe_top_k": TOP_K, "moe_router_type": "topk", "moe_expert_interval": 2,
       "activation": "swiglu", "moe_aux_loss_coeff": AUX, "moe_z_loss_coeff": Z, "train_iters": 3,
       "do_valid": False, "do_test": False}

pytestmark = pytest.mark.slow  # one deepy launch, ~15-20 s


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("moe-train")
    config = write_config(work / "moe.yml", preprocess_kjv(work / "data"), **MOE)
    deepy_train(work / "run", config)
    return config, work / "run" / "ckpt" / "resolved_config.yml", read_metrics(work / "run" / "logs")


def _active_params(config, resolved):
    """(all parameters, those one token uses, the config) of the model the run built, counted on the model."""
    vocab = yaml.safe_load(resolved.read_text())["config"]["model"]["padded_vocab_size"]
    cfg = load_config([config, CPU_LAUNCH_CONFIG], vocab_size=vocab)
    assert cfg.model.padded_vocab_size == vocab
    with torch.device("meta"):
        model = GPTNeoX(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    experts = model.blocks[0].mlp.experts
    per_expert = sum(p[0].numel() for p in experts.parameters())
    return total, total - (EXPERTS - TOP_K) * per_expert, cfg


def test_moe_config_trains_and_logs_router_losses_and_expert_load(run):
    _, _, records = run
    steps = [r for r in records if "lm_loss" in r]
    assert [r["iteration"] for r in steps] == [1, 2, 3]
    for r in steps:
        # lm_loss is the language-model loss alone; moe_loss is what the routers add to the objective
        assert r["moe_loss"] == pytest.approx(AUX * r["moe_aux_loss"] + Z * r["moe_z_loss"], rel=1e-6)
        assert TOP_K * 0.99 <= r["moe_aux_loss"] <= TOP_K * EXPERTS and r["moe_z_loss"] > 0
        assert r["moe_dropped_fraction"] == 0.0  # dropless by default
        assert list(r["moe_expert_load"]) == ["0"]  # layer 1 is dense
        load = r["moe_expert_load"]["0"]
        assert len(load) == EXPERTS and sum(load) == pytest.approx(1.0, abs=1e-5)
    assert steps[-1]["lm_loss"] < steps[0]["lm_loss"]


def test_mfu_counts_active_parameters_as_the_plan_does(run, capsys):
    config, resolved, records = run
    total, active, cfg = _active_params(config, resolved)
    m = cfg.model
    expected = train_flops_per_token(
        matmul_params(active, m.padded_vocab_size, m.hidden_size, tied_head=not m.no_weight_tying,
                      learned_pos_rows=m.max_positions if m.pos_emb == "learned" else 0),
        m.num_layers, m.hidden_size, m.seq_length)
    step = next(r for r in records if "lm_loss" in r)
    assert step["tflops"] * 1e12 / step["tokens_per_sec"] == pytest.approx(expected, rel=1e-6)

    assert deepy.main(["plan", str(config), str(CPU_LAUNCH_CONFIG), "--baseline_mb", "400"]) == 0
    out = capsys.readouterr().out
    assert int(re.search(r"parameters\s+([\d,]+) total", out).group(1).replace(",", "")) == total
    assert int(re.search(r"([\d,]+) active per token", out).group(1).replace(",", "")) == active
    assert "(6N active + 12 L h s" in out

"""GPT-2's vocabulary across tensor-parallel sizes, through `deepy train` as a user runs it.

The tokenizer's 50258 ids (HFGPT2Tokenizer) pad to 50304 rows at tp1 and 50432 at tp2. One tp1 run (2 layers,
hidden 64, gradient clipping 0.05, 6 steps, a checkpoint at step 3) is resumed at tp2, which adopts its 50304
rows and must continue it step for step, the logged grad_norm included (it once differed by 3e-4: torch's float32
CPU norm, off by a size-dependent amount on the 3.2M-entry embedding gradient and its tp halves); resumed at tp2
with 50432 rows pinned, which re-pads the weights and Adam moments; and, as a consolidated model of 50259 rows
(which tp2 cannot split), fine-tuned at tp2, whose step-0 checkpoint shows every tokenizer row loaded bit for bit.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neox.checkpoint.consolidated import consolidate, save_consolidated
from neox.checkpoint.layout_state import consolidated_weights, read_layout_free_state
from neox.config.resolved import RESOLVED_NAME, load_resolved
from tests.conftest import GPT2_MERGES, GPT2_VOCAB, REPO_ROOT
from tests.e2e.train_helpers import KJV, PREPROCESS, Launch, deepy_train, write_config

pytestmark = pytest.mark.slow

GPT2_IDS = 50258
EMBED = "embedding.word_embeddings.weight"
GPT2 = {"tokenizer_type": "HFGPT2Tokenizer", "vocab_file": str(GPT2_VOCAB), "merge_file": str(GPT2_MERGES),
        "gradient_clipping": 0.05, "train_iters": 6, "lr_decay_iters": 6, "eval_iters": 0}
TP2 = {"model_parallel_size": 2}


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _steps(launch: Launch) -> dict[int, tuple[float, float]]:
    return {r["iteration"]: (r["lm_loss"], r["grad_norm"]) for r in launch.records() if "lm_loss" in r}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vocab_layouts")


@pytest.fixture(scope="module")
def model_config(work) -> Path:
    prefix = work / "data" / "kjv"
    prefix.parent.mkdir()
    subprocess.run([sys.executable, str(PREPROCESS), "--input", str(KJV), "--output-prefix", str(prefix),
                    "--tokenizer-type", "HFGPT2Tokenizer", "--vocab-file", str(GPT2_VOCAB), "--merge-file",
                    str(GPT2_MERGES), "--append-eod"], cwd=REPO_ROOT, check=True, capture_output=True, timeout=120)
    return write_config(work / "gpt2.yml", Path(f"{prefix}_text_document"), **GPT2)


@pytest.fixture(scope="module")
def reference(work, model_config) -> Launch:
    return deepy_train(work / "tp1", model_config, num_gpus=1, extra={"save_interval": 3})


@pytest.fixture(scope="module")
def step3(work, reference) -> Path:
    """The reference's step-3 checkpoint alone in a save directory (its `latest` names step 6)."""
    load_dir = work / "tp1-step3"
    shutil.copytree(reference.save_dir / "global_step3", load_dir / "global_step3")
    (load_dir / "latest").write_text("global_step3\n")
    assert load_resolved(load_dir / "global_step3" / "config.yml").model.padded_vocab_size == 50304
    return load_dir


def test_tp2_adopts_the_tp1_padding_and_continues_the_run(work, model_config, reference, step3):
    resumed = deepy_train(work / "tp2-adopt", model_config, num_gpus=2, extra={**TP2, "load": str(step3)})
    notes = [line for line in resumed.output.splitlines() if "adopted" in line]
    assert notes == [f"deepy: padded_vocab_size 50304 adopted from checkpoint {step3 / 'global_step3'} "
                     "(model_parallel_size 2 divides it; this config alone would pad to 50432)"]
    resolved = load_resolved(resumed.save_dir / RESOLVED_NAME)
    assert resolved.model.padded_vocab_size == 50304
    assert resolved.provenance["padded_vocab_size"].startswith("derived: adopted from checkpoint")
    assert load_resolved(resumed.save_dir / "global_step6" / "config.yml").model.padded_vocab_size == 50304
    ref, tp2 = _steps(reference), _steps(resumed)
    assert sorted(tp2) == [4, 5, 6]
    loss_diff = max(_relative(tp2[i][0], ref[i][0]) for i in tp2)
    norm_diff = max(_relative(tp2[i][1], ref[i][1]) for i in tp2)
    print(f"tp1 -> tp2 (50304 rows adopted): worst relative lm_loss {loss_diff:.1e}, grad_norm {norm_diff:.1e}")
    assert loss_diff < 1e-6 and norm_diff < 1e-6


def test_tp2_with_pinned_padding_repads_weights_and_moments(work, model_config, reference, step3):
    resumed = deepy_train(work / "tp2-pinned", model_config, num_gpus=2,
                          extra={**TP2, "load": str(step3), "padded_vocab_size": 50432})
    assert ("vocabulary re-padded from the checkpoint's 50304 rows to 50432 (the config's padded_vocab_size is "
            "50432): the tokenizer's 50258 rows load unchanged, rows 50304..50431 start at zero") in resumed.output
    assert "adopted" not in resumed.output
    saved = read_layout_free_state(resumed.save_dir / "global_step6")
    assert saved.weights[EMBED].shape == (50432, 64) and saved.moments["exp_avg_sq"][EMBED].shape == (50432, 64)
    assert saved.step == 6  # the optimizer resumed at its step 3, not afresh
    # 128 more rows of logit 0 in the softmax: close to the run that kept 50304 rows, not equal to it (measured
    # 3.0e-4..3.2e-4; without the carried Adam moments, no_load_optim, 2.6e-3 at step 5 and 1.1e-2 at step 6).
    ref, tp2 = _steps(reference), _steps(resumed)
    diffs = [_relative(tp2[i][0], ref[i][0]) for i in (4, 5, 6)]
    print(f"tp1 -> tp2 re-padded to 50432 rows: relative lm_loss difference at steps 4-6 {diffs}")
    assert 0 < max(diffs) < 1e-3


def test_tp2_finetunes_from_a_consolidated_model_tp2_cannot_split(work, model_config, step3):
    cfg, weights = consolidate(step3 / "global_step3")
    cfg.model.padded_vocab_size = 50259  # odd: not a multiple of 2
    odd = {name: t[:50259] if t.shape[0] == 50304 else t for name, t in weights.items()}
    model_dir = save_consolidated(work / "odd-model", cfg, odd, [GPT2_VOCAB, GPT2_MERGES])
    finetuned = deepy_train(work / "tp2-finetune", model_config, num_gpus=2,
                            extra={**TP2, "load": str(model_dir), "finetune": True, "train_iters": 1,
                                   "extra_save_iters": [0]})
    assert ("vocabulary re-padded from the checkpoint's 50259 rows to 50432 (model_parallel_size 2 does not divide "
            "50259): the tokenizer's 50258 rows load unchanged, rows 50259..50431 start at zero") in finetuned.output
    # The tp2 model's weights before its first step, saved from its two shards.
    start = consolidated_weights(finetuned.save_dir / "global_step0", tied_head=True)
    assert start[EMBED].shape == (50432, 64)
    assert torch.equal(start[EMBED][:50259], weights[EMBED][:50259])  # GPT-2's rows and the old padding row
    assert not start[EMBED][50259:].any()
    assert all(torch.equal(start[name], weights[name]) for name in weights if name not in (EMBED, "head.weight"))

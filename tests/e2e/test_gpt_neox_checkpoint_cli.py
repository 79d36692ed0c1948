"""gpt-neox checkpoints through the CLI, as a gpt-neox user runs them: the checkpoint's own configs/ YAML plus a small
setup file. `deepy train` fine-tunes one (tp2, pipeline layout, at tp1 on one rank), `deepy eval` and
`deepy generate` read others (tp2 sequential layout; tp2 grouped-query Llama) and agree with the transformers model
the checkpoint was written from (tests/gpt_neox_fixture.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from neox.checkpoint import load_model
from neox.checkpoint.gpt_neox import open_gpt_neox_checkpoint
from tests.e2e.train_helpers import DEEPY, LAUNCH_TIMEOUT_S, REPO_ROOT, free_port, preprocess_kjv, read_metrics
from tests.gpt_neox_fixture import LLAMA_GQA, PYTHIA, source_model, write_checkpoint

pytestmark = pytest.mark.slow

# One rank on CPU: gloo, no fp16 / bf16 (refused on CPU), no ZeRO; everything else is the checkpoint's own config.
ONE_CPU_RANK = {"num_gpus": 1, "model-parallel-size": 1, "distributed-backend": "gloo", "fp16": {"enabled": False},
                "bf16": {"enabled": False}, "zero_optimization": {"stage": 0}, "peak_flops": 1.0e11}
DOCUMENTS = ["In the beginning God created the heaven and the earth.",
             "And the earth was without form, and void; and darkness was upon the face of the deep.",
             "And God said, Let there be light: and there was light."]
PROMPTS = ["In the beginning", "And God said"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpt_neox_cli")


def gpt_neox_save(work: Path, arch, layout: str) -> tuple[Path, object]:
    """A tp2 gpt-neox save directory of `arch` and the transformers model it was written from."""
    source = source_model(arch, 2)
    save_dir = work / f"{arch.name}_{layout}"
    write_checkpoint(save_dir, arch, source, 2, layout)
    return save_dir, source


def deepy(command: str, work: Path, save_dir: Path, setup: dict, *args: str) -> subprocess.CompletedProcess:
    """`deepy.py COMMAND global_stepN/configs/ARCH.yml setup.yml ...`: the config gpt-neox trained with."""
    (config,) = [p for p in (save_dir / "global_step100" / "configs").iterdir() if p.name != "local_setup.yml"]
    setup_file = work / f"{command}_setup.yml"
    setup_file.write_text(yaml.safe_dump({**ONE_CPU_RANK, "load": str(save_dir), **setup}))
    argv = [sys.executable, str(DEEPY), command, str(config), str(setup_file), "--master_port", str(free_port()),
            *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return result


def test_finetune_starts_from_the_gpt_neox_weights(work):
    save_dir, _ = gpt_neox_save(work, PYTHIA, "pipeline")
    source = open_gpt_neox_checkpoint(save_dir).weights()
    run = work / "finetune"
    result = deepy("train", work, save_dir, {
        "data-path": str(preprocess_kjv(work / "data")), "finetune": True, "save": str(run / "ckpt"),
        "log-dir": str(run / "logs"), "train-iters": 4, "log-interval": 1, "eval-iters": 0})
    output = result.stdout + result.stderr
    assert f"loaded gpt-neox checkpoint {save_dir / 'global_step100'}: weights only (finetune)" in output
    losses = [r["lm_loss"] for r in read_metrics(run / "logs") if "lm_loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    model, cfg, _ = load_model(run / "ckpt")
    assert cfg.model.padded_vocab_size == 640  # its tp2 padding, kept at tp1 (where the config alone pads to 560)
    trained = model.state_dict()
    moved = max(float((trained[k] - v).abs().max()) for k, v in source.items())
    # 4 Adam steps at lr <= 6e-4 move each weight by a few 1e-3; a fresh initialisation would be ~1 away.
    assert 0 < moved < 0.02, moved
    assert max(float(v.abs().max()) for v in source.values()) > 1


def test_eval_perplexity_equals_the_source_model(work):
    save_dir, source = gpt_neox_save(work, PYTHIA, "sequential")
    text = work / "eval_docs.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    deepy("eval", work, save_dir, {"eval_tasks": ["perplexity"], "eval_perplexity_splits": [],
                                   "eval_perplexity_files": [str(text)], "log-dir": str(work / "eval")})
    (results_file,) = (work / "eval").glob("eval_results_*.json")
    document = json.loads(results_file.read_text())
    assert document["neox"]["iteration"] == 100
    (scored,) = document["perplexity"]
    # The same windows through transformers: the documents' bytes, each followed by eod (0), cut into windows of
    # seq_length + 1 = 65 tokens overlapping by one; every token but the first predicted once, over the 512 ids.
    stream = torch.tensor([t for d in DOCUMENTS for t in [*d.encode(), 0]])
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, 64):
            window = stream[start:start + 65]
            logits = source(window[None, :-1]).logits[0, :, :512]
            nll += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
            count += len(window) - 1
    assert scored["tokens"] == count == len(stream) - 1
    assert scored["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_generate_continues_as_the_source_model_greedily(work):
    save_dir, source = gpt_neox_save(work, LLAMA_GQA, "pipeline")
    prompts, out = work / "prompts.txt", work / "samples.jsonl"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    deepy("generate", work, save_dir, {"maximum_tokens": 8}, "-i", str(prompts), "-o", str(out))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    for prompt, record in zip(PROMPTS, records):
        tokens = list(prompt.encode())
        with torch.no_grad():
            for _ in range(8):  # greedy over the tokenizer's 512 ids (the padded rows are never sampled)
                tokens.append(int(source(torch.tensor([tokens])).logits[0, -1, :512].argmax()))
                if tokens[-1] == 0:
                    break
        assert record["tokens"] == tokens[len(prompt.encode()):], (prompt, record)

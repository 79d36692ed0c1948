"""gpt-neox's command lines, unchanged: `./deepy.py generate.py CONFIG -i PROMPTS -o OUT` and `./deepy.py eval.py`
on a model converted from Hugging Face (no training key anywhere), and `./deepy.py train.py -d configs ...` on
gpt-neox's own Pythia-14M config."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import NEOX20B_TOKENIZER, REPO_ROOT
from tests.e2e.test_hf_convert import make_hf_model
from tests.e2e.train_helpers import LAUNCH_TIMEOUT_S, free_port

pytestmark = pytest.mark.slow

ROOT_DEEPY = REPO_ROOT / "deepy.py"  # gpt-neox's entry point name, at the top of the checkout as in gpt-neox
PROMPTS = ["In the beginning God created", "And the LORD said unto"]
NEW_TOKENS = 8


def run(argv: list[str], cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S, env=env)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, object]:
    """A tiny random GPT-NeoX from transformers, converted by tools/convert_hf_to_neox.py."""
    work = tmp_path_factory.mktemp("gpt-neox-cli")
    hf = make_hf_model(work / "hf", "GPTNeoXConfig",
                       dict(vocab_size=50304, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=256, max_position_embeddings=128, rotary_pct=0.25))
    result = run([REPO_ROOT / "tools" / "convert_hf_to_neox.py", "--hf", work / "hf", "--output", work / "neox"])
    assert result.returncode == 0, result.stderr
    return work / "neox", hf


def test_generate_py_on_a_converted_model_needs_no_training_key(converted, tmp_path):
    neox_dir, hf = converted
    model_yml = yaml.safe_load((neox_dir / "model.yml").read_text())
    assert not {"train_micro_batch_size_per_gpu", "train_batch_size", "train_iters"} & set(model_yml)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "samples.jsonl"
    result = run([ROOT_DEEPY, "generate.py", neox_dir / "model.yml", "-i", prompts, "-o", out,
                  "--maximum_tokens", str(NEW_TOKENS), "--master_port", str(free_port())])
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(NEOX20B_TOKENIZER))
    for record in records:  # greedy decoding: the same tokens as transformers' greedy generate on the same weights
        ids = torch.tensor([tokenizer.encode(record["prompt"]).ids])
        with torch.no_grad():
            expected = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert record["tokens"] == expected[: len(record["tokens"])] and record["tokens"]


def test_eval_py_on_a_converted_model_with_a_single_task_string(converted, tmp_path):
    neox_dir, _ = converted
    extra = tmp_path / "eval.yml"
    # gpt-neox configs write a list key as one string too
    extra.write_text(yaml.safe_dump({"eval_tasks": "piqa", "eval_limit": 8, "log_dir": str(tmp_path / "logs")}))
    result = run([ROOT_DEEPY, "eval.py", neox_dir / "model.yml", extra, "--master_port", str(free_port())])
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    results = list((tmp_path / "logs").glob("*eval_results*.json"))
    assert len(results) == 1
    piqa = json.loads(results[0].read_text())["results"]["piqa"]
    assert 0.0 <= piqa["acc,none"] <= 1.0


def test_train_py_runs_gpt_neox_pythia_14m_config_on_two_cpu_ranks(tmp_path):
    """pythia/14M.yml as gpt-neox ships it; only ranks, length, batch, fp16 and paths come from the command line."""
    from tests.e2e.train_helpers import PREPROCESS, KJV

    prefix = tmp_path / "data" / "kjv-neox"
    result = run([PREPROCESS, "--input", KJV, "--output-prefix", prefix, "--tokenizer-type", "HFTokenizer",
                  "--vocab-file", NEOX20B_TOKENIZER, "--append-eod"])
    assert result.returncode == 0, result.stderr
    data = f"{prefix}_text_document"
    paths = tmp_path / "paths.yml"
    paths.write_text(yaml.safe_dump({
        "train-data-paths": [data], "valid-data-paths": [data], "test-data-paths": [data],
        "vocab-file": str(NEOX20B_TOKENIZER), "save": str(tmp_path / "ckpt"), "load": str(tmp_path / "ckpt"),
        "log-dir": str(tmp_path / "logs")}))
    configs = REPO_ROOT / "tests" / "data" / "gpt_neox" / "configs"
    result = run([ROOT_DEEPY, "train.py", "-d", configs, "pythia/14M.yml", paths,
                  "--num_gpus", "2", "--train_iters", "4", "--seq_length", "64", "--train_micro_batch_size_per_gpu",
                  "2", "--fp16.enabled", "false", "--checkpoint_layout_free", "false", "--log_interval", "1",
                  "--master_port", str(free_port())])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    # save == load on a first run (deepy has created the folder for resolved_config.yml): one line, from rank 0
    assert output.count(f"load: {tmp_path / 'ckpt'} holds no checkpoint yet: starting from scratch") == 1
    # attention_config flash: SDPA's math kernel on the CPU, said once by rank 0
    assert output.count("no flash-attention kernel on the CPU; those layers run SDPA's math kernel") == 1
    # extra_save_iters [0, 1, 2, 4, ...] within 4 iterations (checkpoint_factor 1000 adds none)
    saved = sorted(int(p.name[len("global_step"):]) for p in (tmp_path / "ckpt").glob("global_step*")
                   if (p / "complete.json").is_file())
    assert saved == [0, 1, 2, 4]
    losses = [json.loads(line)["lm_loss"] for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
              if "lm_loss" in line]
    assert len(losses) == 4 and all(10.0 < loss < 11.5 for loss in losses[:1])  # ln(50304) = 10.83 at the start

"""`deepy.py generate` as a user runs it, on a checkpoint trained here by `deepy.py train`: the three modes, the
-i/-o short forms, 1 vs 2 ranks, stop strings, and errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.train_helpers import (CPU_LAUNCH_CONFIG, DEEPY, LAUNCH_TIMEOUT_S, REPO_ROOT, _cli_value,
                                     deepy_train, free_port, preprocess_kjv, write_config)

pytestmark = pytest.mark.slow

PROMPTS = ["In the beginning God", "And the LORD said unto", "Blessed are"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("generate")


@pytest.fixture(scope="module")
def model_config(work) -> Path:
    return write_config(work / "tiny.yml", preprocess_kjv(work / "data"), train_iters=8, eval_interval=8)


@pytest.fixture(scope="module")
def checkpoint(work, model_config) -> Path:
    return deepy_train(work / "train", model_config, num_gpus=1, zero_stage=0).save_dir


@pytest.fixture(scope="module")
def prompt_file(work) -> Path:
    path = work / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def deepy_generate(model_config: Path, checkpoint: Path, *args: str, num_gpus: int = 1, stdin: str | None = None,
                   **overrides) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(DEEPY), "generate", str(model_config), str(CPU_LAUNCH_CONFIG), *args,
            "--load", str(checkpoint), "--num_gpus", str(num_gpus), "--master_port", str(free_port())]
    for key, value in overrides.items():
        argv += [f"--{key}", _cli_value(value) if not isinstance(value, list) else json.dumps(value)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env,
                          input=stdin if stdin is not None else "")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]


def test_input_file_greedy_equals_in_process_decoding(work, model_config, checkpoint, prompt_file) -> None:
    out = work / "greedy.jsonl"
    result = deepy_generate(model_config, checkpoint, "-i", str(prompt_file), "-o", str(out), maximum_tokens=24,
                            generate_batch_size=2)
    _ok(result)
    records = _records(out)
    assert [r["prompt"] for r in records] == PROMPTS
    from neox.checkpoint import load_model
    from neox.generate.decode import DecodeRequest, decode

    model, cfg, tokenizer = load_model(checkpoint)
    request = DecodeRequest(max_new_tokens=24, vocab_size=tokenizer.vocab_size, eod=tokenizer.eod,
                            max_positions=cfg.model.max_positions)
    expected = decode(model.eval(), [tokenizer.encode(p) for p in PROMPTS], request)
    for record, cont in zip(records, expected):
        assert record["tokens"] == cont.tokens
        assert record["finish_reason"] == cont.finish_reason
        assert record["tokens_generated"] == len(cont.tokens) > 0
        assert record["text"] == tokenizer.decode(cont.tokens)  # the continuation only
        assert record["seconds"] > 0
    assert "3 samples" in result.stdout


# Batches of one prompt: the two data-parallel replicas of the dp2 launch each decode a share.
SAMPLING = dict(temperature=0.9, top_k=20, top_p=0.95, seed=4321, maximum_tokens=16, generate_batch_size=1)


@pytest.fixture(scope="module")
def one_rank_samples(work, model_config, checkpoint, prompt_file) -> list[list[int]]:
    out = work / "sampled_1.jsonl"
    _ok(deepy_generate(model_config, checkpoint, "-i", str(prompt_file), "-o", str(out), **SAMPLING))
    return [r["tokens"] for r in _records(out)]


# Two ranks as data-parallel replicas, as a tensor-parallel pair and as two pipeline stages (ZeRO-2 of cpu.yml
# excludes pipelines; it plays no part in generation).
LAYOUTS = {"dp2": {}, "tp2": {"model_parallel_size": 2},
           "pp2": {"pipe_parallel_size": 2, "zero_optimization.stage": 0}}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_rank_layouts_sample_what_one_rank_samples(work, model_config, checkpoint, prompt_file,
                                                       one_rank_samples, layout) -> None:
    out = work / f"sampled_{layout}.jsonl"
    _ok(deepy_generate(model_config, checkpoint, "-i", str(prompt_file), "-o", str(out), num_gpus=2,
                       **SAMPLING, **LAYOUTS[layout]))
    assert [r["tokens"] for r in _records(out)] == one_rank_samples


def test_another_seed_samples_differently(work, model_config, checkpoint, prompt_file, one_rank_samples) -> None:
    out = work / "sampled_other_seed.jsonl"
    _ok(deepy_generate(model_config, checkpoint, "-i", str(prompt_file), "-o", str(out), **{**SAMPLING, "seed": 99}))
    assert [r["tokens"] for r in _records(out)] != one_rank_samples


def test_unconditional_samples_start_from_eod(work, model_config, checkpoint) -> None:
    out = work / "unconditional.jsonl"
    _ok(deepy_generate(model_config, checkpoint, "-o", str(out), text_gen_type="unconditional", num_samples=3,
                       temperature=0.7, maximum_tokens=12))
    records = _records(out)
    assert len(records) == 3 and all(r["prompt"] == "" for r in records)
    assert len({tuple(r["tokens"]) for r in records}) == 3  # three seeds, three samples
    assert all(r["tokens_generated"] == len(r["tokens"]) <= 12 for r in records)


def test_stop_strings_cut_the_continuation_with_recompute(work, model_config, checkpoint) -> None:
    prompt = work / "one_prompt.txt"
    prompt.write_text(PROMPTS[0] + "\n", encoding="utf-8")
    free_out, stopped_out = work / "free.jsonl", work / "stopped.jsonl"
    _ok(deepy_generate(model_config, checkpoint, "-i", str(prompt), "-o", str(free_out), maximum_tokens=30))
    (free,) = _records(free_out)
    text = free["text"]
    assert len(text) >= 10, free  # training is seeded: the same checkpoint, the same greedy text, every run
    stop = text[6:8]
    _ok(deepy_generate(model_config, checkpoint, "-i", str(prompt), "-o", str(stopped_out), maximum_tokens=30,
                       recompute=True, stop_strings=[stop, "never there"]))
    (stopped,) = _records(stopped_out)
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == text[: text.index(stop)]
    assert stopped["tokens"] == free["tokens"][: stopped["tokens_generated"]]  # recompute == KV cache


def test_interactive_reads_prompts_from_stdin(work, model_config, checkpoint) -> None:
    out = work / "interactive.jsonl"
    result = deepy_generate(model_config, checkpoint, "-o", str(out), num_gpus=2, stdin="And God said\n\nThe\n",
                            text_gen_type="interactive", maximum_tokens=8)
    _ok(result)
    records = _records(out)
    assert [r["prompt"] for r in records] == ["And God said", "The"]
    for r in records:
        assert r["text"] in result.stdout


def test_missing_checkpoint_and_bad_prompts_are_clear_errors(work, model_config, prompt_file) -> None:
    missing = deepy_generate(model_config, work / "no-such-ckpt", "-i", str(prompt_file), "-o", str(work / "x.jsonl"))
    assert missing.returncode != 0
    assert "deepy: error: 'load'" in missing.stderr and "no-such-ckpt" in missing.stderr  # before any rank starts
    assert "Traceback" not in missing.stderr
    assert not (work / "x.jsonl").exists()
    no_load = subprocess.run([sys.executable, str(DEEPY), "generate", str(model_config), "-i", str(prompt_file)],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert no_load.returncode == 2 and "needs 'load'" in no_load.stderr
    assert "Traceback" not in no_load.stderr

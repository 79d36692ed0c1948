"""The eval program in one process: a consolidated char-level checkpoint, lm_eval tasks, perplexity on the
config's data split and on a file (compared with an independent computation), the results JSON, errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from launcher import deepy
from neox.checkpoint import save_consolidated
from neox.config import load_config
from neox.data.indexed import IndexedDatasetWriter
from neox.data.sources import iter_texts
from neox.eval.errors import EvalError
from neox.eval.perplexity import split_datasets
from neox.eval.run import evaluate, load_runner, run
from neox.model import GPTNeoX
from neox.parallel.runtime import Runtime
from neox.tokenizer import build_tokenizer
from tests.conftest import CORPORA

SEQ = 64
MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": SEQ,
         "max_position_embeddings": SEQ, "pos_emb": "rotary", "rotary_pct": 0.25, "gpt_j_residual": True,
         "activation": "gelu", "tokenizer_type": "CharLevelTokenizer", "precision": "fp32", "split": "90,10,0",
         "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}
CPU = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """data (40 KJV chapters, char-level), a consolidated checkpoint of a random model (iteration 12), a text file."""
    root = tmp_path_factory.mktemp("eval_run")
    tokenizer = build_tokenizer("CharLevelTokenizer")
    texts = [t[:1500] for _, t in zip(range(40), iter_texts([CORPORA / "kjv.jsonl.zst"]))]
    with IndexedDatasetWriter(root / "kjv_text_document", np.uint16) as writer:
        for text in texts:
            writer.add_document(tokenizer.encode(text) + [tokenizer.eod])
    (root / "sample.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:3]))
    config = root / "model.yml"
    config.write_text(yaml.safe_dump({**MODEL, "data_path": str(root / "kjv_text_document"),
                                      "load": str(root / "ckpt"), "log_dir": str(root / "logs")}))
    cfg = load_config([config], vocab_size=tokenizer.vocab_size)
    torch.manual_seed(3)
    model = GPTNeoX(cfg.model)
    save_consolidated(root / "ckpt", cfg, model.state_dict(), [], iteration=12)
    return root


def _config(run_dir: Path, **overrides):
    argv = [item for key, value in overrides.items() for item in (f"--{key}", json.dumps(value))]
    return load_config([run_dir / "model.yml"], argv, vocab_size=512)


def _reference_nll(model: GPTNeoX, windows: list[torch.Tensor]) -> tuple[float, int]:
    """Each window alone through the model: sum of -log p(next token), token count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(window[None, :-1])[0, :, :512].double()
            total += F.cross_entropy(logits, window[1:], reduction="sum").item()
            count += len(window) - 1
    return total, count


def test_tasks_and_perplexity_write_one_results_file(run_dir: Path, capsys) -> None:
    cfg = _config(run_dir, eval_tasks=["piqa", "arc_easy", "perplexity"], eval_limit=6, eval_batch_size=4,
                  eval_perplexity_files=[str(run_dir / "sample.jsonl")], eval_results_prefix="tiny")
    outcome = run(cfg, CPU)
    printed = capsys.readouterr().out
    assert outcome.iteration == 12 and outcome.checkpoint == run_dir / "ckpt"
    document = json.loads(outcome.results_file.read_text())
    assert outcome.results_file.parent == run_dir / "logs" and outcome.results_file.name.startswith("tiny_eval_results_")
    for task in ("piqa", "arc_easy"):
        assert 0.0 <= document["results"][task]["acc,none"] <= 1.0
        assert document["n-samples"][task]["effective"] == 6
        assert f"|{task}" in printed.replace(" ", "")
    assert document["neox"]["iteration"] == 12
    assert document["neox"]["config"]["config"]["eval"]["eval_limit"] == 6
    sources = {(p["source"], p["windows"]) for p in document["perplexity"]}
    assert sources == {("valid", 6), ("file", 6)}
    assert "perplexity" in printed and str(outcome.results_file) in printed
    assert not list((run_dir / "logs").glob(".*tmp"))


def test_file_perplexity_equals_an_independent_computation(run_dir: Path) -> None:
    cfg = _config(run_dir, eval_tasks=["perplexity"], eval_perplexity_splits=[], eval_batch_size=3,
                  eval_perplexity_files=[str(run_dir / "sample.jsonl")])
    runner, _, tokenizer, _ = load_runner(cfg, CPU)
    _, (result,), _ = evaluate(cfg, runner, tokenizer)
    stream = []
    for text in iter_texts([run_dir / "sample.jsonl"]):
        stream += tokenizer.encode(text) + [tokenizer.eod]
    stream = torch.tensor(stream)
    windows = [stream[i : i + SEQ + 1] for i in range(0, len(stream) - 1, SEQ)]
    nll, count = _reference_nll(runner.model, windows)
    assert result.tokens == count == len(stream) - 1
    assert result.windows == len(windows)
    assert result.loss == pytest.approx(nll / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_split_perplexity_predicts_each_valid_token_once(run_dir: Path) -> None:
    cfg = _config(run_dir, eval_tasks=["perplexity"], eval_perplexity_splits=["valid", "test"])
    runner, _, tokenizer, _ = load_runner(cfg, CPU)
    _, results, notes = evaluate(cfg, runner, tokenizer)
    assert [r.source for r in results] == ["valid"]
    assert len(notes) == 1 and notes[0].startswith("test split")  # split 90,10,0: no test documents
    ((_, _, dataset),), _ = split_datasets(cfg, SEQ, ["valid"])
    # the valid documents in the dataset's (shuffled) order, as one stream
    order = [int(d) for d in dataset.doc_idx[: len(np.unique(dataset.doc_idx))]]
    stream = torch.from_numpy(np.concatenate([dataset.indexed.get(d) for d in order]).astype(np.int64))
    assert len(stream) == dataset.tokens_per_epoch
    windows = [stream[i : i + SEQ + 1] for i in range(0, len(stream) - 1, SEQ)]
    nll, count = _reference_nll(runner.model, windows)
    assert results[0].tokens == count == len(stream) - 1
    assert results[0].loss == pytest.approx(nll / count, rel=1e-5)


def test_unknown_task_lists_the_offline_tasks(run_dir: Path) -> None:
    cfg = _config(run_dir, eval_tasks=["piqa", "no_such_task_xyz", "arc_eazy"])
    runner, _, tokenizer, _ = load_runner(cfg, CPU)
    with pytest.raises(EvalError) as caught:
        evaluate(cfg, runner, tokenizer)
    message = str(caught.value)
    assert "'no_such_task_xyz'" in message and "'arc_eazy' (did you mean arc_easy" in message
    assert "arc_easy, piqa" in message and "--eval_tasks_path" in message


def test_a_user_task_folder_is_loaded(run_dir: Path, tmp_path: Path) -> None:
    rows = [{"q": f"Is {n} even?", "choices": ["yes", "no"], "label": n % 2} for n in range(5)]
    (tmp_path / "even.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "even.yaml").write_text(yaml.safe_dump({
        "task": "neox_test_even", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(tmp_path / "even.jsonl")}},
        "output_type": "multiple_choice", "validation_split": "validation", "doc_to_text": "{{q}}",
        "doc_to_target": "label", "doc_to_choice": "{{choices}}", "metric_list": [{"metric": "acc"}]}))
    cfg = _config(run_dir, eval_tasks=["neox_test_even"], eval_tasks_path=[str(tmp_path)])
    runner, _, tokenizer, _ = load_runner(cfg, CPU)
    results, _, _ = evaluate(cfg, runner, tokenizer, show_progress=False)
    assert results["n-samples"]["neox_test_even"]["effective"] == 5
    missing = _config(run_dir, eval_tasks=["piqa"], eval_tasks_path=[str(tmp_path / "nope")])
    with pytest.raises(EvalError, match="is not a directory of lm_eval task YAMLs"):
        evaluate(missing, runner, tokenizer)


def test_deepy_eval_refuses_a_config_without_load_or_tasks(run_dir: Path, tmp_path: Path, capsys) -> None:
    bare = tmp_path / "bare.yml"
    bare.write_text(yaml.safe_dump(MODEL))
    assert deepy.main(["eval", str(bare), "--eval_tasks", "piqa", "arc_easy"]) == 2
    assert "eval needs 'load'" in capsys.readouterr().err
    assert deepy.main(["eval", str(run_dir / "model.yml")]) == 2
    assert "eval needs 'eval_tasks'" in capsys.readouterr().err
    assert deepy.main(["eval", str(run_dir / "model.yml"), "--eval_tasks", "piqa", "--eval_limit", "0"]) == 2
    assert "'eval_limit' must be >= 1" in capsys.readouterr().err

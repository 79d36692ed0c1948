"""Models trained here (2 ranks, ZeRO-2 and ZeRO-3) exported to Hugging Face, and an imported model fine-tuned
through `deepy train DIR/model.yml data.yml`.

ZeRO-2 trains a Pythia-style model with the GPT-2 BPE files; ZeRO-3 a Llama-style one (RMSNorm, SwiGLU, GQA) with
the NeoX-20B tokenizer.json, so both exports, both tokenizer exports and the ZeRO-3 reassembly are exercised.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zstandard

from neox.checkpoint import consolidate, find_checkpoint, load_model, read_consolidated
from neox.checkpoint.hf_export import export_to_hf
from neox.checkpoint.hf_import import ImportOptions, convert_hf_to_neox
from tests.conftest import GPT2_MERGES, GPT2_VOCAB, NEOX20B_TOKENIZER, REPO_ROOT
from tests.e2e.test_hf_convert import make_hf_model
from tests.e2e.train_helpers import KJV, PREPROCESS, Launch, deepy_train, write_config

pytestmark = pytest.mark.slow

RUN = {"train_iters": 6, "lr_decay_iters": 6, "eval_iters": 0, "save_interval": 6}
LLAMA_STYLE = {"norm": "rmsnorm", "activation": "swiglu", "num_kv_heads": 2, "rotary_pct": 1.0,
               "gpt_j_residual": False, "use_bias_in_norms": False, "use_bias_in_attn_linear": False,
               "use_bias_in_mlp": False, "no_weight_tying": True}
GPT2_TOKENIZER = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": str(GPT2_VOCAB), "merge_file": str(GPT2_MERGES)}
NEOX_TOKENIZER = {"tokenizer_type": "HFTokenizer", "vocab_file": str(NEOX20B_TOKENIZER)}
PROMPT = "And God said"


def small_corpus(path: Path, documents: int = 60) -> Path:
    """The first KJV chapters as a plain jsonl: enough to train 6 steps, quick to tokenize."""
    with open(KJV, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream:
        lines = io.TextIOWrapper(stream, encoding="utf-8")
        picked = [next(lines) for _ in range(documents)]
    path.write_text("".join(picked), encoding="utf-8")
    return path


def preprocess(corpus: Path, prefix: Path, tokenizer: dict) -> Path:
    argv = [sys.executable, str(PREPROCESS), "--input", str(corpus), "--output-prefix", str(prefix),
            "--tokenizer-type", tokenizer["tokenizer_type"], "--vocab-file", tokenizer["vocab_file"], "--append-eod"]
    if "merge_file" in tokenizer:
        argv += ["--merge-file", tokenizer["merge_file"]]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return Path(f"{prefix}_text_document")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_trained")


@pytest.fixture(scope="module")
def corpus(work) -> Path:
    return small_corpus(work / "kjv60.jsonl")


@pytest.fixture(scope="module")
def neox_data(work, corpus) -> Path:
    return preprocess(corpus, work / "kjv_neox", NEOX_TOKENIZER)


@pytest.fixture(scope="module")
def trained(work, corpus, neox_data) -> dict[str, Launch]:
    gpt2_data = preprocess(corpus, work / "kjv_gpt2", GPT2_TOKENIZER)
    pythia = write_config(work / "pythia.yml", gpt2_data, **GPT2_TOKENIZER)
    llama = write_config(work / "llama.yml", neox_data, **NEOX_TOKENIZER, **LLAMA_STYLE)
    return {"zero2": deepy_train(work / "zero2", pythia, num_gpus=2, zero_stage=2, extra=RUN),
            "zero3": deepy_train(work / "zero3", llama, num_gpus=2, zero_stage=3, extra=RUN)}


@pytest.mark.parametrize("stage,hf_class", [("zero2", "GPTNeoXForCausalLM"), ("zero3", "LlamaForCausalLM")])
def test_trained_model_exports_exactly(trained, tmp_path, stage, hf_class):
    import transformers

    save_dir = trained[stage].save_dir
    out = export_to_hf(save_dir, tmp_path / "hf", progress=False)
    assert json.loads((out / "config.json").read_text())["architectures"] == [hf_class]
    model, _, tokenizer = load_model(save_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "In the beginning God created the heaven and the earth."
    ids = tokenizer.encode(text)
    assert hf_tok(text).input_ids == ids
    tokens = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        ours = model(tokens)[..., :tokenizer.vocab_size]
        theirs = hf_model(tokens).logits
    assert theirs.shape == ours.shape and (theirs - ours).abs().max() < 1e-4
    generate = transformers.pipeline("text-generation", model=str(out), device="cpu")
    result = generate(PROMPT, max_new_tokens=8, do_sample=True, top_k=20, top_p=0.9, temperature=0.8)
    assert result[0]["generated_text"].startswith(PROMPT)
    assert len(hf_tok(result[0]["generated_text"]).input_ids) > len(hf_tok(PROMPT).input_ids)
    # greedy decoding in transformers continues as our own argmax does
    greedy = generate(PROMPT, max_new_tokens=1, do_sample=False, return_full_text=False)[0]["generated_text"]
    with torch.no_grad():
        next_id = int(model(torch.tensor([tokenizer.encode(PROMPT)]))[0, -1, :tokenizer.vocab_size].argmax())
    assert greedy == hf_tok.decode([next_id])


def test_neox_hf_neox_keeps_every_tensor(trained, tmp_path):
    """With the padded rows kept, a trained model goes to HF and back bit for bit."""
    ckpt = find_checkpoint(trained["zero3"].save_dir)
    out = export_to_hf(ckpt, tmp_path / "hf", keep_padded_vocab=True, progress=False)
    back = convert_hf_to_neox(out, tmp_path / "neox", progress=False)
    cfg, weights = consolidate(ckpt)
    cfg_back, weights_back = read_consolidated(back)
    assert set(weights) == set(weights_back)
    assert all(torch.equal(weights[k], weights_back[k]) for k in weights)
    # the same architecture (written explicitly: the MLP width as a number, not as a rule)
    for key in ("num_layers", "hidden_size", "num_attention_heads", "kv_heads", "mlp_inner_size", "rotary_ndims",
                "norm", "activation", "gpt_j_residual", "no_weight_tying", "padded_vocab_size"):
        assert getattr(cfg.model, key) == getattr(cfg_back.model, key), key


def test_finetune_starts_from_imported_weights(work, neox_data, tmp_path):
    """`deepy train DIR/model.yml data.yml`: with lr 1e-12 the fine-tuned checkpoint holds the imported weights;
    without `finetune`, or with another architecture, the trainer refuses the directory."""
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, vocab_size=50277, rotary_pct=0.25)
    make_hf_model(tmp_path / "hf", "GPTNeoXConfig", kwargs)
    imported = convert_hf_to_neox(tmp_path / "hf", tmp_path / "imported", progress=False)
    data = tmp_path / "data.yml"
    data.write_text(json.dumps({
        "data_path": str(neox_data), "seq_length": 32, "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1, "train_iters": 2, "eval_iters": 0, "log_interval": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1.0e-12}}, "min_lr": 1.0e-12, "weight_decay": 0.0,
        "peak_flops": 1.0e11, "split": "100,0,0"}))
    launch = _deepy(tmp_path / "ft", [imported / "model.yml", data])
    assert launch.returncode == 0, launch.stdout + launch.stderr
    assert "loaded consolidated model" in launch.stdout
    _, start = read_consolidated(imported)
    _, tuned = consolidate(find_checkpoint(tmp_path / "ft" / "ckpt"))
    assert set(start) == set(tuned)
    for name in start:  # Adam moves each weight by about lr; a fresh initialisation would be ~0.02 away
        assert torch.allclose(start[name], tuned[name], rtol=0, atol=1e-9), name
    refused = _deepy(tmp_path / "no-ft", [imported / "model.yml", data], "--finetune", "false")
    assert refused.returncode != 0 and "finetune: true" in refused.stderr + refused.stdout
    wrong = _deepy(tmp_path / "wrong", [imported / "model.yml", data], "--hidden_size", "64")
    assert wrong.returncode != 0 and "hidden_size" in wrong.stderr + wrong.stdout


def _deepy(run_dir: Path, configs: list[Path], *overrides: str) -> subprocess.CompletedProcess:
    from tests.e2e.train_helpers import CPU_LAUNCH_CONFIG, DEEPY, free_port

    argv = [sys.executable, str(DEEPY), "train", *map(str, configs), str(CPU_LAUNCH_CONFIG),
            "--master_port", str(free_port()), "--save", str(run_dir / "ckpt"), "--log_dir", str(run_dir / "logs"),
            *overrides]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}], ids=["tp2", "pp2"])
def test_parallel_finetune_from_import_and_export_back(neox_data, tmp_path, layout):
    """--tp 2 / --pp 2 import -> fine-tune at that layout on 2 ranks (ZeRO-1) -> the sharded checkpoint
    consolidates to the imported weights and exports to HF with the original model's logits."""
    import transformers

    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, vocab_size=50277, rotary_pct=0.25, tie_word_embeddings=False)
    hf_model = make_hf_model(tmp_path / "hf", "GPTNeoXConfig", kwargs)
    imported = convert_hf_to_neox(tmp_path / "hf", tmp_path / "imported", ImportOptions(**layout), progress=False)
    data = tmp_path / "data.yml"
    data.write_text(json.dumps({
        "data_path": str(neox_data), "seq_length": 32, "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1, "train_iters": 2, "eval_iters": 0, "log_interval": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1.0e-12}}, "min_lr": 1.0e-12, "weight_decay": 0.0,
        "peak_flops": 1.0e11, "split": "100,0,0"}))
    launch = _deepy(tmp_path / "ft", [imported / "model.yml", data], "--zero_optimization.stage", "1")
    assert launch.returncode == 0, (launch.stdout + launch.stderr)[-4000:]
    ckpt = find_checkpoint(tmp_path / "ft" / "ckpt")
    cfg, tuned = consolidate(ckpt)
    if "tp" in layout:
        assert cfg.parallel.model_parallel_size == 2 and (ckpt / "mp_rank_01_model_states.pt").is_file()
    else:
        assert cfg.parallel.pipe_parallel_size == 2 and any(ckpt.glob("layer_*-model_states.pt"))
    _, start = read_consolidated(imported)
    assert set(start) == set(tuned)
    for name in start:
        assert torch.allclose(start[name], tuned[name], rtol=0, atol=1e-9), name
    out = export_to_hf(tmp_path / "ft" / "ckpt", tmp_path / "exported", progress=False)
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch.manual_seed(0)
    tokens = torch.randint(0, 50277, (2, 24))
    with torch.no_grad():
        assert (exported(tokens).logits - hf_model(tokens).logits).abs().max() < 1e-4

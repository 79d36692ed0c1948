"""tools/convert_hf_to_neox.py and tools/convert_neox_to_hf.py on tiny random models made by transformers itself.

HF -> neox: the neox forward gives the HF logits (fp32, 1e-4); neox -> HF -> neox: identical tensors; the exported
directory loads in AutoModelForCausalLM / AutoTokenizer and gives the same logits and the same token ids.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from neox.checkpoint import load_model, read_consolidated
from neox.checkpoint.hf_export import export_to_hf
from neox.checkpoint.hf_import import ImportOptions, convert_hf_to_neox
from neox.config.errors import ConfigError
from neox.config.load import load_config
from tests.conftest import GPT2_MERGES, GPT2_VOCAB, NEOX20B_TOKENIZER, REPO_ROOT

IMPORT_TOOL = REPO_ROOT / "tools" / "convert_hf_to_neox.py"
EXPORT_TOOL = REPO_ROOT / "tools" / "convert_neox_to_hf.py"
NEOX20B_VOCAB = 50277
GPT2_VOCAB_SIZE = 50257
TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void."

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)
# (name, HF config class, kwargs): a spread of the options each architecture has.
CASES = [
    ("neox_parallel_partial_rotary_untied", "GPTNeoXConfig",
     dict(SMALL, vocab_size=NEOX20B_VOCAB, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)),
    ("neox_sequential_tied_no_attn_bias", "GPTNeoXConfig",
     dict(SMALL, vocab_size=NEOX20B_VOCAB, rotary_pct=0.5, use_parallel_residual=False, tie_word_embeddings=True,
          attention_bias=False, hidden_act="gelu_new")),
    ("llama_gqa_tied", "LlamaConfig",
     dict(SMALL, vocab_size=NEOX20B_VOCAB, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=50000.0)),
    ("llama_mha_untied_biases", "LlamaConfig",
     dict(SMALL, vocab_size=NEOX20B_VOCAB, num_key_value_heads=4, tie_word_embeddings=False, attention_bias=True,
          mlp_bias=True)),
    ("gpt2_tied", "GPT2Config",
     dict(vocab_size=GPT2_VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=96)),
]


def make_hf_model(directory: Path, config_class: str, kwargs: dict, seed: int = 0, bin_weights: bool = False,
                  shard: bool = False, weight_std: float | None = None):
    """weight_std: redraw the matrices too (a router needs logits far enough apart that float noise never swaps
    two experts, and wider logits make a logit comparison meaningful)."""
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norms and biases too, so a dropped or misplaced one changes the logits
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name or "ln_" in name else 0.0, 0.1)
            elif weight_std is not None:
                p.normal_(0.0, weight_std)
    model.save_pretrained(str(directory), **({"max_shard_size": "1MB"} if shard else {}))
    if bin_weights:  # transformers 5 writes only safetensors; an older checkpoint's pytorch_model.bin, by hand
        (directory / "model.safetensors").unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    if config_class == "GPT2Config":
        shutil.copy(GPT2_VOCAB, directory / "vocab.json")
        shutil.copy(GPT2_MERGES, directory / "merges.txt")
    else:
        shutil.copy(NEOX20B_TOKENIZER, directory / "tokenizer.json")
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def neox_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    model, _, _ = load_model(path)
    with torch.no_grad():
        return model(tokens)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, GPT2_VOCAB_SIZE, (2, 40))


@pytest.mark.parametrize("name,config_class,kwargs", CASES, ids=[c[0] for c in CASES])
def test_hf_to_neox_to_hf(tmp_path, tokens, name, config_class, kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # weights as one .bin file, as sharded safetensors with an index, or as one safetensors file
    hf_model = make_hf_model(tmp_path / "hf", config_class, kwargs, bin_weights=name.startswith("llama_mha"),
                             shard=name.startswith("gpt2"))
    if name.startswith("gpt2"):
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    if name.startswith("llama_mha"):
        assert (tmp_path / "hf" / "pytorch_model.bin").is_file()
    out = convert_hf_to_neox(tmp_path / "hf", tmp_path / "neox", progress=False)
    vocab = kwargs["vocab_size"]
    reference = hf_logits(hf_model, tokens)
    ours = neox_logits(out, tokens)
    assert ours.shape[-1] == 128 * -(-vocab // 128)  # padded; the padded rows are zero
    assert (ours[..., vocab:] == 0).all()
    assert (ours[..., :vocab] - reference).abs().max() < 1e-4
    # the tokenizer came along and encodes as the HF one does
    _, cfg, tokenizer = load_model(out)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf")) if config_class != "GPT2Config" else None
    if hf_tok is not None:
        assert tokenizer.encode(TEXT) == hf_tok(TEXT).input_ids
    # neox -> HF: same logits in transformers, and back again: identical tensors
    hf_dir = export_to_hf(out, tmp_path / "exported", progress=False)
    loaded, info = AutoModelForCausalLM.from_pretrained(str(hf_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(loaded).__name__ == type(hf_model).__name__
    assert (hf_logits(loaded.eval(), tokens) - reference).abs().max() < 1e-4
    exported_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    assert exported_tok(TEXT).input_ids == tokenizer.encode(TEXT)
    again = convert_hf_to_neox(hf_dir, tmp_path / "neox-again", progress=False)
    cfg1, w1 = read_consolidated(out)
    cfg2, w2 = read_consolidated(again)
    assert cfg1.model == cfg2.model
    assert set(w1) == set(w2) and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_tp_pp_options_write_a_layout_free_model(tmp_path, tokens):
    _, config_class, kwargs = CASES[2]
    hf_model = make_hf_model(tmp_path / "hf", config_class, kwargs)
    out = convert_hf_to_neox(tmp_path / "hf", tmp_path / "neox", ImportOptions(tp=2, pp=2, seq_length=32),
                             progress=False)
    model_yml = yaml.safe_load((out / "model.yml").read_text())
    assert model_yml["model_parallel_size"] == 2 and model_yml["pipe_parallel_size"] == 2
    assert model_yml["padded_vocab_size"] % 256 == 0 and model_yml["seq_length"] == 32
    assert model_yml["load"] == str(out) and model_yml["finetune"] is True
    assert Path(model_yml["vocab_file"]) == out / "tokenizer" / "tokenizer.json"
    # what `deepy train out/model.yml data.yml` resolves, on 4 ranks (dp 1)
    cfg = load_config([out / "model.yml"], ["--num_gpus", "4", "--train_iters", "10",
                                                  "--train_micro_batch_size_per_gpu", "2"], vocab_size=NEOX20B_VOCAB)
    assert cfg.model.padded_vocab_size == model_yml["padded_vocab_size"]
    assert (neox_logits(out, tokens)[..., :NEOX20B_VOCAB] - hf_logits(hf_model, tokens)).abs().max() < 1e-4


@pytest.mark.slow
def test_cli_round_trip_and_errors(tmp_path, tokens):
    _, config_class, kwargs = CASES[0]
    make_hf_model(tmp_path / "hf", config_class, kwargs)
    run = lambda *argv: subprocess.run([sys.executable, *map(str, argv)], cwd=REPO_ROOT, capture_output=True,
                                       text=True, timeout=300)
    result = run(IMPORT_TOOL, "--hf", tmp_path / "hf", "--output", tmp_path / "neox", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "model.yml" in result.stdout
    result = run(EXPORT_TOOL, "--checkpoint", tmp_path / "neox", "--output", tmp_path / "out", "--quiet",
                 "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["GPTNeoXForCausalLM"]
    # errors: one paragraph, exit 2, nothing left behind
    result = run(IMPORT_TOOL, "--hf", tmp_path / "nowhere", "--output", tmp_path / "x")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "nowhere" in result.stderr
    result = run(IMPORT_TOOL, "--hf", tmp_path / "hf", "--gguf-file", "missing.gguf", "--output", tmp_path / "x")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "missing.gguf" in result.stderr
    result = run(EXPORT_TOOL, "--checkpoint", tmp_path / "neox", "--arch", "llama", "--output", tmp_path / "y")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "rotary_pct" in result.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    result = run(EXPORT_TOOL, "--checkpoint", tmp_path / "neox", "--output", tmp_path / "mine")
    assert result.returncode == 2 and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_options_no_hf_class_expresses_are_refused(tmp_path):
    from neox.checkpoint.hf_export import choose_arch
    from neox.config.model import ModelConfig

    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, max_position_embeddings=16)
    assert choose_arch(ModelConfig(**base, pos_emb="rotary", norm="layernorm")) == "gpt_neox"
    assert choose_arch(ModelConfig(**base, pos_emb="rotary", norm="rmsnorm", activation="swiglu",
                                   use_bias_in_norms=False)) == "llama"
    assert choose_arch(ModelConfig(**base, pos_emb="learned", norm="layernorm")) == "gpt2"
    with pytest.raises(ConfigError, match="pos_emb: alibi"):
        choose_arch(ModelConfig(**base, pos_emb="alibi"))
    with pytest.raises(ConfigError, match="rotary_pct"):  # Llama rotates whole heads
        choose_arch(ModelConfig(**base, pos_emb="rotary", rotary_pct=0.5, norm="rmsnorm", activation="swiglu",
                                use_bias_in_norms=False))
    with pytest.raises(ConfigError, match="gpt_j_residual"):  # GPT-2 has no parallel residual
        choose_arch(ModelConfig(**base, pos_emb="learned", gpt_j_residual=True))


@pytest.mark.parametrize("example,extra", [("smollm2-135m-cpu.yml", ["configs/cpu.yml"]), ("hf-model-gpu.yml", [])])
def test_finetune_examples_resolve_on_an_imported_model(tmp_path, example, extra):
    """configs/finetune/*.yml put after an imported model.yml, as their headers say, resolve to a fine-tuning run."""
    _, config_class, kwargs = CASES[2]
    make_hf_model(tmp_path / "hf", config_class, dict(kwargs, max_position_embeddings=4096))
    out = convert_hf_to_neox(tmp_path / "hf", tmp_path / "neox", progress=False)
    files = [out / "model.yml", REPO_ROOT / "configs" / "finetune" / example, *(REPO_ROOT / e for e in extra)]
    cfg = load_config(files, vocab_size=NEOX20B_VOCAB, local_gpus=8)
    imported = read_consolidated(out)[0]
    assert cfg.train.finetune and cfg.train.load == str(out) and cfg.train.train_iters > 0
    assert cfg.model.padded_vocab_size == imported.model.padded_vocab_size
    from neox.train.run import ARCHITECTURE_KEYS

    assert all(getattr(cfg.model, k) == getattr(imported.model, k) for k in ARCHITECTURE_KEYS)

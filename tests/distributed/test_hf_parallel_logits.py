"""HF -> neox imported with --tp 2 / --pp 2, run sharded on 2 real gloo ranks: the full logits equal the Hugging Face
forward within 1e-4 (fp32), for a GPT-NeoX model (partial rotary, parallel residual, untied) and a Llama with
grouped-query attention; the vocabulary (50277) needs padding at tp 2."""
from __future__ import annotations

import shutil

import pytest
import torch

from neox.checkpoint.hf_import import ImportOptions, convert_hf_to_neox
from neox.parallel.testing import run_distributed
from tests.conftest import NEOX20B_TOKENIZER
from tests.distributed import hf_parallel_checks

VOCAB = 50277
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, tie_word_embeddings=False)
MODELS = {
    "neox": ("GPTNeoXConfig", dict(SMALL, rotary_pct=0.25, use_parallel_residual=True)),
    "llama-gqa": ("LlamaConfig", dict(SMALL, num_key_value_heads=2, rope_theta=50000.0)),
}


def make_hf_model(directory, config_class: str, kwargs: dict):
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**kwargs)).eval()
    with torch.no_grad():  # random norms and biases too, so a misplaced shard changes the logits
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(str(directory))
    shutil.copy(NEOX20B_TOKENIZER, directory / "tokenizer.json")
    return model


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 0), (1, 2)], ids=["tp2", "pp2"])
def test_imported_models_give_hf_logits_on_two_ranks(tmp_path, tp, pp):
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 24))
    reference, dirs = {}, []
    for name, (config_class, kwargs) in MODELS.items():
        hf_model = make_hf_model(tmp_path / f"hf-{name}", config_class, kwargs)
        with torch.no_grad():
            reference[name] = hf_model(tokens).logits
        dirs.append(str(convert_hf_to_neox(tmp_path / f"hf-{name}", tmp_path / name, ImportOptions(tp=tp, pp=pp),
                                           progress=False)))
    results = run_distributed(hf_parallel_checks.imported_logits, 2, dirs, tokens, timeout_s=300)
    for rank, per_model in enumerate(results):
        for name, got in per_model.items():
            assert got["layout"] == (tp, pp, "ShardedRunner"), (rank, name)
            assert got["logits"].shape == reference[name].shape
            error = float((got["logits"] - reference[name]).abs().max())
            print(f"{name} tp{tp} pp{pp} rank {rank}: max |logit - HF logit| = {error:.2e}")
            assert error < 1e-4, (rank, name, error)
            if got["last"] is not None:  # the decoder's last stage (both ranks at tp 2)
                assert float((got["last"][:, -1] - reference[name][:, -1]).abs().max()) < 1e-4, (rank, name)
    last_ranks = [rank for rank, r in enumerate(results) if r["neox"]["last"] is not None]
    assert last_ranks == ([0, 1] if tp == 2 else [1])

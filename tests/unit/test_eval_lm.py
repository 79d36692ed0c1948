"""Exactness of NeoXLM against lm_eval's own Hugging Face model (HFLM) on the same weights.

A tiny random GPT-NeoX with the GPT-2 vocabulary is exported with neox/model/hf.py (+ a tokenizer
transformers loads); both models then answer the same lm_eval requests: PIQA/ARC-Easy accuracies must be
equal to 4 decimals and every log-likelihood, rolling log-likelihood and greedy generation must agree.
"""
from __future__ import annotations

import math

import pytest
import torch
from lm_eval import evaluator
from lm_eval.api.instance import Instance

from neox.config.model import ModelConfig
from neox.eval.lm import NeoXLM
from neox.eval.runner import LocalRunner
from neox.eval.task_index import task_manager
from neox.model import GPTNeoX
from neox.model.hf import model_cfg_to_hf_config, to_hf_state_dict
from neox.tokenizer import build_tokenizer
from neox.tokenizer.bpe_files import read_bpe_files
from neox.tokenizer.bytelevel import reference_hf_tokenizer
from tests.conftest import GPT2_MERGES, GPT2_VOCAB

pytest.importorskip("accelerate", reason="lm_eval's HFLM imports accelerate (a test dependency)")
from lm_eval.models.huggingface import HFLM  # noqa: E402

SEQ = 128
LIMIT = 40
TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "In the beginning God created the heaven and the "
        "earth. And the earth was without form, and void; and darkness was upon the face of the deep. ")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tokenizer = build_tokenizer("GPT2BPETokenizer", GPT2_VOCAB, GPT2_MERGES)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=SEQ, pos_emb="rotary",
                      rotary_pct=0.25, gpt_j_residual=True, activation="gelu", padded_vocab_size=50304)
    model = GPTNeoX(cfg)
    with torch.no_grad():  # weights large enough that choices differ by more than float noise
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1)
    out = tmp_path_factory.mktemp("hf_export")
    hf_cfg = model_cfg_to_hf_config(cfg, "gpt_neox", vocab_size=tokenizer.vocab_size)
    hf_model = transformers.GPTNeoXForCausalLM(hf_cfg)
    hf_model.load_state_dict(to_hf_state_dict(cfg, model.state_dict(), "gpt_neox", vocab_size=tokenizer.vocab_size))
    hf_model.save_pretrained(out)
    # transformers 5: GPT2TokenizerFast(vocab_file=, merges_file=) builds a 1-token tokenizer; wrap a built one.
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=reference_hf_tokenizer(read_bpe_files(GPT2_VOCAB, GPT2_MERGES), ["<|endoftext|>"]),
        eos_token="<|endoftext|>")
    hf_tokenizer.save_pretrained(out)
    ours = NeoXLM(LocalRunner(model, tokenizer.vocab_size), tokenizer, batch_size=8, show_progress=False)
    theirs = HFLM(pretrained=str(out), max_length=SEQ, batch_size=8, device="cpu")
    return ours, theirs, tokenizer


def _requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


@pytest.mark.slow
def test_piqa_and_arc_easy_accuracies_equal_hflm(models) -> None:
    ours, theirs, _ = models
    manager = task_manager(None)
    runs = [evaluator.simple_evaluate(model=lm, tasks=["piqa", "arc_easy"], limit=LIMIT, task_manager=manager,
                                      bootstrap_iters=0, log_samples=True) for lm in (ours, theirs)]
    for task in ("piqa", "arc_easy"):
        ours_metrics, hf_metrics = (r["results"][task] for r in runs)
        for metric in ("acc,none", "acc_norm,none"):
            assert round(ours_metrics[metric], 4) == round(hf_metrics[metric], 4), (task, metric)
        assert runs[0]["n-samples"][task]["effective"] == LIMIT
        ours_ll = [resp[0][0] for s in runs[0]["samples"][task] for resp in s["resps"]]
        hf_ll = [resp[0][0] for s in runs[1]["samples"][task] for resp in s["resps"]]
        assert len(ours_ll) == len(hf_ll) >= 2 * LIMIT
        assert max(abs(a - b) for a, b in zip(ours_ll, hf_ll)) < 1e-3


def test_loglikelihood_with_contexts_longer_than_the_model_matches_hflm(models) -> None:
    ours, theirs, tokenizer = models
    long_context = TEXT * 8  # ~4x the 128-token window: cut from the left
    assert len(tokenizer.encode(long_context)) > 3 * SEQ
    requests = _requests("loglikelihood", [(long_context, " the deep"), ("Hello", " world"), ("", "In the"),
                                           ("And the earth was", " without form, and void"), ("x ", "y")])
    ours_out, hf_out = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    for (a, greedy_a), (b, greedy_b) in zip(ours_out, hf_out):
        assert a == pytest.approx(b, abs=1e-3) and greedy_a == greedy_b


def test_loglikelihood_rolling_matches_hflm(models) -> None:
    ours, theirs, tokenizer = models
    texts = [TEXT * 6, "Short text.", TEXT[:200]]
    assert len(tokenizer.encode(texts[0])) > 2 * SEQ  # several windows
    requests = _requests("loglikelihood_rolling", [(t,) for t in texts])
    for a, b in zip(ours.loglikelihood_rolling(requests), theirs.loglikelihood_rolling(requests)):
        assert a == pytest.approx(b, rel=1e-5) and math.isfinite(a)


def test_greedy_generate_until_matches_hflm(models) -> None:
    ours, theirs, _ = models
    requests = _requests("generate_until", [
        ("Question: what is the sky?\nAnswer:", {"until": ["\n"], "max_gen_toks": 24, "do_sample": False}),
        ("In the beginning", {"until": ["."], "max_gen_toks": 16}),
        (TEXT * 3, {"until": ["zzz"], "max_gen_toks": 20}),  # context cut to leave room for 20 tokens
        ("A", {"until": [" the", "\n\n"], "max_gen_toks": 12}),
    ])
    ours_out = ours.generate_until(requests)
    assert ours_out == theirs.generate_until(requests)
    assert any(ours_out)


def test_results_do_not_depend_on_batch_size(models) -> None:
    ours, _, tokenizer = models
    one = NeoXLM(ours.runner, tokenizer, batch_size=1, show_progress=False)
    requests = _requests("loglikelihood", [("Hello there", " friend"), (TEXT, " and"), ("A", " b c d")])
    for (a, ga), (b, gb) in zip(ours.loglikelihood(requests), one.loglikelihood(requests)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_sampling_requests_are_refused_with_the_key_to_change(models) -> None:
    ours, _, _ = models
    from neox.eval.errors import EvalError

    with pytest.raises(EvalError, match="do_sample: false"):
        ours.generate_until(_requests("generate_until", [("Hi", {"until": ["\n"], "do_sample": True,
                                                                "temperature": 0.7})]))

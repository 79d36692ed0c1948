"""The sharded eval Runner on real gloo ranks: tp, pp and dp x pp layouts give the same log-likelihoods,
rolling log-likelihoods, greedy generations and perplexity as the whole model in one process."""
from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

from neox.config.model import ModelConfig
from neox.eval.lm import NeoXLM
from neox.eval.parallel_runner import ShardedRunner
from neox.eval.perplexity import file_perplexity
from neox.eval.runner import LocalRunner
from neox.model import GPTNeoX
from neox.parallel.testing import run_distributed
from neox.parallel.topology import build_topology
from neox.tokenizer import build_tokenizer

CFG = dict(num_layers=3, hidden_size=64, num_attention_heads=4, seq_length=32, pos_emb="rotary", rotary_pct=0.5,
           gpt_j_residual=False, activation="gelu", padded_vocab_size=512)
TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void. "


def _model() -> GPTNeoX:
    torch.manual_seed(0)
    model = GPTNeoX(ModelConfig(**CFG))
    with torch.no_grad():  # large weights: no near-ties between greedy candidates
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1)
    return model.eval()


def _answers(runner, text_file: str) -> dict:
    tokenizer = build_tokenizer("CharLevelTokenizer")
    lm = NeoXLM(runner, tokenizer, batch_size=3, show_progress=False)
    ll = [Instance("loglikelihood", {}, args, i) for i, args in enumerate(
        [(TEXT, " Let there be light"), ("Hello", " world"), (TEXT * 2, TEXT[:50]), ("a", "b")])]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([TEXT * 2, "short"])]
    gen = [Instance("generate_until", {}, args, i) for i, args in enumerate(
        [(TEXT, {"until": ["."], "max_gen_toks": 12}), ("And", {"until": ["\n"], "max_gen_toks": 8}),
         ("x", {"until": ["zz"], "max_gen_toks": 10})])]
    ppl = file_perplexity(runner, text_file, tokenizer, eod_mask_loss=False, batch_size=2)
    return {"ll": lm.loglikelihood(ll), "rolling": lm.loglikelihood_rolling(rolling),
            "gen": lm.generate_until(gen), "ppl": ppl.loss, "tokens": ppl.tokens}


def _sharded_answers(tp: int, pp: int, text_file: str) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's topology grid asks its own comm for ranks
    topo = build_topology(tp, pp)
    return _answers(ShardedRunner(_model(), topo, 512, partition_method="type:transformer|mlp"), text_file)


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp, world", [(2, 1, 2), (1, 2, 4), (2, 2, 4)])
def test_sharded_layouts_answer_like_one_process(tp: int, pp: int, world: int, tmp_path) -> None:
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT * 4)
    reference = _answers(LocalRunner(_model(), 512), str(text_file))
    for answers in run_distributed(_sharded_answers, world, tp, pp, str(text_file), timeout_s=240):
        assert answers["gen"] == reference["gen"]
        assert answers["tokens"] == reference["tokens"]
        assert answers["ppl"] == pytest.approx(reference["ppl"], rel=1e-5)
        assert answers["rolling"] == pytest.approx(reference["rolling"], rel=1e-5)
        for (a, greedy_a), (b, greedy_b) in zip(answers["ll"], reference["ll"]):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and greedy_a == greedy_b
    assert any(reference["gen"])

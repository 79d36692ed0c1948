"""tools/convert_hf_to_neox.py / convert_neox_to_hf.py on tiny random MistralForCausalLM (sliding window),
MixtralForCausalLM and Qwen2MoeForCausalLM (shared expert, a dense layer) made by transformers itself: the neox
forward gives transformers' logits within 1e-5, HF -> neox -> HF writes the same tensors, and on the converted Mixtral
`deepy generate` (greedy, KV cache) and `deepy eval` (in process) give transformers' greedy tokens and lm_eval's `hf`
model accuracies. At ep 2 (moe_expert_parallel_size): the converted Mixtral and Qwen2-MoE with their experts split over
two in-process ranks that exchange tokens give transformers' logits for each rank's own batch, and a 2-rank `deepy
train` at ep 2 started from the converted Mixtral saves a checkpoint that converts back to the identical HF model."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neox.checkpoint import load_model, read_consolidated
from neox.checkpoint.hf_export import export_to_hf
from neox.checkpoint.hf_import import convert_hf_to_neox
from neox.config.errors import ConfigError
from neox.config.load import load_config
from neox.config.resolved import load_resolved
from neox.model import GPTNeoX
from neox.model.hf import check_exportable, from_hf_state_dict, to_hf_state_dict
from neox.parallel.runtime import Runtime
from neox.parallel.testing import run_distributed
from tests.distributed import hf_moe_ep_checks
from tests.e2e.test_hf_convert import NEOX20B_VOCAB, hf_logits, make_hf_model
from tests.e2e.train_helpers import deepy_train
from tools import convert_neox_to_hf, preprocess_data

TINY = dict(vocab_size=NEOX20B_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128, tie_word_embeddings=False)
CASES = {
    "mistral": ("MistralConfig", dict(TINY, sliding_window=9)),
    "mixtral": ("MixtralConfig", dict(TINY, sliding_window=12, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(TINY, moe_intermediate_size=32, shared_expert_intermediate_size=40,
                                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                                         mlp_only_layers=[1])),
}
CPU = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
PROMPTS = ["In the beginning God created", "And the LORD said unto Moses, Speak unto the children of Israel"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, tuple[Path, Path, object]]:
    """arch -> (HF directory, its neox import, the HF model)."""
    work = tmp_path_factory.mktemp("hf_moe")
    out = {}
    for arch, (config_class, kwargs) in CASES.items():
        hf = make_hf_model(work / f"{arch}-hf", config_class, kwargs, weight_std=0.1)
        out[arch] = (work / f"{arch}-hf", convert_hf_to_neox(work / f"{arch}-hf", work / f"{arch}-neox",
                                                              progress=False), hf)
    return out


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, NEOX20B_VOCAB, (2, 48))


@pytest.mark.parametrize("arch", sorted(CASES))
def test_logits_and_round_trip(converted, tokens, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    hf_dir, neox_dir, hf = converted[arch]
    model, cfg, _ = load_model(neox_dir)
    reference = hf_logits(hf, tokens)
    with torch.no_grad():
        ours = model(tokens)
    diff = float((ours[..., :NEOX20B_VOCAB] - reference).abs().max())
    print(f"{arch}: max |neox - transformers| logit = {diff:.2e} (logits up to {float(reference.abs().max()):.1f})")
    assert diff < 1e-5
    m = cfg.model
    if arch == "mistral":  # the window is in force: without it the later positions change
        assert m.sliding_window_width == 8 and not m.moe_layer_indices
        unwindowed = GPTNeoX(dataclasses.replace(m, sliding_window_width=None)).eval()
        unwindowed.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert float((unwindowed(tokens) - ours).abs().max()) > 1e-2
    else:
        assert m.moe_num_experts == 4 and m.moe_top_k == 2
        assert m.moe_layer_indices == ((0, 1) if arch == "mixtral" else (0,))
        assert m.moe_num_shared_experts == (arch == "qwen2_moe")
        # transformers 5 holds the experts fused in memory: a live model's state_dict imports to the same weights
        _, live = from_hf_state_dict(hf.config, hf.state_dict())
        _, saved = read_consolidated(neox_dir)
        assert all(torch.equal(live[k], saved[k][: live[k].shape[0]]) for k in live) and set(live) == set(saved)
    # neox -> HF: the very tensors the HF directory held, and transformers loads them to the same logits
    exported = export_to_hf(neox_dir, tmp_path / "exported", progress=False)
    original, again = load_file(str(hf_dir / "model.safetensors")), load_file(str(exported / "model.safetensors"))
    assert set(original) == set(again)
    assert all(torch.equal(original[k], again[k]) for k in original)
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == [type(hf).__name__] and config["model_type"] == arch
    loaded, info = AutoModelForCausalLM.from_pretrained(str(exported), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert float((hf_logits(loaded.eval(), tokens) - reference).abs().max()) < 1e-5


def test_options_the_moe_classes_cannot_express_are_refused(converted):
    cfg, weights = read_consolidated(converted["qwen2_moe"][1])
    m = cfg.model
    # Qwen2-MoE's o_proj has no bias: the imported zero bias exports, a trained (non-zero) one cannot
    assert m.use_bias_in_attn_linear and not weights["blocks.1.attention.dense.bias"].any()
    weights["blocks.1.attention.dense.bias"] = weights["blocks.1.attention.dense.bias"] + 0.5
    with pytest.raises(ConfigError, match="layer 1's attention.dense bias is not zero"):
        to_hf_state_dict(m, weights, "qwen2_moe")
    with pytest.raises(ConfigError, match="moe_num_experts"):  # a dense class
        check_exportable(m, "llama")
    with pytest.raises(ConfigError, match="'moe_layers: \\[0\\]' cannot be exported to mixtral"):  # a dense layer
        check_exportable(m, "mixtral")
    with pytest.raises(ConfigError, match="moe_num_shared_experts"):  # Mixtral has no shared expert
        check_exportable(dataclasses.replace(m, moe_layers=None, moe_norm_topk_prob=True), "mixtral")
    mixtral = read_consolidated(converted["mixtral"][1])[0].model
    with pytest.raises(ConfigError, match="sliding_window_width"):
        check_exportable(mixtral, "qwen2_moe")
    with pytest.raises(ConfigError, match="moe_router_type"):
        check_exportable(dataclasses.replace(mixtral, moe_router_type="sinkhorn"), "mixtral")
    with pytest.raises(ConfigError, match="moe_expert_interval"):
        check_exportable(dataclasses.replace(mixtral, moe_expert_interval=2), "mixtral")


def test_generate_and_eval_on_a_converted_mixtral_equal_transformers(converted, tmp_path):
    """`deepy generate` and `deepy eval` in process (their run(cfg, runtime)) on the imported Mixtral."""
    from lm_eval import evaluator
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer

    from neox.eval.lm import NeoXLM
    from neox.eval.run import run as run_eval
    from neox.eval.runner import LocalRunner
    from neox.eval.task_index import task_manager
    from neox.generate.run import run as run_generate

    hf_dir, neox_dir, hf = converted["mixtral"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = load_config([neox_dir / "model.yml"], ["--text_gen_type", "input-file", "--sample_input_file", str(prompts),
                                                  "--sample_output_file", str(tmp_path / "samples.jsonl"),
                                                  "--maximum_tokens", str(NEW_TOKENS)], vocab_size=NEOX20B_VOCAB)
    assert cfg.generate.temperature == 0.0 and not cfg.generate.recompute  # greedy, with the KV cache
    samples = run_generate(cfg, CPU)
    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for sample in samples:
        ids = torch.tensor([tokenizer.encode(sample.prompt).ids])
        with torch.no_grad():
            expected = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, ids.shape[1]:].tolist()
        # (decoding stops early only at the end-of-document token, which HF's generate was told not to stop at)
        assert sample.tokens == expected[: len(sample.tokens)] and sample.tokens
        assert sample.finish_reason == "eod" or len(sample.tokens) == NEW_TOKENS

    tasks, limit = ["piqa", "arc_easy"], 12
    cfg = load_config([neox_dir / "model.yml"], ["--eval_tasks", json.dumps(tasks), "--eval_limit", str(limit),
                                                  "--log_dir", str(tmp_path / "logs")], vocab_size=NEOX20B_VOCAB)
    ours = run_eval(cfg, CPU).lm_eval["results"]
    exported = export_to_hf(neox_dir, tmp_path / "exported", progress=False)
    hf_lm = HFLM(pretrained=str(exported), max_length=cfg.model.seq_length, batch_size=8, device="cpu")
    theirs = evaluator.simple_evaluate(model=hf_lm, tasks=tasks, limit=limit, task_manager=task_manager(None, tasks),
                                       bootstrap_iters=0)["results"]
    for task in tasks:
        for metric in ("acc,none", "acc_norm,none"):
            assert round(ours[task][metric], 4) == round(theirs[task][metric], 4), (task, metric)
    # and the log-likelihoods behind them
    model, ckpt_cfg, neox_tokenizer = load_model(neox_dir)
    neox_lm = NeoXLM(LocalRunner(model, neox_tokenizer.vocab_size, max_length=ckpt_cfg.model.seq_length),
                     neox_tokenizer, batch_size=8, show_progress=False)
    requests = [Instance("loglikelihood", {}, args, i)
                for i, args in enumerate([(PROMPTS[0], " the heaven and the earth"), (PROMPTS[1], ", saying")])]
    for (a, greedy_a), (b, greedy_b) in zip(neox_lm.loglikelihood(requests), hf_lm.loglikelihood(requests)):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


def test_logits_at_ep2_equal_transformers(converted):
    """The converted Mixtral and Qwen2-MoE split over 2 expert-parallel ranks (2 of the 4 experts each), the ranks
    feeding different batches so that tokens cross to the other rank's experts and back: each rank's logits are
    transformers' for its own batch."""
    archs = ["mixtral", "qwen2_moe"]
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, NEOX20B_VOCAB, (2, 32), generator=generator) for _ in range(2)]
    results = run_distributed(hf_moe_ep_checks.expert_parallel_logits, 2, [str(converted[a][1]) for a in archs],
                              batches, timeout_s=300)
    for arch in archs:
        _, neox_dir, hf = converted[arch]
        _, whole = read_consolidated(neox_dir)
        for rank, per_model in enumerate(results):
            got = per_model[neox_dir.name]
            assert got["ep_rank"] == rank and got["blocks"] == (2 if arch == "mixtral" else 1)
            assert got["experts"] and all(torch.equal(shard, whole[name][2 * rank: 2 * rank + 2])
                                          for name, shard in got["experts"].items())
            assert got["sent"][1 - rank] > 0 and got["sent"][rank] > 0, got["sent"]  # both ways: a real exchange
            reference = hf_logits(hf, batches[rank])
            diff = float((got["logits"][..., :NEOX20B_VOCAB] - reference).abs().max())
            scale = float(reference.abs().max())
            print(f"{arch} ep2 rank {rank}: max |neox - transformers| logit = {diff:.2e} (logits up to {scale:.1f}, "
                  f"relative {diff / scale:.1e}); rows sent to ranks 0/1: {got['sent']}")
            assert diff <= 1e-5 * scale, (arch, rank, diff)


def test_round_trip_through_an_ep2_run_is_identical(converted, tmp_path):
    """`deepy train` on 2 ranks with moe_expert_parallel_size 2, starting from the converted Mixtral (its model.yml:
    load + finetune), saves its initial weights (extra_save_iters [0]; train_iters 0: no step changes them) as
    layout-free shards only; tools/convert_neox_to_hf.py turns that checkpoint back into the very HF model."""
    hf_dir, neox_dir, _ = converted["mixtral"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{i}: {prompt}"}) + "\n" for i in range(16) for prompt in PROMPTS))
    assert preprocess_data.main(["--input", str(corpus), "--output-prefix", str(tmp_path / "data"), "--append-eod",
                                 "--tokenizer-type", "HFTokenizer",
                                 "--vocab-file", str(neox_dir / "tokenizer" / "tokenizer.json")]) == 0
    run = deepy_train(tmp_path / "run", neox_dir / "model.yml", num_gpus=2, zero_stage=0,
                      extra={"moe_expert_parallel_size": 2, "data_path": tmp_path / "data_text_document",
                             "seq_length": 32, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                             "train_iters": 0, "extra_save_iters": [0], "eval_iters": 0, "peak_flops": 1.0e11})
    assert "weights only (finetune)" in run.output and "saved checkpoint" in run.output
    ckpt = run.save_dir / "global_step0"
    assert (run.save_dir / "latest").read_text().strip() == "global_step0"
    assert sorted(p.name for p in (ckpt / "layout_free").glob("rank*.safetensors")) == [
        "rank00000.safetensors", "rank00001.safetensors"]
    assert not list(ckpt.glob("*model_states.pt")) and not list(ckpt.glob("*optim_states.pt"))
    assert load_resolved(ckpt / "config.yml").parallel.moe_expert_parallel_size == 2

    out = tmp_path / "hf"
    assert convert_neox_to_hf.main(["--checkpoint", str(run.save_dir), "--output", str(out), "--quiet"]) == 0
    original, again = load_file(str(hf_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(original) == set(again)
    assert all(original[k].dtype == again[k].dtype and torch.equal(original[k], again[k]) for k in original)
    # The config too, but for what the export takes from the tokenizer rather than the model (the random model's
    # special token ids are transformers' defaults, not the neox-20b tokenizer's) and head_dim written out.
    before, after = (json.loads((d / "config.json").read_text()) for d in (hf_dir, out))
    tokens = {"bos_token_id", "eos_token_id", "pad_token_id"}
    head_dim = before.pop("head_dim", None) or before["hidden_size"] // before["num_attention_heads"]
    assert after.pop("head_dim") == head_dim
    assert {k: v for k, v in after.items() if k not in tokens} == {k: v for k, v in before.items() if k not in tokens}

"""neox.checkpoint on checkpoints of real 2-rank training runs at ZeRO 0, 2 and 3 (and bf16 ZeRO-2).

The same 6 steps on the same data are trained at each stage; the consolidated weights must be the engine's own
(ZeRO 0/2: the module state dict; ZeRO-3: what DeepSpeed's own zero_to_fp32 reassembles), and the stages must
agree with each other up to reduction-order noise.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from neox.checkpoint import (CheckpointError, consolidate, find_checkpoint, is_consolidated, load_model,
                             read_consolidated, save_consolidated)
from neox.model import GPTNeoX
from tests.e2e.train_helpers import Launch, deepy_train, preprocess_kjv, write_config

pytestmark = pytest.mark.slow

STEPS = 6
RUN = {"train_iters": STEPS, "lr_decay_iters": STEPS, "eval_iters": 0, "save_interval": 3}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("consolidate")


@pytest.fixture(scope="module")
def model_config(work) -> Path:
    return write_config(work / "tiny.yml", preprocess_kjv(work / "data"))


@pytest.fixture(scope="module")
def runs(work, model_config) -> dict[str, Launch]:
    return {f"zero{stage}": deepy_train(work / f"zero{stage}", model_config, num_gpus=2, zero_stage=stage, extra=RUN)
            for stage in (0, 2, 3)}


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 256, (2, 48))


def _logits(weights: dict[str, torch.Tensor], cfg, tokens: torch.Tensor) -> torch.Tensor:
    model = GPTNeoX(cfg.model)
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        return model.eval()(tokens)


def _engine_module(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The weights as anyone would load them by hand from DeepSpeed's model file."""
    return torch.load(checkpoint_dir / "mp_rank_00_model_states.pt", weights_only=True)["module"]


@pytest.mark.parametrize("stage", ["zero0", "zero2"])
def test_zero_0_2_consolidate_to_the_engine_weights(runs, tokens, stage):
    save_dir = runs[stage].save_dir
    ckpt = find_checkpoint(save_dir)
    assert ckpt == save_dir / f"global_step{STEPS}"
    cfg, weights = consolidate(ckpt)
    assert cfg.optim.zero_optimization["stage"] == int(stage[-1])
    module = _engine_module(ckpt)
    assert set(weights) == set(module)
    for name, tensor in module.items():
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], tensor), name
    assert torch.equal(_logits(weights, cfg, tokens), _logits(module, cfg, tokens))
    # an earlier checkpoint is another set of weights
    _, earlier = consolidate(find_checkpoint(save_dir, iteration=3))
    assert not torch.equal(earlier["blocks.0.attention.query_key_value.weight"],
                           weights["blocks.0.attention.query_key_value.weight"])


def test_zero3_matches_deepspeed_and_zero0(runs, tokens):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = find_checkpoint(runs["zero3"].save_dir)
    cfg, weights = consolidate(ckpt)
    # DeepSpeed's own reassembly (it unpickles with weights_only=False: fine for files this test wrote)
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    assert set(weights) == set(reference)
    for name in weights:
        assert torch.equal(weights[name], reference[name].float()), name
    # the module file of a ZeRO-3 checkpoint holds no usable weights: this is the only way to read them
    cfg0, weights0 = consolidate(find_checkpoint(runs["zero0"].save_dir))
    logits3, logits0 = _logits(weights, cfg, tokens), _logits(weights0, cfg0, tokens)
    assert (logits3 - logits0).abs().max() < 1e-3
    cfg2, weights2 = consolidate(find_checkpoint(runs["zero2"].save_dir))
    assert (_logits(weights2, cfg2, tokens) - logits0).abs().max() < 1e-3
    # and training moved the weights far more than the stages disagree
    earlier = consolidate(find_checkpoint(runs["zero0"].save_dir, 3))[1]
    assert (logits0 - _logits(earlier, cfg0, tokens)).abs().max() > 1e-2


def test_load_model_gives_model_config_tokenizer(runs, tokens):
    model, cfg, tokenizer = load_model(runs["zero3"].save_dir, device="cpu", dtype=torch.float64)
    assert not model.training and next(model.parameters()).dtype == torch.float64
    assert cfg.model.num_layers == 2 and tokenizer.name == "CharLevelTokenizer"
    ids = torch.tensor([tokenizer.encode("In the beginning")])
    _, weights = consolidate(find_checkpoint(runs["zero3"].save_dir))
    with torch.no_grad():
        expected = _logits(weights, cfg, ids).double()
        assert torch.allclose(model(ids), expected, atol=1e-5)


def test_consolidated_round_trip_and_atomic_replace(runs, tokens, tmp_path):
    ckpt = find_checkpoint(runs["zero2"].save_dir)
    cfg, weights = consolidate(ckpt)
    out = save_consolidated(tmp_path / "model", cfg, weights, [], iteration=STEPS, source=str(ckpt))
    assert is_consolidated(out) and find_checkpoint(out) == out and find_checkpoint(out, STEPS) == out
    cfg2, weights2 = read_consolidated(out)
    assert cfg2.model == cfg.model and set(weights2) == set(weights)
    assert all(torch.equal(weights[k], weights2[k]) for k in weights)
    assert weights2["head.weight"] is weights2["embedding.word_embeddings.weight"]  # tied head stored once
    assert torch.equal(_logits(weights2, cfg2, tokens), _logits(weights, cfg, tokens))
    model, _, _ = load_model(out)
    assert torch.equal(model(tokens), _logits(weights, cfg, tokens))
    # rewriting replaces it; nothing temporary is left next to it
    _, earlier = consolidate(find_checkpoint(runs["zero2"].save_dir, 3))
    save_consolidated(out, cfg, earlier, [], iteration=3)
    assert torch.equal(read_consolidated(out)[1]["final_norm.weight"], earlier["final_norm.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # a directory that is not ours is never overwritten
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a consolidated model"):
        save_consolidated(tmp_path / "user", cfg, weights, [])
    with pytest.raises(CheckpointError, match="iteration 3, not 6"):
        find_checkpoint(out, STEPS)


def test_bad_checkpoints_are_clear_errors(runs, tmp_path):
    ckpt = find_checkpoint(runs["zero2"].save_dir)
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="global_step99"):
        find_checkpoint(runs["zero2"].save_dir, iteration=99)
    cut = tmp_path / "global_step6"
    shutil.copytree(ckpt, cut)
    (cut / "complete.json").unlink()
    with pytest.raises(CheckpointError, match="cut off"):
        find_checkpoint(cut)
    torn = tmp_path / "torn" / "global_step6"
    shutil.copytree(ckpt, torn)
    (torn / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    cfg_text = (torn / "config.yml").read_text()
    (torn / "config.yml").write_text(cfg_text.replace("precision: fp32", "precision: bfloat16"))
    with pytest.raises(CheckpointError, match="partitioned over 2 ranks but 1"):
        consolidate(torn)
    # A tensor-parallel checkpoint without its layout-free copy is merged from DeepSpeed's files: one whose
    # config claims a tp size its files do not have is refused, naming the missing file.
    sharded = tmp_path / "sharded" / "global_step6"
    shutil.copytree(ckpt, sharded)
    (sharded / "config.yml").write_text((sharded / "config.yml").read_text().replace(
        "model_parallel_size: 1", "model_parallel_size: 2", 1))
    shutil.rmtree(sharded / "layout_free", ignore_errors=True)
    with pytest.raises(CheckpointError, match="mp_rank_01_model_states.pt"):
        consolidate(sharded)


def test_bf16_zero2_gives_the_fp32_master_weights(work, model_config, tokens):
    """In bf16 the module holds bf16 copies; the optimizer shards hold the fp32 masters, which we must return."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    launch = deepy_train(work / "bf16", model_config, num_gpus=2, zero_stage=2,
                         extra={**RUN, "precision": "bfloat16", "bf16": {"enabled": True}})
    ckpt = find_checkpoint(launch.save_dir)
    cfg, weights = consolidate(ckpt)
    module = _engine_module(ckpt)
    assert {t.dtype for t in module.values()} == {torch.bfloat16}
    assert all(weights[k].dtype == torch.float32 for k in weights)
    # the masters round to the module's bf16 weights, and carry bits the bf16 copies lost
    assert all(torch.equal(weights[k].bfloat16(), module[k]) for k in module)
    assert any(not torch.equal(weights[k], module[k].float()) for k in module)
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    assert set(reference) == set(weights) and all(torch.equal(reference[k], weights[k]) for k in weights)


def test_char_level_model_exports_to_hugging_face(runs, tmp_path, tokens):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neox.checkpoint.hf_export import export_to_hf

    cfg, weights = consolidate(find_checkpoint(runs["zero0"].save_dir))
    out = export_to_hf(runs["zero0"].save_dir, tmp_path / "hf", progress=False)
    text = "In the beginning God created the heaven and the earth.\n"
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer(text)["input_ids"] == list(text.encode()) and tokenizer.decode(list(text.encode())) == text
    hf_model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        hf_logits = hf_model(tokens).logits
    assert (hf_logits - _logits(weights, cfg, tokens)[..., :512]).abs().max() < 1e-4

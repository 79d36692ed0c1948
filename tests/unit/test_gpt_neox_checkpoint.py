"""Checkpoints in EleutherAI gpt-neox's layout (tests/gpt_neox_fixture.py writes them from tiny transformers
models, at tp1 and tp2, pipeline and sequential): read back exactly, the loaded model computes the source's logits,
and tools/convert_neox_to_hf.py exports them to transformers."""
from __future__ import annotations

import argparse

import pytest
import torch
import transformers

from neox.checkpoint import CheckpointError, find_checkpoint, load_model
from neox.checkpoint.gpt_neox import (GptNeoxCheckpoint, find_gpt_neox_checkpoint, is_gpt_neox_checkpoint,
                                      open_gpt_neox_checkpoint)
from neox.model.hf import from_hf_state_dict
from tests.gpt_neox_fixture import ARCHES, DIVISIBLE_BY, LLAMA_GQA, PYTHIA, padded_vocab, source_model, write_checkpoint
from tools import convert_neox_to_hf

LAYOUTS = ("pipeline", "sequential")
CASES = [(arch, tp, layout) for arch in ARCHES for tp in (1, 2) for layout in LAYOUTS]
TOKENS = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def sources():
    return {(arch, tp): source_model(ARCHES[arch], tp) for arch in ARCHES for tp in (1, 2)}


@pytest.fixture(scope="module")
def saves(tmp_path_factory, sources):
    """(arch, tp, layout) -> the save directory of that gpt-neox checkpoint (global_step100 and `latest`)."""
    root = tmp_path_factory.mktemp("gpt_neox")
    out = {}
    for arch, tp, layout in CASES:
        out[arch, tp, layout] = root / f"{arch}_tp{tp}_{layout}"
        write_checkpoint(out[arch, tp, layout], ARCHES[arch], sources[arch, tp], tp, layout)
    return out


@pytest.mark.parametrize("arch,tp,layout", CASES)
def test_reader_gives_the_source_weights_exactly(arch, tp, layout, saves, sources):
    checkpoint = open_gpt_neox_checkpoint(saves[arch, tp, layout])
    assert (checkpoint.path.name, checkpoint.layout, checkpoint.tp, checkpoint.iteration) == \
        ("global_step100", layout, tp, 100)
    model_cfg = checkpoint.config.model
    # gpt-neox padded the 512 ids to make_vocab_size_divisible_by x tp: 560 at tp1, 640 at tp2, kept as stored.
    assert model_cfg.padded_vocab_size == padded_vocab(tp) == [560, 640][tp - 1]
    assert (model_cfg.gpt_j_residual, model_cfg.no_weight_tying) == \
        (ARCHES[arch].gpt_j_residual, not ARCHES[arch].tied)
    source = sources[arch, tp]
    _, expected = from_hf_state_dict(source.config, dict(source.state_dict()), DIVISIBLE_BY)
    weights = checkpoint.weights()
    assert sorted(weights) == sorted(expected)
    for name, tensor in expected.items():
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], tensor), name
    if ARCHES[arch].tied:
        assert weights["head.weight"] is weights["embedding.word_embeddings.weight"]


# Exact weights make the layout irrelevant here; the vocabulary (560 or 640 rows) differs with tp.
@pytest.mark.parametrize("arch,tp,layout", [(arch, tp, LAYOUTS[tp - 1]) for arch in ARCHES for tp in (1, 2)])
def test_loaded_model_computes_the_source_logits(arch, tp, layout, saves, sources):
    model, cfg, tokenizer = load_model(saves[arch, tp, layout])  # the save directory, through its `latest`
    assert tokenizer.vocab_size == 512 and cfg.model.padded_vocab_size == padded_vocab(tp)
    with torch.no_grad():
        ours = model(TOKENS)
        theirs = sources[arch, tp](TOKENS).logits
    assert ours.shape == theirs.shape == (2, 40, padded_vocab(tp))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,layout,hf_class", [("pythia", "pipeline", "GPTNeoXForCausalLM"),
                                                  ("neox_tied", "sequential", "GPTNeoXForCausalLM"),
                                                  ("llama_gqa", "pipeline", "LlamaForCausalLM")])
def test_convert_neox_to_hf_exports_what_transformers_computes(arch, layout, hf_class, saves, tmp_path):
    save_dir = saves[arch, 2, layout]
    assert convert_neox_to_hf.main(["--checkpoint", str(save_dir), "--output", str(tmp_path / "hf"), "--quiet"]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(exported).__name__ == hf_class and exported.config.vocab_size == 512  # trimmed to the tokenizer
    model, _, _ = load_model(save_dir)
    with torch.no_grad():
        torch.testing.assert_close(exported(TOKENS).logits, model(TOKENS)[..., :512], rtol=0, atol=1e-5)


def test_finding_gpt_neox_checkpoints(saves, sources, tmp_path):
    save_dir = saves["pythia", 2, "pipeline"]
    step = save_dir / "global_step100"
    assert is_gpt_neox_checkpoint(step) and not is_gpt_neox_checkpoint(save_dir)
    assert find_checkpoint(save_dir) == find_checkpoint(step) == find_checkpoint(save_dir, 100) == step
    assert find_gpt_neox_checkpoint(tmp_path) is None  # not gpt-neox's: neox's own reader decides
    with pytest.raises(CheckpointError, match="without a global_step7 checkpoint; it has global_step100"):
        find_checkpoint(save_dir, 7)
    # `latest` names the tag; without it, the newest global_stepN.
    copy = tmp_path / "copy"
    for iteration in (20, 30):
        write_checkpoint(copy, PYTHIA, sources["pythia", 1], 1, "pipeline", iteration=iteration)
    (copy / "latest").write_text("global_step20")
    assert find_gpt_neox_checkpoint(copy) == copy / "global_step20"
    (copy / "latest").unlink()
    assert find_gpt_neox_checkpoint(copy) == copy / "global_step30"
    # A tag of another name: the iteration comes from the client state of mp_rank_00_model_states.pt (which holds
    # numpy RNG state, read through the allow-list).
    (copy / "global_step30").rename(copy / "warm_start")
    (copy / "latest").write_text("warm_start\n")
    assert open_gpt_neox_checkpoint(copy).iteration == 30


class Payload:  # any class of the test module: torch.load(weights_only=True) will not build it
    pass


def _rewrite_record(path, **entries):
    from neox.checkpoint.gpt_neox import _record_types

    with torch.serialization.safe_globals(_record_types()):
        record = torch.load(path, weights_only=True)
    record.update(entries)
    torch.save(record, path)


def test_mp_rank_records_load_safely_and_foreign_objects_are_refused(sources, tmp_path):
    save_dir = tmp_path / "seq"
    write_checkpoint(save_dir, LLAMA_GQA, sources["llama_gqa", 2], 2, "sequential")
    record = save_dir / "global_step100" / "mp_rank_01_model_states.pt"
    # Megatron-era args as an argparse.Namespace, numpy RNG state (the fixture has it), DeepSpeed's records: allowed.
    _rewrite_record(record, args=argparse.Namespace(num_layers=2, hidden_size=64))
    assert open_gpt_neox_checkpoint(save_dir).weights()["blocks.1.mlp.gate.weight"].shape == (64, 64)
    _rewrite_record(record, extra=Payload())
    with pytest.raises(CheckpointError) as err:
        open_gpt_neox_checkpoint(save_dir)
    assert str(record) in str(err.value) and "Payload" in str(err.value) and "weights_only=True" in str(err.value)


def test_a_checkpoint_that_does_not_fit_its_configs_is_refused(sources, tmp_path):
    save_dir = tmp_path / "bad"
    step = write_checkpoint(save_dir, PYTHIA, sources["pythia", 2], 2, "pipeline")
    config = step / "configs" / "pythia.yml"
    text = config.read_text()
    config.write_text(text.replace("hidden-size: 64", "hidden-size: 128"))
    with pytest.raises(CheckpointError, match=r"weights do not fit the model its configs/ describe: shapes"):
        load_model(save_dir)
    config.write_text(text.replace("no-weight-tying: true", "no-weight-tying: false"))  # but it has an untied head
    with pytest.raises(CheckpointError, match=r"gpt-neox layers \[6\] beyond the 2 transformer layers its configs/ "
                                              r"describe \(no_weight_tying False\)"):
        load_model(save_dir)
    config.write_text(text)
    layer = step / "layer_03-model_01-model_states.pt"
    torch.save({**torch.load(layer, weights_only=True), "mlp.router.weight": torch.ones(4, 64)}, layer)  # MoE
    with pytest.raises(CheckpointError, match="layer_03-model_01-model_states.pt: parameters with no counterpart in "
                                              "neox's model: mlp.router.weight"):
        load_model(save_dir)
    layer.unlink()
    with pytest.raises(CheckpointError, match="layer 3 lacks the files of some tp ranks"):
        load_model(save_dir)
    (step / "layer_00-model_01-model_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"says model_parallel_size 2 but the model files are of 1 tensor-"):
        GptNeoxCheckpoint.open(step)


def test_qk_layernorm_and_relative_position_tables_merge_along_the_heads(sources, tmp_path):
    """use_qk_layernorm's [heads, head_dim] norm and pos_emb rpe's [buckets, heads] table (one module every layer
    file holds a copy of) are split over the tp ranks by heads, as gpt-neox's ParallelSelfAttention and
    ParallelRelativePositionBias hold them."""
    save_dir = tmp_path / "qk_rpe"
    step = write_checkpoint(save_dir, PYTHIA, sources["pythia", 2], 2, "pipeline")
    config = step / "configs" / "pythia.yml"
    config.write_text(config.read_text().replace("pos-emb: rotary", "pos-emb: rpe") + "use-qk-layernorm: true\n")
    generator = torch.Generator().manual_seed(5)
    table = [torch.randn(32, 2, generator=generator) for _ in range(2)]  # rpe_num_buckets 32, 2 heads per rank
    norms = {}
    for index in (2, 3):
        for rank in range(2):
            path = step / f"layer_{index:02d}-model_{rank:02d}-model_states.pt"
            norms[index, rank] = [torch.randn(2, 16, generator=generator) for _ in range(2)]
            state = {**torch.load(path, weights_only=True), "attention.rpe.weight": table[rank],
                     "attention.qk_layernorm.weight": norms[index, rank][0],
                     "attention.qk_layernorm.bias": norms[index, rank][1]}
            torch.save(state, path)
    model, cfg, _ = load_model(save_dir)
    assert cfg.model.pos_emb == "rpe" and cfg.model.use_qk_layernorm
    weights = model.state_dict()
    assert torch.equal(weights["blocks.0.attention.rpe.weight"], torch.cat(table, dim=1))
    for i, index in enumerate((2, 3)):
        for j, name in enumerate(("weight", "bias")):
            merged = torch.cat([norms[index, 0][j], norms[index, 1][j]])
            assert torch.equal(weights[f"blocks.{i}.attention.qk_norm.{name}"], merged)

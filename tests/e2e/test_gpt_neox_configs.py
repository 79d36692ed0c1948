"""gpt-neox's own config files (tests/data/gpt_neox/configs, Apache-2.0) work here as a gpt-neox user runs them.

Every dense-transformer file and the MoE one (125M-dmoe.yml) passes `deepy show-config` and `deepy plan` given
only data, tokenizer and save paths (and, on this GPU-less machine, the job's size as global_num_gpus); the plan
gives each Pythia model its published parameter count; files of features neox does not have stop with one
paragraph naming the feature; and the small Pythia config trains on 2 CPU ranks with gpt-neox's command line.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher import deepy
from tests.conftest import GPT2_MERGES, GPT2_VOCAB, NEOX20B_TOKENIZER, REPO_ROOT
from tests.e2e.train_helpers import KJV, LAUNCH_TIMEOUT_S, PREPROCESS, free_port

CONFIGS = REPO_ROOT / "tests" / "data" / "gpt_neox" / "configs"
MODEL_FILES = sorted(
    str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yml")
    if p.parent.name in ("pythia", "llama", "llama2", "llemma", "mistral", "finetuning_configs")
    or p.name in ("19M.yml", "49M.yml", "125M.yml", "125M-json.yml", "350M.yml", "760M.yml", "800M.yml",
                  "1-3B.yml", "2-7B.yml", "6-7B.yml", "13B.yml", "20B.yml", "175B.yml", "bf16_125M.yml",
                  "bnb_125M.yml", "slurm_125M.yml", "125M-dmoe.yml")
)
MODEL_FILES.remove("llama/train_config.yml")  # the training half of the llama/llama2/mistral/llemma model files
SETUP_FILES = ["local_setup.yml", "local_setup_comet.yml", "local_setup_wandb.yml", "eleutherai_cluster.yml",
               "text_generation.yml", "slurm_local.yml", "slurm_local.json", "docker/pythia-paths.yml",
               "cpu_mock_config.yml", "prof.yml",
               "sparse.yml"]  # local + global layers: 'local' is DeepSpeed's sliding-window block layout, built here
# Files of features neox does not have, and the feature each must name.
MISSING_FEATURE_FILES = {
    "1-3B-transformer-engine.yml": "Transformer Engine",
    "gmlp_small.yml": "gMLP",
    "mamba/mamba-130M.yml": "Mamba",
    "rwkv/170M.yml": "RWKV",
}
# Published total parameter counts (Pythia's model cards / paper; Llama-2-7B, Mistral-7B on Hugging Face).
PUBLISHED_PARAMS = {
    "pythia/70M.yml": 70_426_624,
    "pythia/160M.yml": 162_322_944,
    "pythia/410M.yml": 405_334_016,
    "pythia/1B.yml": 1_011_781_632,
    "pythia/1-4B.yml": 1_414_647_808,
    "pythia/2-8B.yml": 2_775_208_960,
    "pythia/6-9B.yml": 6_857_302_016,
    "pythia/12B.yml": 11_846_072_320,
    # gpt-neox's llama2/7B.yml leaves use_bias_in_mlp at its default (true): Meta's 6,738,415,616 + 835,584 biases.
    "llama2/7B.yml": 6_738_415_616 + 32 * (2 * 11008 + 4096),
    # (Not mistral/7B.yml: under gpt-neox's own gated-MLP rule its intermediate_size 14336 builds a 4778-wide MLP,
    # 3.48B parameters in gpt-neox as here, not Mistral's 7.24B.)
}
# The tokenizer family of files that name none: the Llama family is SentencePiece, the rest GPT-2 BPE (gpt-neox's
# default tokenizer_type).
SPM_FOLDERS = ("llama", "llama2", "llemma", "mistral")


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """One 'data, tokenizer and save paths' file per tokenizer family (a Llama-sized SentencePiece model is built)."""
    folder = tmp_path_factory.mktemp("neox-paths")
    spm = folder / "llama-32000.model"
    spm.write_bytes(sentencepiece_model(32000))
    common = {"data_path": None, "train_data_paths": [str(folder / "data_text_document")],
              "valid_data_paths": [str(folder / "data_text_document")],
              "test_data_paths": [str(folder / "data_text_document")],
              "save": str(folder / "ckpt"), "load": str(folder / "ckpt"), "log_dir": str(folder / "logs"),
              "tensorboard_dir": None}
    files = {}
    for family, tokenizer in {
        "gpt2": {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": str(GPT2_VOCAB), "merge_file": str(GPT2_MERGES)},
        "neox": {"tokenizer_type": "HFTokenizer", "vocab_file": str(NEOX20B_TOKENIZER), "merge_file": None},
        "spm": {"tokenizer_type": "SPMTokenizer", "vocab_file": str(spm), "merge_file": None},
    }.items():
        files[family] = folder / f"paths-{family}.yml"
        files[family].write_text(yaml.safe_dump({**common, **tokenizer}))
    return files


def sentencepiece_model(size: int) -> bytes:
    """A SentencePiece model with exactly `size` pieces (unk, bos, eos, 256 bytes, then filler pieces)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.trainer_spec.model_type = pb.TrainerSpec.BPE
    model.trainer_spec.vocab_size = size
    model.trainer_spec.byte_fallback = True
    for piece, kind in (("<unk>", pb.ModelProto.SentencePiece.UNKNOWN), ("<s>", pb.ModelProto.SentencePiece.CONTROL),
                        ("</s>", pb.ModelProto.SentencePiece.CONTROL)):
        model.pieces.add(piece=piece, score=0.0, type=kind)
    for byte in range(256):
        model.pieces.add(piece=f"<0x{byte:02X}>", score=0.0, type=pb.ModelProto.SentencePiece.BYTE)
    for i in range(size - len(model.pieces)):
        model.pieces.add(piece=f"\u2581p{i}", score=-float(i), type=pb.ModelProto.SentencePiece.NORMAL)
    return model.SerializeToString()


def family(files: list[Path]) -> str:
    merged: dict = {}
    for path in files:
        merged.update({k.replace("-", "_"): v for k, v in (yaml.safe_load(path.read_text()) or {}).items()})
    default = "SPMTokenizer" if files[0].parent.name in SPM_FOLDERS else "GPT2BPETokenizer"
    kind = merged.get("tokenizer_type", default)
    return {"HFTokenizer": "neox", "SPMTokenizer": "spm"}.get(kind, "gpt2"), merged


def argv_for(name: str, paths: dict[str, Path], *setup: str) -> list[str]:
    files = [CONFIGS / name, *(CONFIGS / s for s in setup)]
    kind, merged = family(files)
    if "train_micro_batch_size_per_gpu" not in merged and "train_batch_size" not in merged:
        files.insert(1, CONFIGS / "llama" / "train_config.yml")  # the llama-family model files' training half
    tp = merged.get("model_parallel_size", 1)
    pp = max(merged.get("pipe_parallel_size", 0), 1)
    return [*map(str, files), str(paths[kind]), "--global_num_gpus", str(tp * pp)]


def run_deepy(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = deepy.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", MODEL_FILES)
def test_dense_file_passes_show_config_and_plan(capsys, paths, name):
    argv = argv_for(name, paths)
    code, out, err = run_deepy(capsys, ["show-config", *argv])
    assert code == 0, err
    assert re.search(r"num_layers\s+\d+", out)
    # These files are written for GPUs (fp16 and all): plan them for the GPU gpt-neox trained on.
    code, out, err = run_deepy(capsys, ["plan", *argv, "--baseline_mb", "400", "--accelerator", "A100-80GB"])
    assert code == 0, err
    total = int(re.search(r"parameters\s+([\d,]+)", out).group(1).replace(",", ""))
    if name in PUBLISHED_PARAMS:
        assert total == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("setup", SETUP_FILES)
def test_setup_files_combine_with_a_model_file(capsys, paths, setup):
    argv = argv_for("125M.yml", paths, setup)
    code, out, err = run_deepy(capsys, ["show-config", *argv])
    assert code == 0, err


@pytest.mark.parametrize(("name", "feature"), sorted(MISSING_FEATURE_FILES.items()))
def test_files_of_missing_features_name_the_feature(capsys, paths, name, feature):
    code, _, err = run_deepy(capsys, ["show-config", *argv_for(name, paths)])
    assert code == 2 and feature in err and "neox does not have" in err
    assert "unknown config key" not in err and "Traceback" not in err

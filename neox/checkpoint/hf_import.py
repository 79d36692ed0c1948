"""A local Hugging Face GPTNeoX / GPT-2 / Llama / Mistral / Mixtral / Qwen2-MoE model (safetensors, .bin or GGUF) -> a
consolidated neox model plus the model.yml that fine-tunes it: `deepy.py train OUT/model.yml my_data.yml`.

The weights go through neox.model.hf (the one exact mapping). The vocabulary is padded with zero rows to a multiple
of make_vocab_size_divisible_by x tp, so the same directory loads at any tensor-parallel size up to --tp.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from neox.checkpoint.consolidated import save_consolidated
from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.hf_reward import from_hf_reward_state_dict, is_hf_reward_model
from neox.checkpoint.hf_tokenizer import import_tokenizer
from neox.config.load import load_config
from neox.model.hf import from_hf_state_dict

MODEL_YAML = "model.yml"
StateDict = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class ImportOptions:
    tp: int = 1
    pp: int = 0
    gguf_file: str | None = None
    make_vocab_size_divisible_by: int = 128
    seq_length: int | None = None  # default: the model's max_position_embeddings


def read_hf_model(hf_dir: Path, gguf_file: str | None = None, progress: bool = True):
    """(HF config, fp32 state dict) of a local model directory, without instantiating the model unless GGUF."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if gguf_file is not None:
        if not (hf_dir / gguf_file).is_file():
            raise CheckpointError(f"{hf_dir / gguf_file} does not exist; --gguf-file names a file in --hf")
        # transformers dequantises GGUF tensors while building the model; there is no lighter reader.
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), gguf_file=gguf_file, dtype=torch.float32)
        return model.config, {k: v.detach() for k, v in model.state_dict().items()}
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir} is not a Hugging Face model directory: it has no config.json. Pass --hf the "
                              "directory save_pretrained (or a hub download) wrote: config.json, model.safetensors "
                              "or pytorch_model.bin, and the tokenizer files; for a .gguf file add --gguf-file NAME")
    try:
        config = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{hf_dir}: cannot read a Hugging Face config.json: {err}") from None
    files = _weight_files(hf_dir)
    weights: StateDict = {}
    for path in tqdm(files, desc="reading weights", unit="file", disable=not progress or len(files) < 2):
        weights.update(_read_weight_file(path))
    return config, {k: v.to(torch.float32) for k, v in weights.items()}


def _weight_files(hf_dir: Path) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (hf_dir / single).is_file():
            return [hf_dir / single]
        if (hf_dir / index_name).is_file():
            index = json.loads((hf_dir / index_name).read_text(encoding="utf-8"))
            return [hf_dir / name for name in sorted(set(index["weight_map"].values()))]
    raise CheckpointError(f"{hf_dir} has no model.safetensors, pytorch_model.bin or their sharded index; for a "
                          "GGUF file pass --gguf-file NAME")


def _read_weight_file(path: Path) -> StateDict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickles with code in them are refused by weights_only
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {err}") from None


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat((t, t.new_zeros(rows - t.shape[0], *t.shape[1:])))


def model_yaml(model_cfg, tokenizer_type: str, vocab_file: Path | None, merge_file: Path | None, load_dir: Path,
               opts: ImportOptions, reward: bool = False) -> str:
    """The YAML a user trains with: architecture, tokenizer, and `load` + `finetune` pointing at the weights (and for
    a reward model, train_impl rm on pairwise data)."""
    model = {k: v for k, v in dataclasses.asdict(model_cfg).items()}
    body = {
        **model,
        **({"train_impl": "rm", "dataset_impl": "pairwise"} if reward else {}),
        "model_parallel_size": opts.tp,
        "pipe_parallel_size": opts.pp,
        "tokenizer_type": tokenizer_type,
        "vocab_file": str(vocab_file) if vocab_file else None,
        "merge_file": str(merge_file) if merge_file else None,
        "load": str(load_dir),
        "finetune": True,
    }
    header = (f"# Imported by tools/convert_hf_to_neox.py: the architecture and tokenizer of the model in {load_dir}.\n"
              f"# Fine-tune: python launcher/deepy.py train {load_dir / MODEL_YAML} my_data.yml\n"
              "# (my_data.yml: data_path, save, train_iters, batch and optimizer keys; later files win, but the\n"
              "# architecture keys must stay as they are here for the weights to load).\n")
    return header + yaml.safe_dump(body, sort_keys=False, width=120)


def _padded_weights(hf_config, hf_weights: StateDict, tokenizer_vocab: int, opts: ImportOptions):
    """(ModelConfig, neox weights) with the vocabulary rows zero-padded to a multiple of divisible_by x tp."""
    # A *ForSequenceClassification is a reward model: its score layer becomes the value head (hf_reward.py).
    reward = is_hf_reward_model(hf_config)
    convert = from_hf_reward_state_dict if reward else from_hf_state_dict
    model_cfg, weights = convert(hf_config, hf_weights, opts.make_vocab_size_divisible_by)
    multiple = opts.make_vocab_size_divisible_by * opts.tp
    padded = multiple * -(-max(hf_config.vocab_size, tokenizer_vocab) // multiple)
    for key in ("embedding.word_embeddings.weight", "head.weight"):
        if key in weights:
            weights[key] = _pad_rows(weights[key], padded)
    if not model_cfg.no_weight_tying and not reward:
        weights["head.weight"] = weights["embedding.word_embeddings.weight"]
    model_cfg.padded_vocab_size = padded
    if opts.seq_length is not None:
        model_cfg.seq_length = opts.seq_length
    return model_cfg, weights


def convert_hf_to_neox(hf_dir: str | Path, out_dir: str | Path, opts: ImportOptions = ImportOptions(),
                       progress: bool = True) -> Path:
    hf_dir, out_dir = Path(hf_dir).expanduser(), Path(out_dir).expanduser().absolute()
    if not hf_dir.is_dir():
        raise CheckpointError(f"--hf {hf_dir} is not a directory")
    if opts.tp < 1 or opts.pp < 0:
        raise CheckpointError(f"--tp must be >= 1 and --pp >= 0, got {opts.tp} and {opts.pp}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=4, desc="hf -> neox", unit="step", disable=not progress) as steps, \
            tempfile.TemporaryDirectory(prefix=".convert-", dir=out_dir.parent) as work_name:
        work = Path(work_name)
        hf_config, hf_weights = read_hf_model(hf_dir, opts.gguf_file, progress)
        steps.update()
        imported = import_tokenizer(hf_dir, work, opts.gguf_file)
        steps.update()
        model_cfg, weights = _padded_weights(hf_config, hf_weights, imported.tokenizer.vocab_size, opts)
        del hf_weights
        steps.update()
        tok_dir = out_dir / "tokenizer"
        text = model_yaml(model_cfg, imported.tokenizer_type, tok_dir / imported.vocab_name if imported.vocab_name
                          else None, tok_dir / imported.merge_name if imported.merge_name else None, out_dir, opts,
                          reward=is_hf_reward_model(hf_config))
        (work / MODEL_YAML).write_text(text, encoding="utf-8")
        # Resolve as `deepy train` will, so a key the config rejects fails here and not at training time. (A batch
        # size is needed to resolve at all; the user's data config supplies the real one.)
        cfg = load_config([work / MODEL_YAML], ["--train_micro_batch_size_per_gpu", "1"],
                          vocab_size=imported.tokenizer.vocab_size, local_gpus=opts.tp * max(opts.pp, 1))
        saved = save_consolidated(out_dir, cfg, weights, imported.files, source=str(hf_dir),
                                  extra_files={MODEL_YAML: text})
        steps.update()
    return saved

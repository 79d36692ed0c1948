"""One full fp32 GPTNeoX state dict from a trained checkpoint, and the topology-free consolidated format.

A trained checkpoint ({save}/global_stepN) holds DeepSpeed's files for the layout it was trained at. Its weights:
- ZeRO 0/1/2 in fp32: `module` of mp_rank_00_model_states.pt (the engine keeps it in step with the optimizer).
- ZeRO 0/1/2 in bf16/fp16: the fp32 master copy, split across the data-parallel ranks' optimizer files
  (`single_partition_of_fp32_groups`: each param group flattened in parameter order, each param followed by its
  alignment padding, the flat vector cut into equal rank slices).
- ZeRO 3: every parameter is cut separately into ceil(numel / ranks) pieces; rank r's `fp32_flat_groups` holds its
  piece of each parameter in order, so parameter i is the concatenation of the ranks' pieces, trimmed to numel.
- Tensor / pipeline parallel: merged by neox.parallel from the layout-free state checkpoints carry, or from
  DeepSpeed's own files when saved without it (checkpoint_layout_free: false).
- A checkpoint EleutherAI's gpt-neox wrote (global_stepN with configs/): read by neox.checkpoint.gpt_neox.
All files are read with torch.load(weights_only=True): only tensors and a few plain DeepSpeed records are allowed.

The consolidated format (what the HF converters read and write, and what finetune can start from):
    DIR/model.safetensors   fp32 weights in our naming (a tied head is stored once, as the embedding)
    DIR/config.yml          the resolved config
    DIR/tokenizer/          the tokenizer files
    DIR/complete.json       {"format": "neox-consolidated/1", ...}, written last
The directory is built under a temporary name next to DIR and renamed into place.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file

from neox.checkpoint.engine_state import COMPLETE_MARKER, has_engine_state, resolve_load_tag
from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.gpt_neox import GptNeoxCheckpoint, find_gpt_neox_checkpoint, is_gpt_neox_checkpoint
from neox.checkpoint.layout_rebuild import merged_weights
from neox.checkpoint.layout_state import consolidated_weights, has_layout_free_state
from neox.checkpoint.lora_base import BASE_FILE, base_of, is_lora_checkpoint
from neox.checkpoint.safe_load import load_state_file
from neox.config.lora import lora_settings
from neox.config.neox_config import NeoXConfig
from neox.config.resolved import load_resolved, save_resolved
from neox.model import GPTNeoX
from neox.model.base_shapes import mup_setup
from neox.model.lora import adapter_state, check_adapters, merged_state
from neox.model.shapes import state_shapes
from neox.model.value_head import is_reward_model
from neox.model.state import persistent_buffers
from neox.tokenizer import Tokenizer, build_tokenizer

CONSOLIDATED_FORMAT = "neox-consolidated/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yml"
TOKENIZER_DIR = "tokenizer"
_STEP_DIR = re.compile(r"^global_step(\d+)$")
_RANK_IN_NAME = re.compile(r"zero_pp_rank_(\d+)_")
_TIED_HEAD = "head.weight"
_EMBEDDING = "embedding.word_embeddings.weight"

StateDict = dict[str, torch.Tensor]

__all__ = ["CONSOLIDATED_FORMAT", "find_checkpoint", "consolidate", "load_model", "lora_adapters",
           "save_consolidated", "read_consolidated", "is_consolidated", "checkpoint_tokenizer"]


# --------------------------------------------------------------------------------------------- finding

def _marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_consolidated(path: str | Path) -> bool:
    marker = _marker(Path(path))
    return marker is not None and marker.get("format") == CONSOLIDATED_FORMAT


def find_checkpoint(path: str | Path, iteration: int | None = None) -> Path:
    """The checkpoint directory `path` designates: a consolidated dir, a global_stepN dir, or a training save dir
    (its `latest` if complete, else its newest complete checkpoint; `iteration` picks global_step{iteration})."""
    path = Path(path).expanduser()
    kinds = "a training save directory, a global_stepN checkpoint or a consolidated model directory"
    if not path.is_dir():
        raise CheckpointError(f"{path} {'is not a directory' if path.exists() else 'does not exist'}; pass {kinds}")
    gpt_neox = find_gpt_neox_checkpoint(path, iteration)  # a checkpoint EleutherAI's gpt-neox wrote
    if gpt_neox is not None:
        return gpt_neox
    if is_consolidated(path):
        saved = _marker(path).get("iteration")  # type: ignore[union-attr]
        if iteration is not None and saved != iteration:
            raise CheckpointError(f"{path} is a consolidated model of iteration {saved}, not {iteration}; "
                                  "drop --iteration or pass the training save directory")
        return path
    step = _STEP_DIR.match(path.name)
    if step:
        if _marker(path) is None:
            raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER}: its save was cut off)")
        if iteration is not None and iteration != int(step.group(1)):
            raise CheckpointError(f"{path} is iteration {step.group(1)}, not {iteration}; pass its parent directory")
        return path
    tag = resolve_load_tag(path, iteration)
    if tag is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (no global_stepN/{COMPLETE_MARKER}, no "
                              f"consolidated {COMPLETE_MARKER}); pass {kinds}")
    return path / tag


# --------------------------------------------------------------------------------------------- consolidating

def consolidate(checkpoint_dir: str | Path) -> tuple[NeoXConfig, StateDict]:
    """The config and full fp32 single-device state dict (GPTNeoX naming) of a checkpoint directory."""
    checkpoint_dir = Path(checkpoint_dir)
    if is_consolidated(checkpoint_dir):
        return read_consolidated(checkpoint_dir)
    if is_gpt_neox_checkpoint(checkpoint_dir):
        gpt_neox = GptNeoxCheckpoint.open(checkpoint_dir)
        return gpt_neox.config, gpt_neox.weights()
    cfg = _saved_config(checkpoint_dir)
    settings = lora_settings(cfg.train.lora)
    if settings is not None:
        # A LoRA run saved its adapters only: the model it trained is its base with them folded in.
        _, adapters, base_dir = lora_adapters(checkpoint_dir)
        _, base = consolidate(base_dir)
        if base[_EMBEDDING].shape[0] != cfg.model.padded_vocab_size:  # the run re-padded the base's vocabulary
            base = {k: _resized_rows(t, cfg.model.padded_vocab_size) if k in (_EMBEDDING, _TIED_HEAD) else t
                    for k, t in base.items()}
        weights = merged_state(base, adapters, settings)
    else:
        weights = _trained_weights(checkpoint_dir, cfg)
    _check_weights(cfg, weights, checkpoint_dir)
    return cfg, weights


def _trained_weights(checkpoint_dir: Path, cfg: NeoXConfig) -> StateDict:
    """The parameters a training checkpoint of neox holds (a LoRA run's: its adapters), in fp32."""
    # Saved with no_save_optim: no DeepSpeed files, the weights are the layout-free copy alone.
    if cfg.parallel.is_model_parallel or not has_engine_state(checkpoint_dir):
        return merge_parallel_checkpoint(checkpoint_dir, cfg)
    if cfg.optim.zero_stage == 3:
        return _zero3_weights(checkpoint_dir)
    if cfg.optim.precision in ("fp16", "bfloat16"):
        return _master_weights(checkpoint_dir)
    return _module_weights(checkpoint_dir)


def lora_adapters(checkpoint_dir: str | Path) -> tuple[NeoXConfig, StateDict, Path]:
    """A LoRA run's checkpoint: (its config, its adapters in fp32 and single-device names, the base directory)."""
    checkpoint_dir = Path(checkpoint_dir)
    cfg = _saved_config(checkpoint_dir)
    settings = lora_settings(cfg.train.lora)
    if settings is None or not is_lora_checkpoint(checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir} is not a checkpoint of a LoRA run (its config has no 'lora' or it "
                              f"has no {BASE_FILE})")
    base_dir = base_of(checkpoint_dir)
    adapters = adapter_state(_trained_weights(checkpoint_dir, cfg))
    try:
        check_adapters(adapters, state_shapes(cfg.model), settings, str(checkpoint_dir))
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    return cfg, adapters, base_dir


def _resized_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t[:rows].clone() if t.shape[0] >= rows else torch.cat((t, t.new_zeros(rows - t.shape[0], *t.shape[1:])))


def merge_parallel_checkpoint(checkpoint_dir: Path, cfg: NeoXConfig) -> StateDict:
    """Tensor/pipeline-parallel checkpoints: neox.parallel writes every rank's full-precision parameters in
    single-device names (layout_free/) and knows how it split them; it merges them back. A checkpoint saved
    without that copy (checkpoint_layout_free: false) is merged from DeepSpeed's own files instead. A LoRA run's
    hold its adapters only (no embedding to tie a head to)."""
    tied = not cfg.model.no_weight_tying and lora_settings(cfg.train.lora) is None and not is_reward_model(cfg)
    if has_layout_free_state(checkpoint_dir):
        weights = consolidated_weights(checkpoint_dir, tied_head=tied)
    else:
        weights = merged_weights(checkpoint_dir)
        if tied:
            weights[_TIED_HEAD] = weights[_EMBEDDING]
    weights.update(persistent_buffers(cfg.model))  # both hold parameters only (rotary_save_freqs_buffer's inv_freq)
    return {k: v.detach().to(torch.float32) for k, v in weights.items()}


def _saved_config(checkpoint_dir: Path) -> NeoXConfig:
    path = checkpoint_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir} has no {CONFIG_FILE}: not a checkpoint written by neox")
    return load_resolved(path)


def _model_states(checkpoint_dir: Path, name: str = "mp_rank_00_model_states.pt") -> dict[str, Any]:
    path = checkpoint_dir / name
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir} has no {name}: not a complete DeepSpeed checkpoint")
    return load_state_file(path)


def _module_weights(checkpoint_dir: Path) -> StateDict:
    module = _model_states(checkpoint_dir).get("module")
    if not isinstance(module, dict):
        raise CheckpointError(f"{checkpoint_dir / 'mp_rank_00_model_states.pt'} has no 'module' state dict")
    return {k: v.detach().to(torch.float32, copy=True) for k, v in module.items()}


def _rank_files(checkpoint_dir: Path, suffix: str) -> list[Path]:
    """zero_pp_rank_R_mp_rank_00_{suffix} files (bf16_ prefixed or not), ordered by data-parallel rank R."""
    files = sorted(checkpoint_dir.glob(f"*zero_pp_rank_*_mp_rank_00_{suffix}"),
                   key=lambda p: int(_RANK_IN_NAME.search(p.name).group(1)))  # type: ignore[union-attr]
    ranks = [int(_RANK_IN_NAME.search(p.name).group(1)) for p in files]  # type: ignore[union-attr]
    if not files or ranks != list(range(len(files))):
        raise CheckpointError(f"{checkpoint_dir}: expected zero_pp_rank_0.._mp_rank_00_{suffix} for every "
                              f"data-parallel rank, found ranks {ranks or 'none'}")
    return files


def _optimizer_states(files: list[Path]) -> list[dict[str, Any]]:
    states = []
    for path in files:
        state = load_state_file(path).get("optimizer_state_dict")
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} has no optimizer_state_dict")
        states.append(state)
    counts = states[0].get("partition_count")
    count = max(counts) if isinstance(counts, (list, tuple)) else counts
    if count is not None and int(count) != len(files):
        raise CheckpointError(f"{files[0].parent}: the optimizer was partitioned over {count} ranks but "
                              f"{len(files)} optimizer files are present")
    return states


def _named_shapes(model_states: dict[str, Any], origin: Path) -> list[dict[str, torch.Size]]:
    shapes = model_states.get("param_shapes")
    if not isinstance(shapes, list) or not all(isinstance(g, dict) for g in shapes):
        raise CheckpointError(f"{origin} has no 'param_shapes' (parameter order of the optimizer groups)")
    if model_states.get("frozen_param_shapes"):
        raise CheckpointError(f"{origin} has frozen parameters, which neox never trains with")
    return shapes


def _with_buffers_and_shared(weights: StateDict, model_states: dict[str, Any]) -> StateDict:
    module = model_states.get("module") or {}
    for name in model_states.get("buffer_names") or []:
        if name in module:
            weights[name] = module[name].detach().to(torch.float32, copy=True)
    for alias, owner in (model_states.get("shared_params") or {}).items():
        if owner in weights:
            weights[alias] = weights[owner]
    return weights


def _master_weights(checkpoint_dir: Path) -> StateDict:
    """fp32 master weights of a ZeRO 0/1/2 run in bf16/fp16."""
    model_states = _model_states(checkpoint_dir)
    shapes = _named_shapes(model_states, checkpoint_dir / "mp_rank_00_model_states.pt")
    states = _optimizer_states(_rank_files(checkpoint_dir, "optim_states.pt"))
    if "single_partition_of_fp32_groups" not in states[0]:
        raise CheckpointError(f"{checkpoint_dir}: the optimizer files hold no fp32 master weights "
                              "('single_partition_of_fp32_groups')")
    paddings = states[0].get("param_alignment_paddings")
    weights: StateDict = {}
    for g, group_shapes in enumerate(shapes):
        flat = torch.cat([s["single_partition_of_fp32_groups"][g].reshape(-1) for s in states])
        offset = 0
        for i, (name, shape) in enumerate(group_shapes.items()):
            numel = math.prod(shape)
            if offset + numel > flat.numel():
                raise CheckpointError(f"{checkpoint_dir}: optimizer group {g} is shorter than its parameters "
                                      f"({name} ends at {offset + numel} of {flat.numel()})")
            weights[name] = flat[offset:offset + numel].view(shape).to(torch.float32, copy=True)
            offset += numel + (int(paddings[g][i]) if paddings else 0)
    return _with_buffers_and_shared(weights, model_states)


def _zero3_weights(checkpoint_dir: Path) -> StateDict:
    model_files = _rank_files(checkpoint_dir, "model_states.pt")
    model_states = load_state_file(model_files[0])
    shapes = _named_shapes(model_states, model_files[0])
    states = _optimizer_states(_rank_files(checkpoint_dir, "optim_states.pt"))
    if len(states) != len(model_files):
        raise CheckpointError(f"{checkpoint_dir}: {len(model_files)} model state files but {len(states)} optimizer "
                              "files")
    if "fp32_flat_groups" not in states[0]:
        raise CheckpointError(f"{checkpoint_dir}: the optimizer files hold no ZeRO-3 'fp32_flat_groups'")
    ranks = len(states)
    flats = [torch.cat([t.reshape(-1) for t in s["fp32_flat_groups"]]) for s in states]
    weights: StateDict = {}
    offset = 0
    for name, shape in ((n, s) for group in shapes for n, s in group.items()):
        numel = math.prod(shape)
        piece = math.ceil(numel / ranks)
        if offset + piece > flats[0].numel():
            raise CheckpointError(f"{checkpoint_dir}: ZeRO-3 partitions end before parameter {name}")
        full = torch.cat([flat[offset:offset + piece] for flat in flats])[:numel]
        weights[name] = full.view(shape).to(torch.float32, copy=True)
        offset += piece
    return _with_buffers_and_shared(weights, model_states)


def _check_weights(cfg: NeoXConfig, weights: StateDict, origin: Path) -> None:
    expected = state_shapes(cfg.model, value_head=is_reward_model(cfg))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = [f"{k} {tuple(weights[k].shape)} (config says {tuple(expected[k])})"
             for k in expected if k in weights and weights[k].shape != expected[k]]
    if missing or extra or wrong:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                 f"wrong shapes {wrong[:3]}" if wrong else ""]
        raise CheckpointError(f"{origin}: the weights do not match its config.yml: "
                              + "; ".join(p for p in parts if p))


# --------------------------------------------------------------------------------------------- tokenizer, model

def checkpoint_tokenizer(checkpoint_dir: str | Path, cfg: NeoXConfig) -> Tokenizer:
    """The tokenizer a checkpoint was trained with, built from its own tokenizer/ copy."""
    folder = Path(checkpoint_dir) / TOKENIZER_DIR

    def local(name: str | None) -> str | Path | None:
        if name is None:
            return None
        copy = folder / Path(name).name
        return copy if copy.is_file() else name  # a tiktoken encoding name is not a file

    vocab, merges = local(cfg.data.vocab_file), local(cfg.data.merge_file)
    if cfg.data.vocab_file is not None and merges is None and (folder / "merges.txt").is_file():
        vocab, merges = folder / "vocab.json", folder / "merges.txt"  # HFGPT2Tokenizer given a directory
    return build_tokenizer(cfg.data.tokenizer_type, vocab, merges)


def load_model(path: str | Path, iteration: int | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[GPTNeoX, NeoXConfig, Tokenizer]:
    """A checkpoint as one single-device model in eval mode, with its config and tokenizer."""
    checkpoint_dir = find_checkpoint(path, iteration)
    cfg, weights = consolidate(checkpoint_dir)
    # Building the model draws initial weights from the global RNG; the caller's sampling seed must not move.
    with torch.random.fork_rng(devices=[]):
        model = GPTNeoX(cfg.model, mup_setup(cfg.mup), value_head=is_reward_model(cfg))  # muP keeps its multipliers
    model.load_state_dict(weights, strict=True)
    model.to(device=device, dtype=dtype).eval()
    return model, cfg, checkpoint_tokenizer(checkpoint_dir, cfg)


# --------------------------------------------------------------------------------------------- consolidated format

def _stored_tensors(cfg: NeoXConfig, state_dict: StateDict, out_dir: Path) -> StateDict:
    tied = not cfg.model.no_weight_tying
    if tied and _TIED_HEAD in state_dict and not torch.equal(state_dict[_TIED_HEAD], state_dict[_EMBEDDING]):
        raise CheckpointError(f"{out_dir}: the config ties the head to the embedding (no_weight_tying false) but "
                              "the state dict's head.weight differs from it")
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state_dict.items()
            if not (tied and k == _TIED_HEAD)}


def save_consolidated(out_dir: str | Path, cfg: NeoXConfig, state_dict: StateDict,
                      tokenizer_files: Iterable[str | Path], *, iteration: int | None = None,
                      source: str | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write the consolidated format to out_dir atomically; extra_files (name -> text) go in beside it.
    An existing out_dir is replaced only if it is empty or itself a consolidated model."""
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not (out_dir.is_dir() and (is_consolidated(out_dir) or not any(out_dir.iterdir()))):
        raise CheckpointError(f"{out_dir} exists and is not a consolidated model; choose a new output directory")
    _check_weights(cfg, dict(state_dict), out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(_stored_tensors(cfg, state_dict, out_dir), str(tmp / WEIGHTS_FILE),
                  metadata={"format": CONSOLIDATED_FORMAT})
        save_resolved(cfg, tmp / CONFIG_FILE)
        (tmp / TOKENIZER_DIR).mkdir()
        for f in tokenizer_files:
            shutil.copy2(f, tmp / TOKENIZER_DIR / Path(f).name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        marker = {"format": CONSOLIDATED_FORMAT, "iteration": iteration, "source": source, "time": time.time()}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by the finished directory tmp; the old copy is removed only once the new one is in place."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def read_consolidated(directory: str | Path) -> tuple[NeoXConfig, StateDict]:
    directory = Path(directory)
    if not is_consolidated(directory):
        raise CheckpointError(f"{directory} is not a consolidated model (no {COMPLETE_MARKER} with format "
                              f"{CONSOLIDATED_FORMAT}); write one with tools/convert_hf_to_neox.py")
    cfg = load_resolved(directory / CONFIG_FILE)
    try:
        weights = load_file(str(directory / WEIGHTS_FILE))
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointError(f"cannot read {directory / WEIGHTS_FILE}: {err}") from None
    if not cfg.model.no_weight_tying and _EMBEDDING in weights and not is_reward_model(cfg):
        weights[_TIED_HEAD] = weights[_EMBEDDING]
    _check_weights(cfg, weights, directory)
    return cfg, weights

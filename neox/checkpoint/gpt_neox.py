"""A checkpoint written by EleutherAI's gpt-neox, read as one single-device neox state dict and its config.

gpt-neox saves through DeepSpeed into {save}/global_stepN/ ({save}/latest holds the newest tag):
    configs/*.yml                        the YAML files the run was started with, as the user wrote them
    layer_XX-model_YY-model_states.pt    pipeline layout (pipe_parallel_size >= 1): the state dict of layer XX on
                                         tensor-parallel rank YY (every pipeline stage writes its own layers)
    mp_rank_YY_model_states.pt           DeepSpeed's engine record of tp rank YY plus gpt-neox's client state; in the
                                         sequential layout (pipe_parallel_size 0) its `module` is the whole model,
                                         keys `sequential.XX.<name>`
    [bf16_]zero_pp_rank_*_optim_states   the optimizer, not read: its partitioning cannot be mapped to ours
Layers XX follow gpt-neox's GPT2ModelPipe: 0 embedding (word_embeddings, position_embeddings when learned), 1 a
parameter-free transpose, 2 .. L+1 the transformer layers, L+2 a transpose, L+3 the final norm (`norm.`), L+4 the
output head (`final_linear.`; absent when tied, the head being layer 0's word embedding).

Tensor-parallel shards are merged the way gpt-neox's forward pass uses them:
- column-parallel, split along the output rows: word_embeddings (the padded vocabulary), query_key_value,
  mlp.linear1 (legacy dense_h_to_4h; Llama legacy w1, w3), final_linear;
- row-parallel, split along the input columns: attention.dense and mlp.linear2 (dense_4h_to_h; w2) weights;
- replicated: norms and learned position embeddings (the ranks' mean, as gpt-neox's converter takes), and the
  row-parallel biases. Every rank holds the whole bias: with gpt_j_residual each rank adds its copy before the one
  all-reduce of the layer, so the model's bias is their sum (what gpt-neox's convert_neox_to_hf.py always takes);
  with the sequential residual it is added once after the all-reduce, so it is one copy (their mean).
query_key_value rows on a rank: multi-head attention interleaves [q, k, v] per head, which is our layout, so the
ranks' shards just concatenate; grouped-query attention stacks [the rank's q heads | its k heads | its v heads],
regrouped here into our [q.., k, v] per key/value group. A gated MLP's linear1 is [value | gate] on every rank.
Rotary (and sinusoidal, ALiBi) buffers are recomputed from the config, not read. The weights are the module's, in
the precision it trained in (fp16 / bf16 runs keep their fp32 master copy in the optimizer files), as gpt-neox's own
converter reads them; they are returned in fp32.

The config is gpt-neox's own YAML read by neox.config.load_config, as for a one-replica run on this machine (the
launch and batch keys are overridden: they do not shape the weights); padded_vocab_size is the row count of the
stored embedding (gpt-neox padded the tokenizer's vocabulary to make_vocab_size_divisible_by x tp).

Files are read with torch.load(weights_only=True). Layer files hold tensors only; mp_rank files also carry DeepSpeed's
and gpt-neox's records (numpy RNG state, an args record, loss scaler): those plain types are allow-listed, and a file
that needs anything else is refused, naming the file and the types it asks for.
"""
from __future__ import annotations

import argparse
import re
import zipfile
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from neox.checkpoint.engine_state import LATEST_FILE
from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.safe_load import deepspeed_record_types, weights_only_load
from neox.config.errors import ConfigError
from neox.config.load import load_config
from neox.config.model import ModelConfig
from neox.config.neox_config import NeoXConfig
from neox.config.yaml_file import read_config_file
from neox.model.shapes import state_shapes

CONFIG_DIR = "configs"
PIPELINE, SEQUENTIAL = "pipeline", "sequential"
_LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
_MP_RANK_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_STEP_DIR = re.compile(r"^global_step(\d+)$")
_SEQUENTIAL_KEY = re.compile(r"^sequential\.(\d+)\.(.+)$")
_OUR_CONFIG = "config.yml"  # neox's own checkpoints carry it; gpt-neox's never do
_CONFIG_SUFFIXES = (".yml", ".yaml", ".json")
# Buffers derived from the config (rotary / sinusoidal frequencies, ALiBi slopes) and Transformer Engine metadata.
_DERIVED_SUFFIXES = ("inv_freq", "alibi_embed.slopes", "_extra_state")

StateDict = dict[str, torch.Tensor]

__all__ = ["GptNeoxCheckpoint", "is_gpt_neox_checkpoint", "find_gpt_neox_checkpoint", "open_gpt_neox_checkpoint"]


# --------------------------------------------------------------------------------------------- recognising

def _model_files(directory: Path) -> tuple[str, list[int]] | None:
    """(layout, tp ranks found) of a directory's model files, or None when it has none."""
    layer0 = sorted(int(m.group(2)) for p in directory.glob("layer_00-model_*-model_states.pt")
                    if (m := _LAYER_FILE.match(p.name)))
    if layer0:
        return PIPELINE, layer0
    ranks = sorted(int(m.group(1)) for p in directory.glob("mp_rank_*_model_states.pt")
                   if (m := _MP_RANK_FILE.match(p.name)))
    return (SEQUENTIAL, ranks) if ranks else None


def is_gpt_neox_checkpoint(path: str | Path) -> bool:
    """A global_stepN directory as gpt-neox writes it: configs/ beside DeepSpeed model files, and none of neox's own
    config.yml."""
    path = Path(path)
    return ((path / CONFIG_DIR).is_dir() and not (path / _OUR_CONFIG).exists()
            and _model_files(path) is not None)


def _step_dirs(save_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in save_dir.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if is_gpt_neox_checkpoint(p)]


def find_gpt_neox_checkpoint(path: str | Path, iteration: int | None = None) -> Path | None:
    """The gpt-neox checkpoint `path` designates, or None when it is not gpt-neox's: a global_stepN directory, or a
    save directory (global_step{iteration}, else the tag in its `latest`, else its newest global_stepN)."""
    path = Path(path).expanduser()
    if is_gpt_neox_checkpoint(path):
        step = _STEP_DIR.match(path.name)
        if iteration is not None and step and int(step.group(1)) != iteration:
            raise CheckpointError(f"{path} is iteration {step.group(1)}, not {iteration}; pass its parent directory")
        return path
    if not path.is_dir():
        return None
    steps = _step_dirs(path)
    if iteration is not None:
        wanted = path / f"global_step{iteration}"
        if steps and wanted not in steps:
            raise CheckpointError(f"{path} is a gpt-neox save directory without a global_step{iteration} checkpoint; "
                                  f"it has {', '.join(p.name for p in steps)}")
        return wanted if steps else None
    latest = path / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        if tag and is_gpt_neox_checkpoint(path / tag):
            return path / tag
    return steps[-1] if steps else None


def open_gpt_neox_checkpoint(path: str | Path, iteration: int | None = None) -> GptNeoxCheckpoint | None:
    """The gpt-neox checkpoint `path` designates with its config read, or None when it is not gpt-neox's."""
    found = find_gpt_neox_checkpoint(path, iteration)
    return None if found is None else GptNeoxCheckpoint.open(found)


# --------------------------------------------------------------------------------------------- reading files

def _record_types() -> list[Any]:
    """The plain, non-executable objects DeepSpeed and gpt-neox pickle next to the tensors of an mp_rank file: numpy
    RNG state (under numpy 1's and 2's module names), an argparse args record, DeepSpeed's loss scaler records."""
    import numpy as np

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    found: list[Any] = [np.ndarray, np.dtype, reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"),
                        (reconstruct, "numpy._core.multiarray._reconstruct"), argparse.Namespace]
    found += [type(np.dtype(t)) for t in ("uint32", "int64", "float32", "float64")]
    found += deepspeed_record_types()
    return found


def _torch_load(path: Path, with_records: bool) -> dict[str, Any]:
    # torch's legacy (non-zip) format cannot be memory-mapped
    data = weights_only_load(path, mmap=zipfile.is_zipfile(path), allowed=_record_types() if with_records else ())
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not the state dict gpt-neox saves")
    return data


@dataclass
class _Shards:
    """Every tp rank's state dict of each gpt-neox layer index, read lazily (pipeline) or all at once (sequential)."""
    directory: Path
    layout: str
    tp: int
    _sequential: dict[int, list[dict[str, torch.Tensor]]] | None = field(default=None, repr=False)

    def origin(self, index: int, rank: int) -> str:
        if self.layout == PIPELINE:
            return str(self.directory / f"layer_{index:02d}-model_{rank:02d}-model_states.pt")
        return f"{self.directory / f'mp_rank_{rank:02d}_model_states.pt'} (module sequential.{index}.*)"

    def indices(self) -> set[int]:
        if self.layout == PIPELINE:
            return {int(m.group(1)) for p in self.directory.glob("layer_*-model_states.pt")
                    if (m := _LAYER_FILE.match(p.name))}
        return set(self._by_layer())

    def layer(self, index: int) -> list[dict[str, torch.Tensor]] | None:
        """One state dict per tp rank; None when the checkpoint has no such layer."""
        if self.layout == SEQUENTIAL:
            return self._by_layer().get(index)
        paths = [self.directory / f"layer_{index:02d}-model_{r:02d}-model_states.pt" for r in range(self.tp)]
        present = [p.is_file() for p in paths]
        if not any(present):
            return None
        if not all(present):
            missing = [p.name for p, ok in zip(paths, present) if not ok]
            raise CheckpointError(f"{self.directory}: layer {index} lacks the files of some tp ranks: {missing}")
        return [dict(_torch_load(p, with_records=False)) for p in paths]

    def _by_layer(self) -> dict[int, list[dict[str, torch.Tensor]]]:
        if self._sequential is None:
            by_layer: dict[int, list[dict[str, torch.Tensor]]] = {}
            for rank in range(self.tp):
                path = self.directory / f"mp_rank_{rank:02d}_model_states.pt"
                module = _torch_load(path, with_records=True).get("module")
                if not isinstance(module, dict) or not module:
                    raise CheckpointError(f"{path} has no 'module' weights (gpt-neox's sequential layout keeps the "
                                          "model there; a ZeRO-3 checkpoint partitions it and cannot be read)")
                for key, tensor in module.items():
                    match = _SEQUENTIAL_KEY.match(key)
                    if match is None:
                        raise CheckpointError(f"{path}: module key {key!r} is not gpt-neox's sequential.N.<name>")
                    layer = by_layer.setdefault(int(match.group(1)), [{} for _ in range(self.tp)])
                    layer[rank][match.group(2)] = tensor
            self._sequential = by_layer
        return self._sequential


# --------------------------------------------------------------------------------------------- the checkpoint

@dataclass(frozen=True)
class GptNeoxCheckpoint:
    """One gpt-neox global_stepN directory: its layout, tp size and config (padded_vocab_size from its weights)."""
    path: Path
    layout: str
    tp: int
    config: NeoXConfig
    shards: _Shards = field(repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path) -> GptNeoxCheckpoint:
        path = Path(path)
        found = _model_files(path)
        if found is None or not (path / CONFIG_DIR).is_dir():
            raise CheckpointError(f"{path} is not a gpt-neox checkpoint: it needs {CONFIG_DIR}/ and "
                                  "layer_XX-model_YY-model_states.pt or mp_rank_YY_model_states.pt files")
        layout, ranks = found
        if ranks != list(range(len(ranks))):
            raise CheckpointError(f"{path}: the tensor-parallel ranks of its model files are {ranks}, not 0.."
                                  f"{len(ranks) - 1}: some files are missing")
        cfg = _read_config(path, len(ranks))
        shards = _Shards(path, layout, len(ranks))
        cfg.model.padded_vocab_size = _embedding_rows(shards)
        return cls(path, layout, len(ranks), cfg, shards)

    @cached_property
    def iteration(self) -> int:
        """gpt-neox's step: its tag global_stepN, else the `iteration` of its client state."""
        step = _STEP_DIR.match(self.path.name)
        if step:
            return int(step.group(1))
        path = self.path / "mp_rank_00_model_states.pt"
        value = _torch_load(path, with_records=True).get("iteration") if path.is_file() else None
        if not isinstance(value, int):
            raise CheckpointError(f"{self.path}: neither a global_stepN name nor an 'iteration' in {path.name}")
        return value

    def weights(self) -> StateDict:
        """The full fp32 state dict in neox's names (a tied head is the embedding tensor itself)."""
        weights = _merge(self.shards, self.config.model)
        _check_shapes(self, weights)
        return weights


def _read_config(path: Path, tp: int) -> NeoXConfig:
    folder = path / CONFIG_DIR
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _CONFIG_SUFFIXES)
    if not files:
        raise CheckpointError(f"{folder} holds no YAML config ({', '.join(_CONFIG_SUFFIXES)} files)")
    try:
        raw: dict[str, Any] = {}
        for file in files:
            raw.update(read_config_file(file)[0])
        # One replica on this machine: the run's launch keys and global batch describe its cluster, not its weights.
        ranks = _int_key(raw, "model_parallel_size", 1) * max(_int_key(raw, "pipe_parallel_size", 0), 1)
        overrides = {"num_gpus": ranks, "num_nodes": 1, "hostfile": "null", "include": "null", "exclude": "null",
                     "train_batch_size": "null"}
        if raw.get("train_micro_batch_size_per_gpu") is None:
            overrides["train_micro_batch_size_per_gpu"] = 1
        argv = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
        cfg = load_config(files, argv, local_gpus=ranks)
    except ConfigError as err:
        raise CheckpointError(f"gpt-neox checkpoint {path}: its {CONFIG_DIR}/ does not load: {err}") from None
    if cfg.parallel.model_parallel_size != tp:
        raise CheckpointError(f"{path}: {CONFIG_DIR}/ says model_parallel_size {cfg.parallel.model_parallel_size} "
                              f"but the model files are of {tp} tensor-parallel rank(s)")
    return cfg


def _int_key(raw: dict[str, Any], key: str, default: int) -> int:
    """A positive integer key of the YAML as written, else `default` (load_config then reports a bad value)."""
    value = raw.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _embedding_rows(shards: _Shards) -> int:
    ranks = shards.layer(0)
    if ranks is None or any("word_embeddings.weight" not in r for r in ranks):
        raise CheckpointError(f"{shards.directory}: no word_embeddings.weight in layer 0 ({shards.origin(0, 0)})")
    return sum(int(r["word_embeddings.weight"].shape[0]) for r in ranks)


# --------------------------------------------------------------------------------------------- merging

class _Layer:
    """The tp ranks' state dicts of one layer; take() consumes keys so that what is left over can be reported."""

    def __init__(self, shards: _Shards, index: int):
        self.shards, self.index = shards, index
        ranks = shards.layer(index)
        if ranks is None:
            raise CheckpointError(f"{shards.directory}: no weights for gpt-neox layer {index} "
                                  f"(expected {shards.origin(index, 0)})")
        self.ranks = [dict(state) for state in ranks]  # a copy: take() must not empty the shards' cache

    def has(self, key: str) -> bool:
        return bool(self.ranks) and key in self.ranks[0]

    def take(self, key: str) -> list[torch.Tensor]:
        out = []
        for rank, state in enumerate(self.ranks):
            if key not in state:
                raise CheckpointError(f"{self.shards.origin(self.index, rank)} has no '{key}'")
            out.append(state.pop(key).detach().to(torch.float32))
        return out

    def take_any(self, *keys: str) -> list[torch.Tensor] | None:
        for key in keys:
            if self.has(key):
                return self.take(key)
        return None

    def drop(self, prefix: str) -> None:
        """Consume the keys under prefix: parameters gpt-neox keeps that this model does not use."""
        for state in self.ranks:
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]

    def check_consumed(self) -> None:
        for rank, state in enumerate(self.ranks):
            left = sorted(k for k in state if not k.endswith(_DERIVED_SUFFIXES))
            if left:
                raise CheckpointError(f"{self.shards.origin(self.index, rank)}: parameters with no counterpart in "
                                      f"neox's model: {', '.join(left[:6])}")


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.cat(tensors, dim=dim) if len(tensors) > 1 else tensors[0]


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors).mean(0)


def _norm(layer: _Layer, source: str, target: str, out: StateDict) -> None:
    """A replicated norm: LayerNorm weight/bias, gpt-neox's RMSNorm scale/offset, ScaleNorm g."""
    for ours, theirs in (("weight", ("weight", "scale")), ("bias", ("bias", "offset")), ("g", ("g",))):
        found = layer.take_any(*(f"{source}.{name}" for name in theirs))
        if found is not None:
            out[f"{target}.{ours}"] = _mean(found)


def _qkv(shards: list[torch.Tensor], cfg: ModelConfig, origin: str) -> torch.Tensor:
    tp = len(shards)
    if cfg.kv_heads == cfg.num_attention_heads:
        return _cat(shards, 0)
    if cfg.kv_heads % tp:
        raise CheckpointError(f"{origin}: num_kv_heads {cfg.kv_heads} is not divisible by the {tp} tp ranks")
    d, q_heads, kv_heads = cfg.head_dim, cfg.num_attention_heads // tp, cfg.kv_heads // tp
    group = cfg.num_attention_heads // cfg.kv_heads
    merged = []
    for shard in shards:
        rest = shard.shape[1:]
        if shard.shape[0] != (q_heads + 2 * kv_heads) * d:
            raise CheckpointError(f"{origin}: query_key_value has {shard.shape[0]} rows per rank, the config gives "
                                  f"{(q_heads + 2 * kv_heads) * d}")
        q, k, v = torch.split(shard, [q_heads * d, kv_heads * d, kv_heads * d])
        grouped = torch.cat((q.reshape(kv_heads, group * d, *rest), k.reshape(kv_heads, d, *rest),
                             v.reshape(kv_heads, d, *rest)), dim=1)
        merged.append(grouped.reshape(-1, *rest))
    return _cat(merged, 0)


def _halves(shards: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A gated linear1's [value | gate] rank shards -> (value, gate) merged over the ranks."""
    pairs = [s.chunk(2, dim=0) for s in shards]
    return _cat([p[0] for p in pairs], 0), _cat([p[1] for p in pairs], 0)


def _block(layer: _Layer, cfg: ModelConfig, prefix: str) -> StateDict:
    out: StateDict = {}
    origin = layer.shards.origin(layer.index, 0)
    _norm(layer, "input_layernorm", f"{prefix}input_layernorm", out)
    if cfg.gpt_j_residual and cfg.gpt_j_tied:  # gpt-neox keeps this norm but feeds both branches the input norm
        layer.drop("post_attention_layernorm.")
    else:
        _norm(layer, "post_attention_layernorm", f"{prefix}post_attention_layernorm", out)
    # use_qk_layernorm: a norm of shape [the rank's heads, head_dim] (rows split like the heads); ScaleNorm's g is one
    # replicated scalar.
    for ours, theirs in (("weight", ("weight", "scale")), ("bias", ("bias", "offset"))):
        found = layer.take_any(*(f"attention.qk_layernorm.{name}" for name in theirs))
        if found is not None:
            out[f"{prefix}attention.qk_norm.{ours}"] = _cat(found, 0)
    if layer.has("attention.qk_layernorm.g"):
        out[f"{prefix}attention.qk_norm.g"] = _mean(layer.take("attention.qk_layernorm.g"))
    # pos_emb rpe: one [buckets, heads] table shared by every layer (each layer file holds it), heads split over tp.
    if layer.has("attention.rpe.weight") and prefix == "blocks.0.":
        out[f"{prefix}attention.rpe.weight"] = _cat(layer.take("attention.rpe.weight"), 1)
    layer.drop("attention.rpe.")  # the later layers' copies of the same table
    # Replicated biases of row-parallel layers: summed over ranks by the gpt-j all-reduce, else added once.
    row_bias = (lambda ts: torch.stack(ts).sum(0)) if cfg.gpt_j_residual else _mean
    for name in ("weight", "bias"):
        found = layer.take_any(f"attention.query_key_value.{name}")
        if found is not None:
            out[f"{prefix}attention.query_key_value.{name}"] = _qkv(found, cfg, origin)
    out[f"{prefix}attention.dense.weight"] = _cat(layer.take("attention.dense.weight"), 1)
    if layer.has("attention.dense.bias"):
        out[f"{prefix}attention.dense.bias"] = row_bias(layer.take("attention.dense.bias"))

    if layer.has("mlp.w1.weight"):  # gpt-neox's legacy Llama MLP: w2(silu(w1 x) * w3 x)
        out[f"{prefix}mlp.gate.weight"] = _cat(layer.take("mlp.w1.weight"), 0)
        out[f"{prefix}mlp.linear1.weight"] = _cat(layer.take("mlp.w3.weight"), 0)
        out[f"{prefix}mlp.linear2.weight"] = _cat(layer.take("mlp.w2.weight"), 1)
    else:
        up, down = ("mlp.linear1", "mlp.linear2") if layer.has("mlp.linear1.weight") else \
            ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
        for name in ("weight", "bias"):
            found = layer.take_any(f"{up}.{name}")
            if found is None:
                continue
            if cfg.gated_mlp:
                out[f"{prefix}mlp.linear1.{name}"], out[f"{prefix}mlp.gate.{name}"] = _halves(found)
            else:
                out[f"{prefix}mlp.linear1.{name}"] = _cat(found, 0)
        out[f"{prefix}mlp.linear2.weight"] = _cat(layer.take(f"{down}.weight"), 1)
        if layer.has(f"{down}.bias"):
            out[f"{prefix}mlp.linear2.bias"] = row_bias(layer.take(f"{down}.bias"))
    layer.check_consumed()
    return out


def _merge(shards: _Shards, cfg: ModelConfig) -> StateDict:
    n = cfg.num_layers
    expected = {0, *range(2, n + 2), n + 3} | ({n + 4} if cfg.no_weight_tying else set())
    unexpected = sorted(shards.indices() - expected)
    if unexpected:
        raise CheckpointError(f"{shards.directory}: it has gpt-neox layers {unexpected} beyond the {n} transformer "
                              f"layers its {CONFIG_DIR}/ describe (no_weight_tying {cfg.no_weight_tying}): a "
                              "different architecture")
    out: StateDict = {}
    embedding = _Layer(shards, 0)
    out["embedding.word_embeddings.weight"] = _cat(embedding.take("word_embeddings.weight"), 0)
    if embedding.has("position_embeddings.weight"):
        out["embedding.position_embeddings.weight"] = _mean(embedding.take("position_embeddings.weight"))
    embedding.check_consumed()
    for i in range(n):
        out.update(_block(_Layer(shards, i + 2), cfg, f"blocks.{i}."))
    final_norm = _Layer(shards, n + 3)
    _norm(final_norm, "norm", "final_norm", out)
    final_norm.check_consumed()
    if cfg.no_weight_tying:
        head = _Layer(shards, n + 4)
        out["head.weight"] = _cat(head.take("final_linear.weight"), 0)
        head.check_consumed()
    else:
        out["head.weight"] = out["embedding.word_embeddings.weight"]
    return out


def _check_shapes(checkpoint: GptNeoxCheckpoint, weights: StateDict) -> None:
    # The rotary inv_freq buffers are derived: the model fills them in when it loads these weights.
    expected = state_shapes(replace(checkpoint.config.model, rotary_save_freqs_buffer=False))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = [f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k])}" for k in expected
             if k in weights and weights[k].shape != expected[k]]
    if missing or extra or wrong:
        parts = [f"missing {missing[:4]}" if missing else "", f"not in the model {extra[:4]}" if extra else "",
                 f"shapes (stored vs config) {wrong[:4]}" if wrong else ""]
        raise CheckpointError(f"gpt-neox checkpoint {checkpoint.path}: its weights do not fit the model its "
                              f"{CONFIG_DIR}/ describe: " + "; ".join(p for p in parts if p))

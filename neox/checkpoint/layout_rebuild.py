"""Rebuild a checkpoint's layout-free state offline from DeepSpeed's layout-bound files (any tp, pp, ZeRO 0-3,
fp32 or bf16), for checkpoints saved with checkpoint_layout_free: false.

Where DeepSpeed keeps what, for model-parallel rank m = pp_rank x tp_size + tp_rank and data-parallel rank d:
- ZeRO 0, fp32: mp_rank_{m}_model_states.pt 'optimizer' is the torch optimizer's state_dict (state indexed by a
  parameter's position in the param groups); the weights are its 'module', or in a pipeline the per-layer files
  layer_{L}-model_{tp rank}-model_states.pt.
- ZeRO 0 in bf16/fp16 outside a pipeline (DeepSpeed's unfused optimizer): 'optimizer' holds that state_dict under
  'optimizer_state_dict' and the fp32 masters, in the same order, under 'fp32_groups'.
- ZeRO 1/2 and the bf16 optimizer (bf16 at ZeRO 0 in a pipeline): {bf16_}zero_pp_rank_{d}_mp_rank_{m}_optim_states.pt.
  Each param group is flattened (names and order in mp_rank_{m}'s 'param_shapes', each parameter followed by its
  alignment padding) and cut into equal dp slices: 'single_partition_of_fp32_groups' holds the masters' slice,
  'base_optimizer_state' one state per group with the moments of the same slice.
- ZeRO 3: zero_pp_rank_{d}_mp_rank_{tp rank}_optim_states.pt: every parameter is cut into ceil(numel / dp) pieces;
  rank d's piece of each parameter, in order, in 'fp32_flat_groups' and in its moments.
A pipeline names parameters by layer ("3.block.mlp.linear1.weight", "tied_modules.word_embeddings.embedding...");
they are renamed to single-device names. A tied embedding's copy on the last stage is a replica: skipped, as the
training-time writer skips it.
"""
from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.layout_state import MOMENTS, STATE_DIR, OfflineWriter, StageShard
from neox.checkpoint.safe_load import load_state_file
from neox.config.neox_config import NeoXConfig
from neox.config.resolved import load_resolved
from neox.model.shapes import state_shapes
from neox.model.value_head import is_reward_model
from neox.optim import param_groups
from neox.parallel.sharding import ShardingError, config_overrides, merge_state_dicts, tp_split_dim

_TIED_PREFIX = "tied_modules.word_embeddings."
_PIPE_NAME = re.compile(r"^(\d+)\.(.+)$")
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


class LayoutRebuildError(CheckpointError):
    pass


@dataclass
class ShardState:
    """One (stage, tp rank)'s parameters in single-device names, with fp32 weights and Adam moments."""
    step: float = 0.0
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=lambda: {k: {} for k in MOMENTS})

    def add(self, name: str, weight: torch.Tensor, moments: dict[str, torch.Tensor]) -> None:
        self.weights[name] = weight.detach().to(torch.float32).clone()
        for key in MOMENTS:
            if key in moments:
                self.moments[key][name] = moments[key].detach().to(torch.float32).reshape(weight.shape).clone()


@dataclass(frozen=True)
class _Layout:
    cfg: NeoXConfig
    ckpt_dir: Path
    tp_size: int
    pp_size: int
    pipeline: bool  # DeepSpeed's PipelineModule (pipe_parallel_size >= 1), whose names are per layer
    tied: bool

    def mp_rank(self, pp_rank: int, tp_rank: int) -> int:
        # The model-parallel group lists its ranks pipeline-major, tensor-parallel fastest (DeepSpeed's topology).
        return pp_rank * self.tp_size + tp_rank


# --------------------------------------------------------------------------------------------- names

def single_device_name(pipe_name: str, num_layers: int) -> str | None:
    """A PipelineModule parameter name -> GPTNeoX's name; None for a tied replica (decided by the caller)."""
    if pipe_name.startswith(_TIED_PREFIX):
        return pipe_name[len(_TIED_PREFIX):]
    match = _PIPE_NAME.match(pipe_name)
    if match is None:
        raise LayoutRebuildError(f"parameter {pipe_name!r} is not named like a neox pipeline layer")
    return _layer_param_name(int(match.group(1)), match.group(2), num_layers)


def _layer_param_name(layer: int, key: str, num_layers: int) -> str:
    # Layer specs (neox/parallel/pipeline.py): 0 embedding, 1..N transformer blocks, N+1 final norm, N+2 head.
    kind, _, rest = key.partition(".")
    if kind == "embedding" and layer == 0:
        return key
    if kind == "block" and 1 <= layer <= num_layers:
        return f"blocks.{layer - 1}.{rest}"
    if kind == "norm" and layer == num_layers + 1:
        return f"final_norm.{rest}"
    if kind == "head" and layer == num_layers + 2:
        return key
    raise LayoutRebuildError(f"pipeline layer {layer} holds {key!r}, which no neox layer spec at that index has")


# --------------------------------------------------------------------------------------------- readers

def _model_states_file(layout: _Layout, mp: int) -> Path:
    for name in (f"mp_rank_{mp:02d}_model_states.pt", f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"):
        if (layout.ckpt_dir / name).is_file():
            return layout.ckpt_dir / name
    raise LayoutRebuildError(f"{layout.ckpt_dir} has no mp_rank_{mp:02d}_model_states.pt: the checkpoint is "
                             f"incomplete or of another layout than its config.yml says ({layout.tp_size} tp x "
                             f"{layout.pp_size} pp)")


def _optimizer_files(layout: _Layout, mp: int) -> list[Path]:
    """This model-parallel rank's ZeRO / bf16 optimizer files ordered by dp rank; [] at ZeRO 0."""
    found = {}
    for path in layout.ckpt_dir.glob(f"*zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt"):
        match = _RANK_FILE.search(path.name)
        if match:
            found[int(match.group(1))] = path
    if found and sorted(found) != list(range(len(found))):
        raise LayoutRebuildError(f"{layout.ckpt_dir}: optimizer files of mp rank {mp} exist for dp ranks "
                                 f"{sorted(found)}, not 0..{len(found) - 1}: the checkpoint is incomplete")
    return [found[d] for d in range(len(found))]


def _step_of(state: dict[Any, dict[str, Any]]) -> float:
    for entry in state.values():
        if "step" in entry:
            return float(entry["step"])
    return 0.0


def _param_shapes(model_states: dict[str, Any], origin: Path) -> list[dict[str, torch.Size]]:
    shapes = model_states.get("param_shapes")
    if not isinstance(shapes, list) or not all(isinstance(g, dict) for g in shapes):
        raise LayoutRebuildError(f"{origin} has no 'param_shapes' (the names and order of the optimizer's "
                                 "parameters)")
    return shapes


def _rename(layout: _Layout, pp_rank: int, name: str) -> str | None:
    """Single-device name of a parameter as DeepSpeed named it; None for a tied replica on a later stage."""
    if not layout.pipeline:
        return name
    if name.startswith(_TIED_PREFIX) and pp_rank > 0:
        return None
    return single_device_name(name, layout.cfg.model.num_layers)


def _read_flat_partitions(layout: _Layout, pp_rank: int, tp_rank: int, files: list[Path]) -> ShardState:
    """ZeRO 1/2 and the bf16 optimizer: per group, flat vectors cut into equal dp slices."""
    mp = layout.mp_rank(pp_rank, tp_rank)
    origin = _model_states_file(layout, mp)
    states = [_optimizer_state(path) for path in files]
    model_states = load_state_file(origin)
    if model_states.get("param_shapes") is None and "param_slice_mappings" in states[0]:
        shapes = _shapes_from_slice_mappings(layout, pp_rank, tp_rank, states)  # the bf16 optimizer
    else:
        shapes = _param_shapes(model_states, origin)
    shard = ShardState()
    base = [s["base_optimizer_state"]["state"] for s in states]
    shard.step = _step_of(base[0])
    paddings = states[0].get("param_alignment_paddings")
    for g, group in enumerate(shapes):
        flats = {"weight": torch.cat([s["single_partition_of_fp32_groups"][g].reshape(-1) for s in states])}
        for key in MOMENTS:
            if all(key in b.get(g, {}) for b in base):
                flats[key] = torch.cat([b[g][key].reshape(-1) for b in base])
        offset = 0
        for i, (name, shape) in enumerate(group.items()):
            numel = math.prod(shape)
            if offset + numel > flats["weight"].numel():
                raise LayoutRebuildError(f"{files[0]}: group {g} ends before parameter {name}")
            pieces = {k: flat[offset:offset + numel].view(shape) for k, flat in flats.items()}
            offset += numel + (int(paddings[g][i]) if paddings else 0)
            single = _rename(layout, pp_rank, name)
            if single is not None:
                shard.add(single, pieces.pop("weight"), pieces)
    return shard


def _shapes_from_slice_mappings(layout: _Layout, pp_rank: int, tp_rank: int,
                                states: list[dict[str, Any]]) -> list[dict[str, torch.Size]]:
    """The bf16 optimizer records no param_shapes, only each dp slice's fragments (name -> numel, start) in group
    order, parameters packed without padding; the shapes come from the model config and the tp sharding plan."""
    full_shapes = state_shapes(layout.cfg.model, value_head=is_reward_model(layout.cfg))
    groups = []
    for g in range(len(states[0]["param_slice_mappings"])):
        names: dict[str, None] = {}
        for state in states:  # dp slices in order; a parameter cut by a slice boundary appears in both
            names.update(dict.fromkeys(state["param_slice_mappings"][g]))
        group = {}
        for name in names:
            single = single_device_name(name, layout.cfg.model.num_layers) if layout.pipeline else name
            shape = list(full_shapes[single])
            dim = tp_split_dim(single, config_overrides(layout.cfg.model))
            if dim is not None and layout.tp_size > 1:
                shape[dim] //= layout.tp_size
            group[name] = torch.Size(shape)
        groups.append(group)
    return groups


def _read_zero3(layout: _Layout, tp_rank: int, files: list[Path]) -> ShardState:
    """ZeRO 3: each parameter cut into ceil(numel / dp) pieces, rank d holding piece d of every parameter."""
    origin = _model_states_file(layout, tp_rank)
    shapes = _param_shapes(load_state_file(origin), origin)
    states = [_optimizer_state(path) for path in files]
    ranks = len(states)
    base = [s["optimizer_state_dict"]["state"] for s in states]
    flats = {"weight": [torch.cat([t.reshape(-1) for t in s["fp32_flat_groups"]]) for s in states]}
    for key in MOMENTS:
        if all(key in entry for b in base for entry in b.values()):
            flats[key] = [torch.cat([b[g][key].reshape(-1) for g in sorted(b)]) for b in base]
    shard = ShardState(step=_step_of(base[0]))
    offset = 0
    for name, shape in ((n, s) for group in shapes for n, s in group.items()):
        numel = math.prod(shape)
        piece = math.ceil(numel / ranks)
        if offset + piece > flats["weight"][0].numel():
            raise LayoutRebuildError(f"{files[0]}: ZeRO-3 partitions end before parameter {name}")
        full = {k: torch.cat([f[offset:offset + piece] for f in per_rank])[:numel].view(shape)
                for k, per_rank in flats.items()}
        offset += piece
        shard.add(name, full.pop("weight"), full)
    return shard


def _optimizer_state(path: Path) -> dict[str, Any]:
    state = load_state_file(path).get("optimizer_state_dict")
    if not isinstance(state, dict):
        raise LayoutRebuildError(f"{path} has no optimizer_state_dict")
    return state


def _optimizer_order(shapes: list[torch.Size]) -> list[int]:
    """Positions of a module's parameters (in module order) in the order of the param groups that
    neox.optim builds over them, which is the order of the optimizer state's indices."""
    params = [(str(i), torch.nn.Parameter(torch.empty(shape, device="meta"))) for i, shape in enumerate(shapes)]
    position = {id(p): i for i, (_, p) in enumerate(params)}
    return [position[id(p)] for group in param_groups(params, weight_decay=0.0) for p in group["params"]]


def _pipeline_stage_params(layout: _Layout, pp_rank: int, tp_rank: int) -> list[tuple[str | None, torch.Tensor]]:
    """(single-device name or None for a tied replica, fp32 weight) of a ZeRO-0 pipeline stage, in the order of
    its PipelineModule's parameters: the tied embedding module first (registered before the layers), then its
    layers in order. Stage boundaries are not recorded, so stages are laid out one after another, each taking
    layers until it holds as many parameters as its optimizer state has."""
    layers = []
    for path in sorted(layout.ckpt_dir.glob(f"layer_*-model_{tp_rank:02d}-model_states.pt")):
        index = int(path.name.split("-")[0].removeprefix("layer_"))
        layers.append((index, load_state_file(path)))
    layers.sort(key=lambda pair: pair[0])
    if not layers or layers[0][0] != 0:
        raise LayoutRebuildError(f"{layout.ckpt_dir} has no layer_00-model_{tp_rank:02d}-model_states.pt")
    num_layers = layout.cfg.model.num_layers
    embedding = [(_layer_param_name(0, k, num_layers), v) for k, v in layers[0][1].items()]
    rest = layers[1:] if layout.tied else layers
    cursor = 0
    for stage in range(pp_rank + 1):
        order: list[tuple[str | None, torch.Tensor]] = []
        if layout.tied and stage == 0:
            order += embedding
        elif layout.tied and stage == layout.pp_size - 1:
            order += [(None, v) for _, v in embedding]
        budget = _stage_counts(layout, stage, tp_rank)
        while len(order) < budget and cursor < len(rest):
            index, state = rest[cursor]
            order += [(_layer_param_name(index, k, num_layers), v) for k, v in state.items()]
            cursor += 1
        if len(order) != budget:
            raise LayoutRebuildError(f"{layout.ckpt_dir}: the layer files do not add up to the {budget} parameters "
                                     f"of pipeline stage {stage}'s optimizer")
    return order


def _stage_counts(layout: _Layout, stage: int, tp_rank: int) -> int:
    optimizer = _zero0_optimizer(layout, layout.mp_rank(stage, tp_rank))[0]
    return sum(len(g["params"]) for g in optimizer["param_groups"])


def _zero0_optimizer(layout: _Layout, mp: int) -> tuple[dict[str, Any], list[torch.Tensor] | None, dict[str, Any]]:
    """(torch optimizer state_dict, the unfused optimizer's fp32 masters in the same order or None, model states)."""
    path = _model_states_file(layout, mp)
    model_states = load_state_file(path)
    optimizer = model_states.get("optimizer")
    if not isinstance(optimizer, dict):
        raise LayoutRebuildError(f"{path} holds no optimizer state: it was saved without it (a finetune export?)")
    if "optimizer_state_dict" in optimizer and "fp32_groups" in optimizer:
        masters = [t for group in optimizer["fp32_groups"] for t in group]
        return optimizer["optimizer_state_dict"], masters, model_states
    return optimizer, None, model_states


def _read_zero0(layout: _Layout, pp_rank: int, tp_rank: int) -> ShardState:
    optimizer, masters, model_states = _zero0_optimizer(layout, layout.mp_rank(pp_rank, tp_rank))
    indices = [i for g in optimizer["param_groups"] for i in g["params"]]
    if layout.pipeline:
        in_module_order = _pipeline_stage_params(layout, pp_rank, tp_rank)
    else:
        module = model_states.get("module") or {}
        buffers = set(model_states.get("buffer_names") or [])
        # A tied head is the embedding's parameter: the module lists it once, first as the embedding.
        in_module_order = [(n, t) for n, t in module.items()
                           if n not in buffers and not (layout.tied and n == "head.weight")]
    params = [in_module_order[i] for i in _optimizer_order([t.shape for _, t in in_module_order])]
    if len(params) != len(indices):
        raise LayoutRebuildError(f"{layout.ckpt_dir}: {len(params)} parameters but the optimizer of mp rank "
                                 f"{layout.mp_rank(pp_rank, tp_rank)} has {len(indices)}")
    state = optimizer["state"]
    shard = ShardState(step=_step_of(state))
    for position, (index, (name, weight)) in enumerate(zip(indices, params)):
        if masters is not None:
            weight = masters[position]
        moments = state.get(index, {})
        if any(key in moments and moments[key].shape != weight.shape for key in MOMENTS):
            raise LayoutRebuildError(f"{layout.ckpt_dir}: optimizer entry {index} does not have the shape of "
                                     f"{name} {tuple(weight.shape)}: parameter order could not be reconstructed")
        if name is not None:
            shard.add(name, weight, moments)
    return shard


# --------------------------------------------------------------------------------------------- entry point

def _layout_of_checkpoint(ckpt_dir: Path) -> _Layout:
    config = ckpt_dir / "config.yml"
    if not config.is_file():
        raise LayoutRebuildError(f"{ckpt_dir} has no config.yml: not a checkpoint written by neox")
    cfg = load_resolved(config)
    return _Layout(cfg=cfg, ckpt_dir=ckpt_dir, tp_size=cfg.parallel.model_parallel_size,
                   pp_size=max(cfg.parallel.pipe_parallel_size, 1), pipeline=cfg.parallel.pipe_parallel_size >= 1,
                   tied=not cfg.model.no_weight_tying and not is_reward_model(cfg))


def read_shard(ckpt_dir: Path, pp_rank: int, tp_rank: int) -> ShardState:
    """One (stage, tp rank) of a checkpoint, read from DeepSpeed's files."""
    layout = _layout_of_checkpoint(ckpt_dir)
    files = _optimizer_files(layout, layout.mp_rank(pp_rank, tp_rank))
    if not files:
        return _read_zero0(layout, pp_rank, tp_rank)
    if "fp32_flat_groups" in _optimizer_state(files[0]):
        return _read_zero3(layout, tp_rank, files)
    return _read_flat_partitions(layout, pp_rank, tp_rank, files)


def merged_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The single-device fp32 weights (no tied head entry) of a checkpoint at any layout, from DeepSpeed's files."""
    layout = _layout_of_checkpoint(ckpt_dir)
    weights: dict[str, torch.Tensor] = {}
    try:
        for pp_rank in range(layout.pp_size):
            weights.update(merge_state_dicts([read_shard(ckpt_dir, pp_rank, t).weights
                                              for t in range(layout.tp_size)], config_overrides(layout.cfg.model)))
    except ShardingError as err:
        raise LayoutRebuildError(f"{ckpt_dir}: {err}") from err
    return weights


def client_state_of(ckpt_dir: Path, keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """The loop's client state (saved by DeepSpeed into the model states file next to its own keys); `optional`
    keys are carried when the checkpoint has them (older checkpoints predate them)."""
    layout = _layout_of_checkpoint(ckpt_dir)
    path = _model_states_file(layout, 0)
    states = load_state_file(path)
    missing = [k for k in keys if k not in states]
    if missing:
        raise LayoutRebuildError(f"{path} lacks the training loop's client state {missing}")
    return {k: states[k] for k in (*keys, *optional) if k in states}


def rebuild_layout_free_state(ckpt_dir: Path, client_keys: tuple[str, ...], replace: bool = False,
                              optional_keys: tuple[str, ...] = ()) -> Path:
    """Write ckpt_dir/layout_free/ from DeepSpeed's files; built aside and renamed into place. Returns its path."""
    layout = _layout_of_checkpoint(ckpt_dir)
    target = ckpt_dir / STATE_DIR
    if target.exists() and not replace:
        raise LayoutRebuildError(f"{target} already exists; pass replace (--force) to rebuild it")
    client_state = client_state_of(ckpt_dir, client_keys, optional_keys)
    build_root = ckpt_dir / f".{STATE_DIR}-build-{os.getpid()}"
    shutil.rmtree(build_root, ignore_errors=True)
    try:
        writer = OfflineWriter(build_root)
        for pp_rank in range(layout.pp_size):
            for tp_rank in range(layout.tp_size):
                shard = read_shard(ckpt_dir, pp_rank, tp_rank)  # one (stage, tp rank) in memory at a time
                writer.add(StageShard(pp_rank, layout.pp_size, tp_rank, layout.tp_size), shard.step, client_state,
                           shard.weights, shard.moments, split_dims=config_overrides(layout.cfg.model))
        writer.finish({"tp": layout.tp_size, "pp": layout.pp_size, "dp": layout.cfg.derived.data_parallel_size})
        if target.exists():
            shutil.rmtree(target)
        os.replace(build_root / STATE_DIR, target)
    finally:
        shutil.rmtree(build_root, ignore_errors=True)
    return target

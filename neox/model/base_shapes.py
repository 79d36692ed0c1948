"""mup's base-shapes file: each parameter's shape in the base model, with null where a dim is not a width.

Made as mup.make_base_shapes makes it: compare the parameter shapes of the base model (the configured one) with
those of a delta model whose hidden_size is mup_width_scale times larger; a dim that differs is a width (its
base size is kept), a dim that does not is fixed (null). Written in mup's YAML format (parameter name -> list of
base dims), so mup.load_base_shapes / mup.set_base_shapes read it, and read back with yaml.safe_load. Parameter
names are the single-device model's (GPTNeoX.named_parameters(); a tied head is the embedding).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

import torch
import yaml

from neox.config.model import ModelConfig
from neox.config.mup import MupConfig
from neox.model.model import GPTNeoX
from neox.model.mup import BaseShape, MupError, MupSetup

_HEADER = (
    "# mup base shapes (https://github.com/microsoft/mup), written by neox's save_base_shapes:\n"
    "# parameter name -> its dims in the base model; null = not a width dim (vocabulary, positions, ...),\n"
    "# a number = a width dim and its size in the base model.\n"
)


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of GPTNeoX(cfg), built on the meta device (no memory, no random draws)."""
    with torch.device("meta"):
        model = GPTNeoX(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def make_base_shapes(base: Mapping[str, tuple[int, ...]], delta: Mapping[str, tuple[int, ...]]) -> dict[str, BaseShape]:
    if set(base) != set(delta):
        raise MupError(f"base and delta models have different parameters: {sorted(set(base) ^ set(delta))[:3]}")
    out = {}
    for name, dims in base.items():
        if len(dims) != len(delta[name]):
            raise MupError(f"{name}: base shape {dims} and delta shape {delta[name]} differ in rank")
        out[name] = tuple(None if d == w else d for d, w in zip(dims, delta[name]))
    return out


def base_shapes_of(cfg: ModelConfig, width_scale: int) -> dict[str, BaseShape]:
    """Base shapes of the model `cfg`, its widths found against hidden_size x width_scale."""
    delta = dataclasses.replace(cfg, hidden_size=cfg.hidden_size * width_scale)
    return make_base_shapes(parameter_shapes(cfg), parameter_shapes(delta))


def write_base_shapes(path: str | Path, shapes: Mapping[str, BaseShape]) -> Path:
    """Atomically (temporary file, then rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _HEADER + yaml.safe_dump({name: list(dims) for name, dims in shapes.items()}, indent=4)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_base_shapes(path: str | Path) -> dict[str, BaseShape]:
    path = Path(path)
    if not path.is_file():
        per_rank = path.with_name(f"{path.name}.0")
        hint = (f" ({per_rank} looks like gpt-neox's per-rank files, whose parameter names are its pipeline "
                "layers'; neox writes one file for the whole model)" if per_rank.is_file() else "")
        raise MupError(f"base_shapes_file {path} not found{hint}: run once with save_base_shapes: true to write it")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise MupError(f"base_shapes_file {path} is not YAML: {err}") from None
    if not isinstance(data, dict) or not all(
        isinstance(dims, list) and all(d is None or (isinstance(d, int) and d > 0) for d in dims)
        for dims in data.values()
    ):
        raise MupError(f"base_shapes_file {path} is not a mup base-shapes file (parameter name -> list of "
                       "positive ints and nulls)")
    return {str(name): tuple(dims) for name, dims in data.items()}


def mup_setup(cfg: MupConfig) -> MupSetup | None:
    """The muP setup the config asks for (base shapes read from base_shapes_file), or None for a standard model."""
    if not cfg.use_mup:
        # gpt-neox multiplies learned position embeddings by mup_rp_embedding_mult even without use_mup.
        return MupSetup(None, rp_embedding_mult=cfg.mup_rp_embedding_mult) if cfg.mup_rp_embedding_mult != 1.0 else None
    return MupSetup(read_base_shapes(cfg.base_shapes_file), init_scale=cfg.mup_init_scale,
                    attn_temp=cfg.mup_attn_temp, output_temp=cfg.mup_output_temp,
                    embedding_mult=cfg.mup_embedding_mult, rp_embedding_mult=cfg.mup_rp_embedding_mult)

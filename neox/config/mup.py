"""muP (maximal update parametrisation, Yang et al. 2022) keys, with gpt-neox's names, types and defaults.

The model, init and optimizer pieces live in neox/model/mup.py and neox/optim/mup.py; the two run modes
(save_base_shapes, coord_check) in neox/train/mup_modes.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from neox.config.errors import ConfigError
from neox.config.fields import option

if TYPE_CHECKING:
    from neox.config.neox_config import NeoXConfig

# Optimizers mup scales: Adam-like (MuAdam: lr / width for hidden matrices) and SGD (MuSGD).
MUP_OPTIMIZERS = ("adam", "adamw", "sgd")
# gpt-neox refuses these with muP: an orthogonal matrix has no muP-scaled counterpart in mup.init.
MUP_UNSUPPORTED_INITS = ("orthogonal", "scaled_orthogonal")


@dataclass
class MupConfig:
    use_mup: bool = option(
        False, "Train in muP: hidden matrices initialised with std / sqrt(width_mult) and given lr / width_mult "
        "(MuAdam; MuSGD for optimizer.type sgd), attention scores q.k / (head_dim x mup_attn_temp), the head's input "
        "divided by width_mult x mup_output_temp. Widths are measured against base_shapes_file."
    )
    coord_check: bool = option(
        False, "With use_mup: train models of widths num_attention_heads x 2^2..2^8 for 4 steps each in muP and in "
        "standard parametrisation, write each module's mean |activation| to coord_check.csv and the plots "
        "coord_check_up.jpg / coord_check_sp.jpg in log_dir (else save), then end the run without training."
    )
    save_base_shapes: bool = option(
        False, "With use_mup: write base_shapes_file (mup's YAML format) from this model and one mup_width_scale "
        "times wider, then end the run without training. Run once, then set it back to false."
    )
    base_shapes_file: str | None = option(
        None, "mup base-shapes file (YAML: parameter name -> base dims, null where a dim is not a width) that "
        "use_mup measures widths against; written by save_base_shapes. One file for the whole model (gpt-neox "
        "writes one per rank)."
    )
    mup_init_scale: float = option(
        1.0, "With use_mup: every randomly initialised weight (linears, embeddings, head) is multiplied by it."
    )
    mup_attn_temp: float = option(
        1.0, "With use_mup: attention temperature, the attention scores are divided by it (on top of muP's "
        "1 / head_dim)."
    )
    mup_output_temp: float = option(
        1.0, "With use_mup: output temperature, the logits are divided by it (on top of muP's 1 / width_mult readout)."
    )
    mup_embedding_mult: float = option(1.0, "With use_mup: the embedding layer's output is multiplied by it.")
    mup_rp_embedding_mult: float = option(
        1.0, "Learned and sinusoidal position embeddings are multiplied by it before they are added (as gpt-neox, "
        "also without use_mup)."
    )
    mup_width_scale: int = option(
        2, "save_base_shapes: hidden_size of the delta model = hidden_size x this; the dims that change are widths."
    )

    def validate(self) -> None:
        for key in ("mup_init_scale", "mup_attn_temp", "mup_output_temp", "mup_embedding_mult",
                    "mup_rp_embedding_mult"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"'{key}' must be positive, got {getattr(self, key)}")
        if self.mup_width_scale < 2:
            raise ConfigError(f"'mup_width_scale' must be an integer >= 2 (the delta model must be wider than the "
                              f"base to tell which dims are widths), got {self.mup_width_scale}")
        for key in ("save_base_shapes", "coord_check"):
            if getattr(self, key) and not self.use_mup:
                raise ConfigError(f"'{key}' is a muP step and does nothing without 'use_mup': set use_mup: true")
        if self.use_mup and not self.base_shapes_file:
            raise ConfigError("'use_mup' measures widths against 'base_shapes_file', which is unset: name a file and "
                              "run once with save_base_shapes: true to write it")


def check_mup_combinations(cfg: NeoXConfig) -> None:
    """muP rules that involve other groups' keys (called from neox/config/validate.py:check_combinations)."""
    kind = str(cfg.optim.optimizer.get("type", "")).lower()
    if not cfg.mup.use_mup:
        if kind == "sgd":
            raise ConfigError("'optimizer.type' sgd is muP's MuSGD, as in gpt-neox: set use_mup: true (and "
                              "base_shapes_file), or choose another optimizer")
        return
    if kind not in MUP_OPTIMIZERS:
        raise ConfigError(f"'use_mup' scales the learning rates of Adam, AdamW and SGD only; 'optimizer.type' is "
                          f"{cfg.optim.optimizer.get('type')!r}")
    for key in ("init_method", "output_layer_init_method"):
        method = getattr(cfg.model, key)
        if method in MUP_UNSUPPORTED_INITS:
            raise ConfigError(f"'{key}' {method} has no muP version (gpt-neox refuses it too): use normal, "
                              "scaled_normal, small_init, wang_init or xavier_* with use_mup")

"""Training objectives: one loss per gpt-neox `train_impl`, behind one interface (base.py), built from the config here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from neox.train.objectives import dpo, kto, rm
from neox.train.objectives.base import (Batch, LossContext, LossOutput, Objective, sequence_log_probs, split_pairs,
                                        window_means)
from neox.train.objectives.lm import LanguageModelObjective
from neox.train.objectives.sft import SFTObjective

if TYPE_CHECKING:
    from neox.config.neox_config import NeoXConfig

__all__ = ["Batch", "BUILDERS", "LanguageModelObjective", "LossContext", "LossOutput", "Objective", "SFTObjective",
           "build_objective", "has_labels", "sequence_log_probs", "split_pairs", "window_means"]


def has_labels(cfg: NeoXConfig) -> bool:
    """Whether the run trains on label datasets (gpt-neox's SFT: train_impl 'normal' with *_label_data_paths)."""
    data = cfg.data
    return bool(data.train_label_data_paths)


def _normal(cfg: NeoXConfig) -> Objective:
    return SFTObjective() if has_labels(cfg) else LanguageModelObjective()


# train_impl -> the objective of a run with that config.
BUILDERS: dict[str, Callable[[NeoXConfig], Objective]] = {
    "normal": _normal,
    "dpo": dpo.from_config,
    "kto": kto.from_config,
    "rm": rm.from_config,
}


def build_objective(cfg: NeoXConfig) -> Objective:
    train_impl = cfg.data.train_impl
    if train_impl not in BUILDERS:
        raise ValueError(f"train_impl {train_impl!r} has no objective here; known: {sorted(BUILDERS)}")
    return BUILDERS[train_impl](cfg)

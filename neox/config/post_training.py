"""Preference-objective keys (train_impl dpo, kto, rm), with gpt-neox's names, types and defaults.

The objectives are neox/train/objectives/{dpo,kto,rm}.py; the frozen reference model neox/train/objectives/
reference.py; DPO's reference log-probs written ahead of training (precompute_model_name, text_gen_type: precompute)
neox/generate/precompute.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from neox.config.errors import ConfigError
from neox.config.fields import option

if TYPE_CHECKING:
    from neox.config.neox_config import NeoXConfig

# precompute_model_name is a file-name suffix: {data prefix}_{name}.bin/.idx sit next to the data.
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class PostTrainingConfig:
    dpo_beta: float = option(
        0.1, "train_impl dpo: the KL strength beta of the sigmoid DPO loss -log sigmoid(beta x ((policy - reference) "
        "log-ratio of chosen) - (... of rejected)); rewards_chosen/rejected are beta x (policy - reference) logps."
    )
    dpo_reference_free: bool = option(
        False, "train_impl dpo: no reference model (its log-probs taken as 0): the loss compares the policy's chosen "
        "and rejected log-probs alone."
    )
    dpo_fp32: bool = option(
        True, "train_impl dpo: the log-probs are computed from fp32 logits (false: in the logits' own dtype)."
    )
    kto_beta: float = option(
        0.1, "train_impl kto: beta of the KTO loss 1 - sigmoid(beta x (log-ratio - KL)) (desirable) / 1 - sigmoid("
        "beta x (KL - log-ratio)) (undesirable), KL estimated as TRL's KTOTrainer does (see the README)."
    )
    kto_desirable_weight: float = option(
        1.0, "train_impl kto: weight of the desirable samples' losses (reward > 0); raise it when they are fewer."
    )
    kto_undesirable_weight: float = option(
        1.0, "train_impl kto: weight of the undesirable samples' losses (reward < 0)."
    )
    kto_fp32: bool = option(
        True, "train_impl kto: the log-probs are computed from fp32 logits (false: in the logits' own dtype)."
    )
    z_loss: float = option(
        0.0, "train_impl rm: adds z_loss x mean(score_chosen^2 + score_rejected^2) to the Bradley-Terry loss, which "
        "keeps the scores near 0 (gpt-neox's reward-model z-loss)."
    )
    precompute_model_name: str | None = option(
        None, "train_impl dpo: the reference log-probs are read from {data prefix}_{this name} next to each pos/neg "
        "data prefix instead of running a live reference model; `deepy generate` with text_gen_type: precompute and "
        "`load` the reference checkpoint writes them."
    )

    def validate(self) -> None:
        name = self.precompute_model_name
        if name is not None and not _NAME.match(name):
            raise ConfigError(f"'precompute_model_name' {name!r} is appended to data file names: use letters, "
                              "digits, '.', '_' and '-' only")
        for key in ("dpo_beta", "kto_beta"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"'{key}' must be positive, got {getattr(self, key)}")
        for key in ("kto_desirable_weight", "kto_undesirable_weight", "z_loss"):
            if getattr(self, key) < 0:
                raise ConfigError(f"'{key}' must be >= 0, got {getattr(self, key)}")


def check_post_training_combinations(cfg: NeoXConfig) -> None:
    """Rules between these keys and other groups' (called from neox/config/validate.py:check_combinations)."""
    post, train_impl = cfg.post_training, cfg.data.train_impl
    precompute = cfg.generate.text_gen_type == "precompute"
    if precompute and post.precompute_model_name is None:
        raise ConfigError("text_gen_type precompute writes the reference log-probs to {data prefix}_"
                          "{precompute_model_name}: set 'precompute_model_name' (the name the dpo run reads them by)")
    if post.precompute_model_name is not None and not precompute:
        if train_impl == "kto":
            raise ConfigError("train_impl kto estimates its KL reference point from the reference model's log-probs "
                              "of mismatched prompt/completion pairs (TRL's KTOTrainer), which no file written ahead "
                              "holds: unset 'precompute_model_name' (kto runs the frozen reference live)")
        if train_impl != "dpo":
            raise ConfigError(f"'precompute_model_name' names the reference log-probs of a dpo run; train_impl is "
                              f"{train_impl!r}: unset it")
        if post.dpo_reference_free:
            raise ConfigError("'dpo_reference_free' uses no reference log-probs, 'precompute_model_name' reads them: "
                              "choose one")
    if train_impl == "kto" and cfg.train.train_micro_batch_size_per_gpu < 2:
        raise ConfigError("train_impl kto estimates its KL reference point from each micro-batch's mismatched "
                          "prompt/completion pairs (TRL's KTOTrainer): 'train_micro_batch_size_per_gpu' must be >= 2")
    if train_impl == "rm" and cfg.mup.use_mup:
        raise ConfigError("train_impl rm replaces the vocabulary head by a scalar value head, which muP's readout "
                          "scaling (use_mup) does not describe: train the reward model without use_mup")

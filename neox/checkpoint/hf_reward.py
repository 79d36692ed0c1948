"""Reward models (train_impl rm) <-> Hugging Face *ForSequenceClassification with num_labels 1.

The body maps exactly as the causal LM's (neox.model.hf); the value head's [1, hidden] matrix (head.score.weight) is
the classifier's `score.weight`. transformers scores a sequence at its last token that is not config.pad_token_id,
and neox at its last trained position: with --for-rm data that is the final end-of-text token, so the exported
pad_token_id must not be that token, or Hugging Face would score the token before it. It is the tokenizer's own
padding token when that differs from end-of-text, or the --pad-token-id given (gpt-neox's flag); with neither it is
left unset, which transformers reads as "score the last token" for one sequence at a time (a batch then needs one).
"""
from __future__ import annotations

from copy import deepcopy
from dataclasses import replace

import torch

from neox.checkpoint.errors import CheckpointError
from neox.config.model import ModelConfig
from neox.model.hf import canonical_arch, from_hf_state_dict, model_cfg_to_hf_config, to_hf_state_dict
from neox.model.value_head import SCORE_WEIGHT

SEQUENCE_CLASSIFIERS = {"gpt_neox": "GPTNeoXForSequenceClassification", "llama": "LlamaForSequenceClassification",
                        "gpt2": "GPT2ForSequenceClassification"}
_EMBEDDING = "embedding.word_embeddings.weight"
StateDict = dict[str, torch.Tensor]


def reward_hf_config(cfg: ModelConfig, arch: str, vocab_size: int, pad_token_id: int | None):
    """The HF config of the reward model: the causal LM's, with one label and the pad id scoring needs."""
    _check_reward_arch(arch)
    hf_config = model_cfg_to_hf_config(cfg, arch, vocab_size)
    hf_config.num_labels = 1
    hf_config.architectures = [SEQUENCE_CLASSIFIERS[arch]]
    hf_config.tie_word_embeddings = False  # a classifier has no output embedding to tie
    hf_config.pad_token_id = pad_token_id
    return hf_config


def to_hf_reward_state_dict(cfg: ModelConfig, weights: StateDict, arch: str, vocab_size: int) -> StateDict:
    """neox reward-model weights -> the *ForSequenceClassification state dict."""
    if SCORE_WEIGHT not in weights:
        raise CheckpointError(f"the checkpoint has no value head ({SCORE_WEIGHT}): it is not a reward model")
    # The LM mapping expects a vocabulary head; the embedding stands in for it and its lm_head is dropped.
    body = {k: v for k, v in weights.items() if k != SCORE_WEIGHT}
    body["head.weight"] = weights[_EMBEDDING]
    out = to_hf_state_dict(replace(cfg, no_weight_tying=True), body, arch, vocab_size)
    del out["lm_head.weight"]
    out["score.weight"] = weights[SCORE_WEIGHT].clone()
    return out


def _check_reward_arch(arch: str) -> None:
    if arch not in SEQUENCE_CLASSIFIERS:
        raise CheckpointError(f"reward models convert as {', '.join(SEQUENCE_CLASSIFIERS.values())} only, not {arch}")


def is_hf_reward_model(hf_config) -> bool:
    return any(name.endswith("ForSequenceClassification") for name in (hf_config.architectures or []))


def from_hf_reward_state_dict(hf_config, hf_weights: StateDict,
                              make_vocab_size_divisible_by: int = 128) -> tuple[ModelConfig, StateDict]:
    """An HF *ForSequenceClassification (num_labels 1) -> (ModelConfig, neox reward-model weights)."""
    if getattr(hf_config, "num_labels", 1) != 1:
        raise CheckpointError(f"{hf_config.architectures[0]} has num_labels {hf_config.num_labels}: a reward model "
                              "scores with one label")
    if "score.weight" not in hf_weights:
        raise CheckpointError(f"{hf_config.architectures[0]} weights have no 'score.weight'")
    arch = canonical_arch(hf_config.model_type)
    _check_reward_arch(arch)
    embed_key = {"gpt_neox": "gpt_neox.embed_in.weight", "llama": "model.embed_tokens.weight",
                 "gpt2": "transformer.wte.weight"}[arch]
    body = {k: v for k, v in hf_weights.items() if k != "score.weight"}
    body["lm_head.weight"] = body[embed_key]  # stands in for the head the LM mapping reads (dropped below)
    model_cfg, weights = from_hf_state_dict(_untied(hf_config), body, make_vocab_size_divisible_by)
    del weights["head.weight"]
    weights[SCORE_WEIGHT] = hf_weights["score.weight"].to(torch.float32).clone()
    return model_cfg, weights


def _untied(hf_config):
    """A copy of the config read as untied: the mapping then takes the stand-in head instead of tying it."""
    untied = deepcopy(hf_config)
    untied.tie_word_embeddings = False
    return untied


def export_pad_token_id(tokenizer_pad: int | None, eos: int | None, vocab_size: int,
                        requested: int | None) -> int | None:
    """The pad id an exported reward model scores with (see the module docstring)."""
    if requested is not None:
        if not 0 <= requested < vocab_size:
            raise CheckpointError(f"--pad-token-id {requested} is outside the vocabulary (0..{vocab_size - 1})")
        if requested == eos:
            raise CheckpointError(f"--pad-token-id {requested} is the end-of-text token, which a reward model scores: "
                                  "Hugging Face would score the token before it; choose an unused id")
        return requested
    return tokenizer_pad if tokenizer_pad is not None and tokenizer_pad != eos else None

"""The model of a LoRA run (`lora`): its frozen base, loaded whole, with adapters added (neox/model/lora.py).

The base is the checkpoint `load` names when the run starts (finetune: true: a consolidated or Hugging Face-imported
model, a neox training checkpoint or a gpt-neox one, or another LoRA run's, merged), or, when a LoRA run resumes,
the base its checkpoint names (lora_base.json); the resumed adapters and their optimizer state are loaded afterwards
like any checkpoint's. The whole model is built on every rank (tensor parallelism then keeps each rank's shards).
"""
from __future__ import annotations

from pathlib import Path

from neox.checkpoint import vocab_padding
from neox.checkpoint.consolidated import consolidate, find_checkpoint
from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.lora_base import base_of
from neox.config.lora import LoraSettings, lora_settings
from neox.config.neox_config import NeoXConfig
from neox.config.resolved import load_resolved
from neox.model import GPTNeoX
from neox.model.base_shapes import mup_setup
from neox.model.lora import add_lora


def lora_base_dir(cfg: NeoXConfig, settings: LoraSettings, load_tag: str | None, gpt_neox_dir: Path | None) -> Path:
    """The base model directory of this run (see the module doc); load_tag: the checkpoint under `load` the trainer
    resumes, gpt_neox_dir: the gpt-neox checkpoint `load` names, if it does."""
    train = cfg.train
    load_dir = Path(train.load)
    if train.finetune:
        return gpt_neox_dir if gpt_neox_dir is not None else find_checkpoint(load_dir, train.iteration)
    if load_tag is None:
        raise CheckpointError(f"'lora' without 'finetune': {load_dir} holds no checkpoint of a LoRA run to resume; to "
                              "train adapters on the model there, set 'finetune: true'")
    ckpt = load_dir / load_tag
    saved = lora_settings(load_resolved(ckpt / "config.yml").train.lora)
    if saved is not None and saved != settings:
        raise CheckpointError(f"{ckpt} was trained with lora {saved}, the config asks for {settings}: resume with its "
                              "lora settings, or start new adapters on it with 'finetune: true'")
    return base_of(ckpt)


def build_lora_model(cfg: NeoXConfig, settings: LoraSettings, base: Path, vocab_size: int,
                     architecture_keys: tuple[str, ...]) -> tuple[GPTNeoX, str | None]:
    """(the single-device model with the base's weights and fresh adapters, the note to print if the base's vocabulary
    was re-padded to this run's). A base of another architecture is refused, naming the keys."""
    base_cfg, weights = consolidate(base)
    repad = vocab_padding.check_checkpoint_model(base_cfg.model, cfg.model, vocab_size, architecture_keys, base)
    if repad is not None:
        weights = vocab_padding.repad_state(weights, repad.padded)
    model = GPTNeoX(cfg.model, mup_setup(cfg.mup))
    model.load_state_dict(weights, strict=True)
    add_lora(model, settings, model.init_seed)
    return model, None if repad is None else repad.note(cfg.parallel.model_parallel_size)

"""The padded vocabulary of a run that loads a checkpoint saved at another tensor-parallel size.

padded_vocab_size is the tokenizer's vocabulary rounded up to make_vocab_size_divisible_by x model_parallel_size,
so it depends on tp: GPT-2's 50257 ids give 50304 rows at tp1, 50432 at tp2. A run that loads a checkpoint
(resume or finetune, engine checkpoint or consolidated model):
- adopts the checkpoint's padding when its own was derived and its tp divides the checkpoint's: decided when
  the config is resolved (adopt_checkpoint_padding), so the resolved config, the model and the checkpoint agree;
- otherwise (tp does not divide it, or padded_vocab_size is pinned to another value) re-pads the loaded state:
  the embedding and untied head keep rows [0, min(old, new)) as saved, drop rows past the new size and start new
  rows at zero, weights and Adam moments alike (repad_rows; a layout-free resume fills them so as it reads,
  neox/checkpoint/layout_sources.py). Every row a token id can reach (< the tokenizer's
  vocabulary) is loaded bit for bit; the rows past it are never looked up, only pushed down through the softmax.
Each case prints one line saying so.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from neox.checkpoint.consolidated import is_consolidated
from neox.checkpoint.engine_state import check_same_architecture, resolve_load_tag
from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.gpt_neox import open_gpt_neox_checkpoint
from neox.config.derive import adopt_padded_vocab_size
from neox.config.errors import ConfigError
from neox.config.model import ModelConfig
from neox.config.neox_config import NeoXConfig
from neox.config.resolved import load_resolved

VOCAB_ROWS = ("embedding.word_embeddings.weight", "head.weight")


@dataclass(frozen=True)
class Repad:
    """The loaded state has `saved` vocabulary rows, the model `padded`; `vocab` rows are the tokenizer's."""
    saved: int
    padded: int
    vocab: int

    def note(self, tp: int) -> str:
        why = (f"model_parallel_size {tp} does not divide {self.saved}" if self.saved % tp
               else f"the config's padded_vocab_size is {self.padded}")
        change = (f"rows {self.saved}..{self.padded - 1} start at zero" if self.padded > self.saved
                  else f"rows {self.padded}..{self.saved - 1} are dropped")
        return (f"vocabulary re-padded from the checkpoint's {self.saved} rows to {self.padded} ({why}): the "
                f"tokenizer's {self.vocab} rows load unchanged, {change}")


def checkpoint_dir_to_load(load: str | Path, iteration: int | None = None) -> Path | None:
    """The checkpoint `load` resumes (or finetunes) from, as the trainer picks it; None when there is none (yet:
    a fresh run whose save == load) or the requested iteration is missing (the trainer says so)."""
    load = Path(load)
    if is_consolidated(load):
        return load
    if not load.is_dir():
        return None
    try:
        tag = resolve_load_tag(load, iteration)
    except CheckpointError:
        return None
    return None if tag is None else load / tag


def adopt_checkpoint_padding(cfg: NeoXConfig, vocab_size: int) -> str | None:
    """At config resolution: adopt the padding of the checkpoint at 'load' (see the module doc). The one-line
    note to print when it is adopted, else None."""
    if not cfg.train.load or cfg.model.padded_vocab_size is None:
        return None
    try:
        gpt_neox = open_gpt_neox_checkpoint(cfg.train.load, cfg.train.iteration)
        if gpt_neox is not None:  # one EleutherAI's gpt-neox wrote: its padding is its embedding's row count
            ckpt, saved = gpt_neox.path, gpt_neox.config.model.padded_vocab_size
        else:
            ckpt = checkpoint_dir_to_load(cfg.train.load, cfg.train.iteration)
            saved = None if ckpt is None else load_resolved(ckpt / "config.yml").model.padded_vocab_size
    except (ConfigError, CheckpointError):
        return None  # an unreadable config: the trainer (and preflight) report it with the whole story
    if saved is None:
        return None
    own = cfg.model.padded_vocab_size
    if not adopt_padded_vocab_size(cfg, saved, vocab_size, str(ckpt)):
        return None
    return (f"padded_vocab_size {saved} adopted from checkpoint {ckpt} (model_parallel_size "
            f"{cfg.parallel.model_parallel_size} divides it; this config alone would pad to {own})")


def check_checkpoint_model(saved: ModelConfig, model: ModelConfig, vocab_size: int | None, keys: tuple[str, ...],
                           checkpoint: Path) -> Repad | None:
    """Refuse a checkpoint of another architecture (keys, padded_vocab_size aside) or whose vocabulary is smaller
    than the tokenizer's (vocab_size None: not checked); a Repad when only the padding differs."""
    check_same_architecture(asdict(saved), asdict(model), tuple(k for k in keys if k != "padded_vocab_size"),
                            checkpoint)
    if saved.padded_vocab_size == model.padded_vocab_size or vocab_size is None:
        return None
    if saved.padded_vocab_size < vocab_size:
        raise CheckpointError(f"checkpoint {checkpoint} has {saved.padded_vocab_size} vocabulary rows, fewer than the "
                              f"tokenizer's {vocab_size} ids: it was trained with another tokenizer; load a matching "
                              "checkpoint or set the tokenizer it was trained with")
    return Repad(saved.padded_vocab_size, model.padded_vocab_size, vocab_size)


def repad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """The first `rows` rows of tensor, zero rows appended when it has fewer."""
    if tensor.shape[0] >= rows:
        return tensor[:rows].clone()
    return torch.cat((tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])))


def repad_state(state: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """A state dict (weights, or one Adam moment) with its vocabulary rows re-padded; the other tensors as given."""
    return {name: repad_rows(t, rows) if name in VOCAB_ROWS else t for name, t in state.items()}

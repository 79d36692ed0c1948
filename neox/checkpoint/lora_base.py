"""Which base model a LoRA run adapts: `lora_base.json` in each of its checkpoints.

A LoRA run's checkpoints hold the adapters (and their optimizer state) only; the frozen base stays where the run
loaded it from: a consolidated or Hugging Face-imported model, a neox training checkpoint or a gpt-neox one. The
record names that directory, so a resume reloads the base and then the adapters, and consolidation (eval, generate,
export) merges the two. The base must stay in place (or the record be edited to its new path).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from neox.checkpoint.errors import CheckpointError

BASE_FILE = "lora_base.json"


def write_base_record(ckpt_dir: Path, base: Path) -> None:
    path = ckpt_dir / BASE_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"base": str(Path(base).absolute())}) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def is_lora_checkpoint(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / BASE_FILE).is_file()


def base_of(ckpt_dir: Path) -> Path:
    """The base model directory a LoRA checkpoint names."""
    path = Path(ckpt_dir) / BASE_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} has no {BASE_FILE}: it is not a checkpoint of a LoRA run (its config has "
                              "no 'lora', or it was cut off). To train adapters on it as the base, set 'finetune: "
                              "true'")
    try:
        base = Path(json.loads(path.read_text(encoding="utf-8"))["base"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is unreadable ({err}); it should be {{\"base\": \"<base model directory>\"}}"
                              ) from None
    if not base.is_dir():
        raise CheckpointError(f"the base model {base} that LoRA checkpoint {ckpt_dir} adapts is gone (the checkpoint "
                              f"holds only the adapters): put it back, or write its new path into {path}")
    return base

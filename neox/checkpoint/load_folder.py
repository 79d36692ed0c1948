"""What `load` may name when it holds nothing to load: gpt-neox's first run (save == load, the folder missing or
still empty) starts from scratch and says so in one line; a file, or a folder of something else, is a mistake that
would otherwise train from scratch and exit 0 as if it had resumed."""
from __future__ import annotations

import re
from pathlib import Path

from neox.checkpoint.engine_state import COMPLETE_MARKER, is_complete
from neox.config.errors import ConfigError

_STEP_DIR = re.compile(r"^global_step(\d+)$")
_KINDS = ("a training save directory (the 'save' of the run to resume), a consolidated model folder "
          "(tools/convert_hf_to_neox.py writes one) or a gpt-neox checkpoint folder")


def require_folder(load: Path) -> None:
    """ConfigError naming the key when `load` exists and is not a folder."""
    if load.exists() and not load.is_dir():
        raise ConfigError(f"'load': {load} is a file, not a checkpoint folder; point 'load' at {_KINDS}, or remove "
                          "'load' to train from scratch")


def start_from_scratch(load: Path, save: str | None) -> str:
    """`load` holds no complete checkpoint, consolidated model or gpt-neox checkpoint: the line to print when that
    is a first run (no such folder yet, an empty one, or this run's own save directory, which deepy has already
    created to write resolved_config.yml into), else ConfigError naming the key and what the folder holds."""
    require_folder(load)
    if not load.exists():
        return (f"load: {load} does not exist yet: starting from scratch (gpt-neox's first-run convention, "
                "save == load)")
    entries = sorted(p.name for p in load.iterdir())
    if not entries or (save is not None and _same(load, Path(save))):
        return (f"load: {load} holds no checkpoint yet: starting from scratch (gpt-neox's first-run convention, "
                "save == load)")
    raise ConfigError(f"'load': {load} is not a checkpoint folder: {_what_it_holds(load, entries)}. Point 'load' "
                      f"at {_KINDS}; an empty or new folder starts from scratch")


def _same(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def _what_it_holds(load: Path, entries: list[str]) -> str:
    step = _STEP_DIR.match(load.name)
    if step and is_complete(load.parent, load.name):
        return (f"it is one checkpoint of the save directory {load.parent}: set 'load: {load.parent}' and "
                f"'iteration: {step.group(1)}'")
    cut_off = [name for name in entries if _STEP_DIR.match(name) and (load / name).is_dir()]
    if cut_off:
        return (f"its {', '.join(cut_off[:3])} {'has' if len(cut_off) == 1 else 'have'} no {COMPLETE_MARKER} (the "
                "save was cut off before it completed), and it has no complete checkpoint")
    if "config.json" in entries and any(name.endswith((".safetensors", ".bin")) for name in entries):
        return "it looks like a Hugging Face model: convert it with tools/convert_hf_to_neox.py and load the result"
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    return f"it holds no global_stepN/{COMPLETE_MARKER}, no consolidated model and no gpt-neox checkpoint ({shown})"

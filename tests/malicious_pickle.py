"""A crafted checkpoint file: an otherwise valid torch state file that also holds an object whose unpickling runs a
shell command (touching a marker file). torch.load(weights_only=False), DeepSpeed's default, runs it; a weights-only
load must refuse the file and the marker must never appear."""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import torch

from neox.checkpoint.safe_load import weights_only_load


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def plant(state_file: Path, marker: Path) -> Path:
    """Add the payload to the dict in state_file (rewritten in place, its tensors kept); returns state_file."""
    state = weights_only_load(state_file)
    state["extra"] = RunsCode(marker)
    torch.save(state, state_file)
    return state_file


class DeepSpeedsReader:
    """DeepSpeed 0.19's TorchCheckpointEngine.load, which runs the payload: what fake engines read through."""

    def load(self, path, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

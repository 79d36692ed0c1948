"""Reading a torch-pickled checkpoint file without running code: torch.load(weights_only=True) with only the plain
records DeepSpeed writes beside the tensors allowed. Every reader of DeepSpeed's files goes through here."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from neox.checkpoint.errors import CheckpointError


def deepspeed_record_types() -> list[type]:
    """Plain records DeepSpeed pickles into its optimizer files next to the tensors (nothing executable)."""
    found: list[type] = []
    for module, names in (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                          ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",))):
        try:
            imported = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        found += [getattr(imported, n) for n in names if hasattr(imported, n)]
    return found


def load_state_file(path: Path) -> dict[str, Any]:
    """A DeepSpeed state file (model states, optimizer partition or pipeline layer) as a dict, memory-mapped."""
    try:
        with torch.serialization.safe_globals(deepspeed_record_types()):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or OSError depending on the damage
        raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a DeepSpeed state dict")
    return data

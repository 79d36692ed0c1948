"""Reading a torch-pickled checkpoint file without running code: torch.load(weights_only=True) with only the plain
records DeepSpeed writes beside the tensors allowed. Every checkpoint file neox reads goes through here: our own
readers call weights_only_load / load_state_file, and DeepSpeed's engine.load_checkpoint (resume, finetune, at every
ZeRO stage, bf16 / fp16 optimizer, pipeline layer files) runs inside deepspeed_loads_weights_only.

A pickle is a program: a file whose objects name os.system (or any callable) in __reduce__ runs it on load unless
the unpickler refuses every global outside an allow-list, which is what weights_only=True does. A `load:` directory
is therefore only data, wherever it came from."""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from neox.checkpoint.errors import CheckpointError

# torch.load reads it at every call: with it set, a weights_only=False written into DeepSpeed's code counts for
# nothing (the loads of universal checkpoints, which bypass the checkpoint engine, call torch.load directly).
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_GLOBAL_IN_ERROR = re.compile(r"GLOBAL ([\w.]+)")


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


def _allowed_names(allowed: Sequence[Any]) -> set[str]:
    return {t[1] if isinstance(t, tuple) else f"{t.__module__}.{t.__qualname__}" for t in allowed}


def foreign_globals(path: Path, allowed: Sequence[Any] = ()) -> list[str]:
    """The callables / classes a torch.save zip file would make the unpickler build, beyond tensors, torch's own
    safe types and `allowed` (DeepSpeed's records always). Reads the pickle stream only, never runs it; [] for
    torch's legacy format, which torch cannot scan (loading it weights-only still refuses)."""
    if not zipfile.is_zipfile(path):
        return []
    names = _allowed_names([*deepspeed_record_types(), *allowed])
    return [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if n not in names]


def refusal(path: Path, err: Exception, allowed: Sequence[Any] = ()) -> str:
    """Why `path` cannot be read weights-only, naming what it holds besides tensors when that is the reason."""
    try:
        foreign = foreign_globals(path, allowed)
    except Exception:  # not even a readable archive: the load error says what is wrong
        foreign = []
    if not foreign and isinstance(err, pickle.UnpicklingError):
        foreign = _GLOBAL_IN_ERROR.findall(str(err))[:1]  # the legacy format: torch names the first one it met
    if foreign:
        return foreign_objects_refusal(path, foreign)
    return f"cannot read {path} with torch.load(weights_only=True): {err}"


def foreign_objects_refusal(path: Path, foreign: Sequence[str]) -> str:
    return (f"refusing to load {path}: besides tensors it holds {', '.join(foreign[:6])}, which "
            "torch.load(weights_only=True) will not build (unpickling it could run code). neox never writes such "
            "objects: do not load this checkpoint unless you know where it came from; if you trust it, re-save that "
            "file's tensors alone (torch.save(state_dict) in a trusted session)")


def weights_only_load(path: str | Path, map_location: Any = "cpu", *, mmap: bool = False,
                      allowed: Sequence[Any] = ()) -> Any:
    """torch.load(weights_only=True) allowing DeepSpeed's records and `allowed`; CheckpointError naming the file
    for a foreign object, a damaged file or a missing one."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals([*deepspeed_record_types(), *allowed]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # UnpicklingError for a foreign object, RuntimeError / OSError for a damaged file
        raise CheckpointError(refusal(path, err, allowed)) from None


def load_state_file(path: Path) -> dict[str, Any]:
    """A DeepSpeed state file (model states, optimizer partition or pipeline layer) as a dict, memory-mapped."""
    data = weights_only_load(path, mmap=zipfile.is_zipfile(path))  # the legacy format cannot be memory-mapped
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a DeepSpeed state dict")
    return data


class WeightsOnlyCheckpointEngine:
    """DeepSpeed's checkpoint engine (TorchCheckpointEngine, or the fast / decoupled writers a `checkpoint.writer`
    picks) with its load replaced: DeepSpeed's reads weights_only=False. Saving and everything else is the wrapped
    engine's."""

    def __init__(self, inner: Any):
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        # DeepSpeed passes 'cpu', a device or `lambda storage, loc: storage` (= leave on the CPU)
        return weights_only_load(path, "cpu" if map_location is None or callable(map_location) else map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextlib.contextmanager
def deepspeed_loads_weights_only(engine: Any, checkpoint: Path) -> Iterator[None]:
    """Around engine.load_checkpoint: every file DeepSpeed reads is loaded weights-only, through its checkpoint
    engine (model states, ZeRO / bf16 optimizer partitions, pipeline layer files) or by a direct torch.load (which
    the forcing variable turns weights-only; a refusal there names the checkpoint, torch does not name the file)."""
    inner = engine.checkpoint_engine
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(inner)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_record_types()):
            yield
    except pickle.UnpicklingError as err:
        found = _GLOBAL_IN_ERROR.findall(str(err))[:1]
        raise CheckpointError(f"refusing to load checkpoint {checkpoint}: one of its files holds "
                              f"{found[0] if found else 'an object'} besides tensors, which torch.load"
                              "(weights_only=True) will not build (unpickling it could run code)") from None
    finally:
        engine.checkpoint_engine = inner
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous

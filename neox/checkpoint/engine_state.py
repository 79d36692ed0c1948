"""Checkpoints: DeepSpeed engine state in {save}/global_step{N}, plus what makes a run resumable and inspectable.

Layout of one checkpoint:
    {save}/global_step{N}/          DeepSpeed's files (model, optimizer / ZeRO shards, client state)
    {save}/global_step{N}/rng/rank{R}.pt   every rank's RNG streams (dropout resumes exactly)
    {save}/global_step{N}/config.yml       the resolved config the run was launched with
    {save}/global_step{N}/tokenizer/       the tokenizer files
    {save}/global_step{N}/configs/         the original YAML files (config_files), as gpt-neox keeps them
    {save}/global_step{N}/complete.json    written last: a directory without it was cut off mid-write
    {save}/latest                          tag of the newest complete checkpoint, replaced atomically

DeepSpeed writes `latest` itself with a plain open/write before all ranks are done; we turn that off and write it
only after the completion marker, so a checkpoint interrupted at any moment is never the one that gets loaded.

no_save_optim leaves DeepSpeed's files out (its optimizer state lives in them at every ZeRO stage, and at ZeRO-3 or
in 16-bit the fp32 weights too): the checkpoint is then the fp32 weights of write_extra's layout-free copy, and
complete.json says `"engine_state": false`. no_save_rng leaves rng/ out.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.safe_load import deepspeed_loads_weights_only, weights_only_load

COMPLETE_MARKER = "complete.json"
LATEST_FILE = "latest"
_TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(save_dir: Path, tag: str) -> bool:
    return (save_dir / tag / COMPLETE_MARKER).is_file()


def complete_tags(save_dir: Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    if not save_dir.is_dir():
        return []
    found = []
    for child in save_dir.iterdir():
        match = _TAG_RE.match(child.name)
        if match and is_complete(save_dir, child.name):
            found.append((int(match.group(1)), child.name))
    return [tag for _, tag in sorted(found)]


def resolve_load_tag(load_dir: Path, requested_iteration: int | None = None) -> str | None:
    """The tag to resume from: the requested iteration, else `latest` if complete, else the newest complete one."""
    if requested_iteration is not None:
        tag = tag_for(requested_iteration)
        if not is_complete(load_dir, tag):
            raise CheckpointError(f"{load_dir / tag} is not a complete checkpoint (no {COMPLETE_MARKER}); "
                                  f"complete ones: {complete_tags(load_dir) or 'none'}")
        return tag
    latest = load_dir / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        if tag and is_complete(load_dir, tag):
            return tag
    tags = complete_tags(load_dir)
    return tags[-1] if tags else None


# --- RNG -------------------------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Every RNG a rank draws from, as plain tensors/lists so it loads with weights_only=True."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]),
                   "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"]), py_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- save / load -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunFiles:
    """What is copied next to every checkpoint besides the engine state."""
    resolved_config: Path
    tokenizer_files: tuple[Path, ...]


@dataclass(frozen=True)
class SaveInProgress:
    """A checkpoint whose files are written (or being written in the background) but not yet marked complete."""
    save_dir: Path
    ckpt_dir: Path
    iteration: int
    record: dict[str, Any]  # complete.json's content
    keep_last: int | None
    began: float  # time.perf_counter() when the save began


def save(engine, save_dir: Path, iteration: int, client_state: dict[str, Any], run_files: RunFiles,
         rank: int, barrier: Callable[[], None], keep_last: int | None = None,
         write_extra: Callable[[Path], None] | None = None, *, engine_state: bool = True, save_rng: bool = True,
         config_files: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory. write_extra(ckpt_dir), called on
    every rank after the engine state, adds files that must exist before the checkpoint counts as complete.
    engine_state False (no_save_optim) skips DeepSpeed's files, save_rng False the RNG files; config_files
    (name -> text) go to configs/."""
    started = begin_save(engine, save_dir, iteration, client_state, run_files, rank, barrier, keep_last, write_extra,
                         engine_state=engine_state, save_rng=save_rng, config_files=config_files)
    return finish_save(started, rank, barrier)


def begin_save(engine, save_dir: Path, iteration: int, client_state: dict[str, Any], run_files: RunFiles,
               rank: int, barrier: Callable[[], None], keep_last: int | None = None,
               write_extra: Callable[[Path], None] | None = None, *, engine_state: bool = True,
               save_rng: bool = True, config_files: dict[str, Any] | None = None) -> SaveInProgress:
    """Collective: every file of the checkpoint except the completion marker and `latest` (finish_save). Files the
    engine or write_extra hand to a background writer may still be in flight when it returns. One barrier (after a
    leftover of the same step is removed); with finish_save's two, a save costs three."""
    began = time.perf_counter()
    tag = tag_for(iteration)
    ckpt_dir = save_dir / tag
    if rank == 0 and ckpt_dir.exists():
        # A leftover from an interrupted save of this same step: never mix its files with the new ones.
        remove_checkpoint(ckpt_dir)
    barrier()
    if engine_state:
        # Frozen parameters (a LoRA run's base) are not saved: they come from the base checkpoint the run names.
        engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=has_frozen_parameters(engine))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if save_rng:
        (ckpt_dir / "rng").mkdir(parents=True, exist_ok=True)
        rng_file = ckpt_dir / "rng" / f"rank{rank}.pt"
        torch.save(rng_state(), rng_file.with_suffix(".tmp"))
        os.replace(rng_file.with_suffix(".tmp"), rng_file)
    if write_extra is not None:
        write_extra(ckpt_dir)
    # No barrier here: finish_save's first one is where every rank's files are known to be written.
    if rank == 0:
        shutil.copy2(run_files.resolved_config, ckpt_dir / "config.yml")
        tok_dir = ckpt_dir / "tokenizer"
        tok_dir.mkdir(exist_ok=True)
        for f in run_files.tokenizer_files:
            shutil.copy2(f, tok_dir / Path(f).name)
        write_config_files(ckpt_dir, config_files)
    record = {"iteration": iteration, "engine_state": engine_state, "rng": save_rng}
    return SaveInProgress(save_dir, ckpt_dir, iteration, record, keep_last, began)


def finish_save(started: SaveInProgress, rank: int, barrier: Callable[[], None]) -> Path:
    """Collective, once every rank's files are durable (written, fsynced and renamed into place): the completion
    marker, then `latest`, then the removal of checkpoints past keep_last."""
    barrier()  # every rank has written its files (or waited for its background writer) before the marker
    if rank == 0:
        ckpt_dir, save_dir = started.ckpt_dir, started.save_dir
        # The marker must not reach the disk before the files it vouches for (power loss, not only kill -9).
        fsync_tree(ckpt_dir)
        write_text_atomic(ckpt_dir / COMPLETE_MARKER, json.dumps({**started.record, "time": time.time()}) + "\n")
        write_text_atomic(save_dir / LATEST_FILE, ckpt_dir.name + "\n")
        if started.keep_last:
            for old in complete_tags(save_dir)[:-started.keep_last]:
                remove_checkpoint(save_dir / old)
    barrier()
    return started.ckpt_dir


def has_frozen_parameters(engine) -> bool:
    """The module has parameters that do not train (a LoRA base): its checkpoints hold the trained ones only."""
    return any(not p.requires_grad for p in engine.module.parameters())


def write_config_files(ckpt_dir: Path, config_files: dict[str, Any] | None) -> None:
    """gpt-neox's configs/ folder: each original config file under its own name (non-text values as JSON)."""
    if not config_files:
        return
    folder = ckpt_dir / "configs"
    folder.mkdir(exist_ok=True)
    for name, content in config_files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / Path(name).name).write_text(text, encoding="utf-8")


def completion_record(ckpt_dir: Path) -> dict[str, Any]:
    """complete.json of a checkpoint ({} if absent or unreadable)."""
    try:
        record = json.loads((ckpt_dir / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def has_engine_state(ckpt_dir: Path) -> bool:
    """False for a checkpoint saved with no_save_optim (weights in layout_free/ only)."""
    return bool(completion_record(ckpt_dir).get("engine_state", True))


def rng_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / "rng" / f"rank{rank}.pt"


def has_rng_state(ckpt_dir: Path) -> bool:
    """False for a checkpoint saved with no_save_rng; checkpoints written before that key always had rng/."""
    return bool(completion_record(ckpt_dir).get("rng", True))


def read_rng_state(ckpt_dir: Path, rank: int) -> dict[str, Any]:
    """This rank's RNG streams, read weights-only. A checkpoint that has rng/ but not this rank's file (copied in
    part, or written by fewer ranks) is refused: resuming on with other streams would silently change the run."""
    path = rng_file(ckpt_dir, rank)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: checkpoint {ckpt_dir} keeps every rank's RNG streams, but not "
                              f"rank {rank}'s. Restore the file, or set 'no_load_rng: true' to resume with fresh "
                              "dropout streams")
    return weights_only_load(path)


def missing_rng_warning(ckpt_dir: Path, rank: int) -> str | None:
    """no_load_rng: the one line to print when this rank's RNG file is missing from a checkpoint that has rng/."""
    path = rng_file(ckpt_dir, rank)
    if not has_rng_state(ckpt_dir) or path.is_file():
        return None
    return (f"WARNING: {path} is missing from checkpoint {ckpt_dir}; no_load_rng is set, so rank {rank} reseeds its "
            "dropout streams instead")


def fsync_tree(root: Path) -> None:
    """Flush every file under root, then the directories holding their names. On a shared filesystem the other
    nodes' files were flushed to the server when their ranks closed them; this covers the local disk."""
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_checkpoint(ckpt_dir: Path) -> None:
    """Marker first: a removal cut off half-way leaves a directory that no longer counts as complete."""
    (ckpt_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def load(engine, load_dir: Path, tag: str, rank: int, finetune: bool, *, load_optimizer: bool = True,
         load_rng: bool = True) -> dict[str, Any]:
    """Collective. Full resume restores engine, optimizer and RNG and returns the client state;
    finetune loads the module weights only and returns {}; load_optimizer False (no_load_optim) loads the module
    weights and returns the client state; load_rng False (no_load_rng) leaves the RNG streams alone."""
    module_only = finetune or not load_optimizer
    with deepspeed_loads_weights_only(engine, load_dir / tag):  # a crafted checkpoint must not run code
        load_path, client_state = engine.load_checkpoint(
            str(load_dir), tag=tag, load_module_only=module_only, load_optimizer_states=not module_only,
            load_lr_scheduler_states=not module_only, load_module_strict=not has_frozen_parameters(engine))
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {load_dir / tag}")
    if finetune:
        return {}
    if load_rng and has_rng_state(load_dir / tag):
        set_rng_state(read_rng_state(load_dir / tag, rank))
    return client_state or {}


def check_same_architecture(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...],
                            checkpoint: Path) -> None:
    """Refuse a checkpoint whose model differs from the configured one, naming every mismatched key."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in keys
             if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {checkpoint} was trained with a different architecture; mismatched keys: "
                              + "; ".join(diffs) + ". Load a matching checkpoint or fix these keys in your config.")

"""Build a checkpoint's layout-free copy offline, so that any tp/pp/dp/ZeRO layout can resume it.

    python tools/reshard_checkpoint.py --checkpoint runs/big/checkpoints                 # latest, in place
    python tools/reshard_checkpoint.py --checkpoint runs/big/checkpoints --iteration 2000 --output runs/big-any

A run saved with `checkpoint_layout_free: false` holds only DeepSpeed's files, which only the layout that wrote
them can load. This reads them (any tensor / pipeline parallel size, ZeRO 0-3, fp32 or bf16: fp32 master weights,
Adam moments and step count) and writes global_stepN/layout_free/ as a training run would have. Without --output
the copy goes into the checkpoint itself; with --output DIR the checkpoint is copied to DIR/global_stepN with the
copy added (and DIR/latest written), leaving the original untouched. Then resume at any layout with `load: DIR`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path

from neox.checkpoint.consolidated import find_checkpoint, is_consolidated, swap_into_place
from neox.checkpoint.engine_state import LATEST_FILE, write_text_atomic
from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.gpt_neox import is_gpt_neox_checkpoint
from neox.checkpoint.layout_rebuild import rebuild_layout_free_state
from neox.config.errors import ConfigError
from neox.train.run import SCHEDULE_STATE_KEY, Progress

_INPUT_ERRORS = (CheckpointError, ConfigError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="training save directory (its latest complete checkpoint) or a global_stepN directory")
    parser.add_argument("--iteration", type=int, default=None, help="use global_step{N} of the save directory")
    parser.add_argument("--output", type=Path, default=None,
                        help="new save directory to copy the checkpoint into, with the layout-free copy added "
                             "(default: add it to the checkpoint in place)")
    parser.add_argument("--force", action="store_true", help="rebuild layout_free/ even if the checkpoint has one")
    return parser


def reshard(checkpoint: Path, iteration: int | None, output: Path | None, force: bool) -> Path:
    """Returns the checkpoint directory that now holds layout_free/."""
    ckpt_dir = find_checkpoint(checkpoint, iteration)
    if is_consolidated(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir} is a consolidated model (weights only): every layout loads it already "
                              "with finetune: true; pass a training checkpoint")
    if is_gpt_neox_checkpoint(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir} was written by gpt-neox: every layout loads its weights already (`load` it; "
                              "its optimizer state cannot be mapped to neox's); pass a neox training checkpoint")
    client_keys = tuple(f.name for f in dataclasses.fields(Progress))
    if output is None:
        return rebuild_layout_free_state(ckpt_dir, client_keys, replace=force, optional_keys=(SCHEDULE_STATE_KEY,))
    output = output.expanduser().absolute()
    if output.exists() and any(output.iterdir()):
        raise CheckpointError(f"--output {output} exists and is not empty; choose a new directory")
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        copy = tmp / ckpt_dir.name
        shutil.copytree(ckpt_dir, copy, ignore=shutil.ignore_patterns(".*"))
        rebuild_layout_free_state(copy, client_keys, replace=True, optional_keys=(SCHEDULE_STATE_KEY,))
        write_text_atomic(tmp / LATEST_FILE, ckpt_dir.name + "\n")
        swap_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output / ckpt_dir.name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = reshard(args.checkpoint, args.iteration, args.output, args.force)
    except _INPUT_ERRORS as err:
        print(f"reshard_checkpoint: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'layout_free'}: resume it at any tp/pp/dp/ZeRO layout")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The shared start of every per-rank program (`python -m neox.train | neox.eval | neox.generate --config R.yml`).

Each program gets the same handling: parse --config, load the resolved config, enter what the program keeps per rank
(train: its log, status and exit record), join the process group, check that the launcher started as many ranks as
the config was resolved for, run, and turn input errors (bad config, data, tokenizer or checkpoint) into one
paragraph naming the rank, exit code 2.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from neox.checkpoint.errors import CheckpointError
from neox.config.errors import ConfigError
from neox.config.neox_config import NeoXConfig
from neox.config.resolved import load_resolved
from neox.data.errors import DataError
from neox.parallel.runtime import Runtime, init_runtime, rank_from_environment
from neox.tokenizer import TokenizerError

INPUT_ERROR_EXIT = 2
# What every program reports without a traceback: the user fixes the config, the data, the tokenizer or the checkpoint.
COMMON_INPUT_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, TokenizerError, CheckpointError)


class WorldSizeError(RuntimeError):
    """The launch started another number of ranks than the resolved config's world size."""


@dataclass(frozen=True)
class RankProgram:
    """One per-rank program: its module name, the deepy command that launches it and what it does once set up."""

    module: str                 # "neox.train": the prog name and the prefix of its error lines
    launch_command: str         # "deepy train"
    description: str
    # (resolved config, its path, this rank's runtime) -> exit code (None: 0), e.g. train's requeue code
    body: Callable[[NeoXConfig, Path, Runtime], int | None]
    input_errors: tuple[type[Exception], ...] = ()  # the program's own errors, reported like COMMON_INPUT_ERRORS
    # Runs the rest of the rank's life, the rendezvous included, inside what the program keeps per rank (train: its
    # log, status and exit record), so that a rank that hangs or fails in the rendezvous is named too:
    # (resolved config, its path, rank, the rest) -> the rest's exit code. None: the rest runs bare.
    around_rank: Callable[[NeoXConfig, Path, int, Callable[[], int | None]], int | None] | None = None


def check_world_size(runtime: Runtime, cfg: NeoXConfig, config_path: Path, launch_command: str) -> None:
    if runtime.world_size != cfg.derived.world_size:
        raise WorldSizeError(
            f"{runtime.world_size} ranks were started but {config_path} was resolved for world_size "
            f"{cfg.derived.world_size} (num_gpus x nodes): the batch arithmetic and the layout would be wrong. "
            f"Launch with `{launch_command}`, or start as many ranks as num_gpus says.")


def rank_label() -> str:
    return os.environ.get("RANK", "0")


def run_rank_program(program: RankProgram, argv: Sequence[str] | None = None) -> int:
    """Parse argv, set up the rank and run program.body: its exit code, or INPUT_ERROR_EXIT on an input error."""
    parser = argparse.ArgumentParser(prog=f"python -m {program.module}", description=program.description)
    parser.add_argument("--config", required=True, type=Path,
                        help=f"resolved config written by `{program.launch_command}`")
    # DeepSpeed's launcher appends --local_rank unless told not to; LOCAL_RANK in the environment is what we read.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        cfg = load_resolved(args.config)
        rest = functools.partial(_join_and_run, program, cfg, args.config)
        if program.around_rank is None:
            code = rest()
        else:
            code = program.around_rank(cfg, args.config, rank_from_environment(), rest)
    except (WorldSizeError, *COMMON_INPUT_ERRORS, *program.input_errors) as err:
        # One paragraph per failing rank, no traceback; the launcher stops the other ranks on a non-zero exit.
        # One write call for the whole line: ranks share the launcher's stderr and run unbuffered (python -u), where
        # print() writes the text and its newline separately and two ranks' lines could run into each other.
        sys.stderr.write(f"{program.module}: error (rank {rank_label()}): {err}\n")
        sys.stderr.flush()
        return INPUT_ERROR_EXIT
    return 0 if code is None else code


def _join_and_run(program: RankProgram, cfg: NeoXConfig, config_path: Path) -> int | None:
    runtime = init_runtime(cfg.launch.distributed_backend, timeout_minutes=cfg.launch.distributed_timeout_minutes)
    check_world_size(runtime, cfg, config_path, program.launch_command)
    return program.body(cfg, config_path, runtime)

"""Checks deepy runs before DeepSpeed's launcher starts any rank: the user reads one message, not N ranks' output.

Every check raises ConfigError naming the key (and file) to fix; deepy prints it as one paragraph, exit code 2.
"""
from __future__ import annotations

import socket
import zipfile
from pathlib import Path

from neox.config import ConfigError, NeoXConfig
from neox.config.derive import read_hostfile
from neox.config.validate import annotate

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


def _error(message: str, cfg: NeoXConfig) -> ConfigError:
    return annotate(ConfigError(message), cfg)


# --- rendezvous port -------------------------------------------------------------------------------------------

def master_is_here(cfg: NeoXConfig) -> bool:
    """Whether rank 0's rendezvous (master_addr:master_port) is opened on this machine."""
    launch = cfg.launch
    if launch.hostfile is None:
        return True
    if launch.no_ssh:
        return launch.node_rank == 0
    master = launch.master_addr or next(iter(read_hostfile(Path(launch.hostfile))))
    return master in _this_host()


def _this_host() -> set[str]:
    return LOCAL_NAMES | {socket.gethostname(), socket.getfqdn()}


def ranks_run_here(cfg: NeoXConfig) -> bool:
    """Whether this machine starts ranks, so that the files they read can be checked from here: a launch from a
    login node that only ssh's to the hosts may not see the nodes' local disks."""
    launch = cfg.launch
    if launch.hostfile is None or launch.no_ssh:
        return True
    return any(host in _this_host() for host in read_hostfile(Path(launch.hostfile)))


def port_is_taken(port: int) -> bool:
    """True when a socket already listens on the port. SO_REUSEADDR, as torch's store uses: a port left in
    TIME_WAIT by a finished job is free for it, a listening one is not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return True
    return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def check_master_port(cfg: NeoXConfig) -> None:
    port = cfg.launch.master_port
    if master_is_here(cfg) and port_is_taken(port):
        raise _error(f"'master_port' {port} is already in use on this machine (another training job, or ranks of "
                     f"an earlier one still running); pick a free port, e.g. --master_port {_free_port()}, or stop "
                     "the process holding it", cfg)


# --- training data ----------------------------------------------------------------------------------------------

def check_data(cfg: NeoXConfig, vocab_size: int) -> None:
    """Every dataset prefix has a readable .bin/.idx pair whose sampled token ids fit the tokenizer."""
    from neox.data.errors import DataError
    from neox.data.indexed import IndexedDataset
    from neox.data.token_range import check_token_ids, token_dataset_prefixes, tokenizer_label

    for key, prefix in token_dataset_prefixes(cfg.data):
        if not IndexedDataset.exists(prefix):
            raise _error(f"'{key}': no dataset at prefix {prefix!r} ({prefix}.bin and {prefix}.idx do not both "
                         "exist); give the path without the extension, as tools/preprocess_data.py wrote it "
                         "(--output-prefix P writes P_text_document.bin/.idx)", cfg)
        try:
            check_token_ids(prefix, vocab_size, key=key, tokenizer=tokenizer_label(cfg.data))
        except DataError as err:
            raise _error(str(err), cfg) from None
    value_keys = [f"{split}_{kind}_data_paths" for kind in ("label", "reward") for split in ("train", "valid", "test")]
    value_keys += [f"{side}_{split}_label_data_paths" for split in ("train", "valid", "test") for side in ("pos", "neg")]
    for key in value_keys:
        for i, prefix in enumerate(getattr(cfg.data, key) or []):
            if not IndexedDataset.exists(prefix):
                raise _error(f"'{key}' entry {i}: no dataset at prefix {prefix!r} (.bin and .idx)", cfg)


# --- checkpoints ------------------------------------------------------------------------------------------------

def _is_whole_torch_file(path: Path) -> bool:
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as handle:  # torch's legacy format is a bare pickle stream; it cannot be checked cheaply
        return handle.read(1) == b"\x80" and path.stat().st_size > 1


def unreadable_torch_files(checkpoint_dir: Path) -> list[Path]:
    """The .pt files that are not whole: torch.save writes a zip whose directory sits at the very end, so a
    truncated file has none. Reads a few KB per file, not the tensors."""
    return sorted(p for p in checkpoint_dir.rglob("*.pt") if not _is_whole_torch_file(p))


def check_resume_checkpoint(cfg: NeoXConfig, vocab_size: int | None = None) -> None:
    """train with 'load': the checkpoint it will resume is complete, whole and of the configured architecture (its
    vocabulary padding may differ: the trainer re-pads it, neox/checkpoint/vocab_padding.py)."""
    from neox.checkpoint.consolidated import is_consolidated
    from neox.checkpoint.engine_state import complete_tags, resolve_load_tag
    from neox.checkpoint.errors import CheckpointError
    from neox.checkpoint.gpt_neox import open_gpt_neox_checkpoint
    from neox.checkpoint.load_folder import require_folder, start_from_scratch
    from neox.checkpoint.vocab_padding import check_checkpoint_model
    from neox.config.resolved import load_resolved
    from neox.train.run import ARCHITECTURE_KEYS

    load = Path(cfg.train.load)
    try:
        require_folder(load)
        gpt_neox = open_gpt_neox_checkpoint(load, cfg.train.iteration)  # one EleutherAI's gpt-neox wrote
        if gpt_neox is not None:
            checkpoint_dir, saved_model = gpt_neox.path, gpt_neox.config.model
        else:
            if is_consolidated(load):
                checkpoint_dir = load
            else:
                tag = resolve_load_tag(load, cfg.train.iteration)
                if tag is None:
                    start_from_scratch(load, cfg.train.save)  # the rank prints the line; here only refuse
                    return
                checkpoint_dir = load / tag
            saved_model = load_resolved(checkpoint_dir / "config.yml").model
        check_checkpoint_model(saved_model, cfg.model, vocab_size, ARCHITECTURE_KEYS, checkpoint_dir)
    except CheckpointError as err:
        raise _error(f"'load': {err}", cfg) from None
    except ConfigError as err:
        raise _error(str(err), cfg) from None
    broken = unreadable_torch_files(checkpoint_dir)
    if broken:
        older = [t for t in complete_tags(load) if load / t != checkpoint_dir]
        raise _error(
            f"'load': checkpoint {checkpoint_dir} is damaged: {', '.join(str(p) for p in broken[:3])}"
            f"{' ...' if len(broken) > 3 else ''} cannot be read (truncated or corrupt torch file). Resume from "
            + (f"an older checkpoint ({', '.join(older)}): write its tag into {load / 'latest'}" if older else
               "another checkpoint") + ", or delete the damaged one", cfg)
    if gpt_neox is None:  # gpt-neox's files allow more records (numpy, argparse): its reader checks them itself
        check_no_foreign_objects(checkpoint_dir, cfg)


def check_no_foreign_objects(checkpoint_dir: Path, cfg: NeoXConfig) -> None:
    """Every .pt file of a neox checkpoint holds tensors and DeepSpeed's plain records only: anything else would be
    refused by the ranks' weights-only loads, and might be a crafted file that runs code when unpickled. Scans the
    pickle streams without running them."""
    from neox.checkpoint.safe_load import foreign_globals, foreign_objects_refusal

    for path in sorted(checkpoint_dir.rglob("*.pt")):
        try:
            foreign = foreign_globals(path)
        except Exception:  # a zip but not torch's: the rank's load names the file and the error
            continue
        if foreign:
            raise _error(f"'load': {foreign_objects_refusal(path, foreign)}", cfg)


def check_checkpoint_exists(cfg: NeoXConfig, iteration: int | None = None) -> None:
    """generate / eval: 'load' designates a complete checkpoint."""
    from neox.checkpoint.consolidated import find_checkpoint
    from neox.checkpoint.errors import CheckpointError

    try:
        find_checkpoint(cfg.train.load, iteration)
    except CheckpointError as err:
        raise _error(f"'load': {err}", cfg) from None


# --- per command ------------------------------------------------------------------------------------------------

def before_train(cfg: NeoXConfig, vocab_size: int) -> None:
    check_master_port(cfg)
    if not ranks_run_here(cfg):
        return
    check_data(cfg, vocab_size)
    if cfg.train.load is not None:
        check_resume_checkpoint(cfg, vocab_size)


def before_generate(cfg: NeoXConfig) -> None:
    from neox.generate.decode import GenerationError
    from neox.generate.run import generation_mode
    from neox.generate.samples_io import read_prompts

    check_master_port(cfg)
    if not ranks_run_here(cfg):
        return
    check_checkpoint_exists(cfg, cfg.train.iteration)
    settings = cfg.generate
    if generation_mode(settings) == "input-file" and settings.sample_input_file is not None:
        try:
            read_prompts(settings.sample_input_file, settings.prompt_end)
        except GenerationError as err:
            raise _error(f"'sample_input_file' (-i): {err}", cfg) from None


def before_eval(cfg: NeoXConfig) -> None:
    from neox.eval.errors import EvalError
    from neox.eval.task_index import include_paths

    check_master_port(cfg)
    if not ranks_run_here(cfg):
        return
    check_checkpoint_exists(cfg, cfg.eval.eval_iteration)
    try:
        include_paths(cfg.eval.eval_tasks_path)
    except EvalError as err:
        raise _error(str(err), cfg) from None

"""deepy: resolve a config from YAML files and launch the ranks with DeepSpeed's own launcher.

    deepy.py train       [-d DIR] a.yml b.yml ... [--key value ...]
    deepy.py show-config [-d DIR] a.yml b.yml ... [--key value ...]
    deepy.py generate    [-d DIR] a.yml ... [-i PROMPTS] [-o SAMPLES.jsonl] [--key value ...]
    deepy.py eval        [-d DIR] a.yml ... --eval_tasks piqa arc_easy perplexity [--key value ...]

train merges and validates the config, writes it to {save or log_dir}/resolved_config.yml, then calls
deepspeed.launcher.runner.main(argv) so that each rank runs `python -m neox.train --config <that file>`.
Ranks get OMP_NUM_THREADS=1 unless it is already set: through the environment on the local node (and with
--no_ssh), through a DeepSpeed env file (DS_ENV_FILE) for pdsh/openmpi/mvapich/slurm launches.
For multi-node runs the run directory must be on a filesystem every node sees.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from neox.config import ConfigError, NeoXConfig, load_config, save_resolved
from neox.config.deepspeed import check_precision_supported
from neox.config.derive import detect_local_gpus
from neox.config.resolved import RESOLVED_NAME
from neox.config.show import format_config_table
from neox.config.validate import annotate, require_for_training

COMMANDS = ("train", "show-config", "generate", "eval")
TRAIN_ENTRY = "neox.train"
GENERATE_ENTRY = "neox.generate"
# Not resolved_config.yml: a generate launch sharing log_dir with training must not replace training's file.
GENERATE_RESOLVED_NAME = "generate_config.yml"
EVAL_ENTRY = "neox.eval"
EVAL_RESOLVED_NAME = "eval_config.yml"  # beside training's resolved_config.yml, never over it
ENV_FILE_NAME = "deepspeed_env"
# Variables every rank gets unless the caller's environment already sets them. One OpenMP thread per rank:
# N ranks each spawning a thread per core oversubscribes the machine (torchrun sets the same default).
RANK_ENV_DEFAULTS = {"OMP_NUM_THREADS": "1"}


class LaunchError(RuntimeError):
    """DeepSpeed's launcher refused the job or could not start it."""


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split deepy's own arguments from the trailing '--key value' config overrides."""
    own = {"-d", "--conf_dir", "-h", "--help"}
    for i, token in enumerate(argv):
        if token.startswith("--") and token.split("=", 1)[0] not in own:
            return list(argv[:i]), list(argv[i:])
    return list(argv), []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepy",
        description="Resolve a neox config from YAML files (later files win; --key value overrides win over "
        "all) and run a command with it.",
        epilog="Example: deepy.py train -d configs tiny.yml cpu.yml local_setup.yml --train_iters 20",
    )
    parser.add_argument("command", choices=COMMANDS, help="train: launch training; show-config: print the config; "
                        "generate: sample from the checkpoint at 'load'")
    parser.add_argument("-d", "--conf_dir", dest="config_dir", help="folder the config file names are relative to")
    parser.add_argument("configs", nargs="+", metavar="CONFIG.yml", help="YAML files, merged in order")
    parser.add_argument("-i", dest="input_file", metavar="PROMPTS",
                        help="generate: prompts file (text_gen_type input-file, sample_input_file)")
    parser.add_argument("-o", dest="output_file", metavar="SAMPLES.jsonl", help="generate: sample_output_file")
    return parser


def tokenizer_vocab_size(cfg: NeoXConfig) -> int:
    from neox.tokenizer import build_tokenizer

    return build_tokenizer(cfg.data.tokenizer_type, cfg.data.vocab_file, cfg.data.merge_file).vocab_size


def resolve(
    files: Sequence[str], overrides: Sequence[str], config_dir: str | None, *, need_vocab: bool
) -> NeoXConfig:
    """Load twice: the first pass finds the tokenizer, whose vocab size the second pass pads.
    need_vocab (train): the config must be trainable and the tokenizer must build."""
    from neox.tokenizer import TokenizerError

    cfg = load_config(files, overrides, config_dir=config_dir)
    if need_vocab:  # a missing data path says more than the tokenizer error it would cause
        try:
            require_for_training(cfg)
        except ConfigError as err:
            raise annotate(err, cfg) from None
    try:
        vocab_size = tokenizer_vocab_size(cfg)
    except TokenizerError as err:
        if need_vocab:
            raise ConfigError(f"cannot build the tokenizer ('tokenizer_type', 'vocab_file', 'merge_file'): {err}")
        return cfg  # show-config still shows everything else; padded_vocab_size stays unresolved
    return load_config(files, overrides, config_dir=config_dir, vocab_size=vocab_size)


def runner_argv(
    cfg: NeoXConfig, resolved_path: Path, *, entry: str = TRAIN_ENTRY, local_gpus: int = 0
) -> list[str]:
    """The argv for deepspeed.launcher.runner.main. entry is a module name, or a path to a .py script."""
    launch = cfg.launch
    argv: list[str] = []
    if launch.hostfile is not None:
        argv += ["--hostfile", launch.hostfile]
    if launch.include:
        argv += ["--include", launch.include]
    if launch.exclude:
        argv += ["--exclude", launch.exclude]
    if launch.num_nodes != -1:
        argv += ["--num_nodes", str(launch.num_nodes)]
    if launch.num_gpus is not None:
        argv += ["--num_gpus", str(launch.num_gpus)]
    elif launch.hostfile is None and not (launch.include or launch.exclude) and local_gpus == 0:
        # Without GPUs DeepSpeed would count NUMA nodes; pin the rank count derive.py decided on.
        argv += ["--num_gpus", str(cfg.derived.world_size)]
    if launch.master_addr is not None:
        argv += ["--master_addr", launch.master_addr]
    argv += ["--master_port", str(launch.master_port), "--launcher", launch.launcher]
    if launch.launcher_args:
        argv += ["--launcher_args", launch.launcher_args]
    if launch.no_ssh:
        argv += ["--no_ssh", "--node_rank", str(launch.node_rank)]
    if launch.no_ssh_check:
        argv.append("--no_ssh_check")
    if launch.force_multi:
        argv.append("--force_multi")
    # Our entrypoints read LOCAL_RANK from the environment DeepSpeed sets; no --local_rank argument.
    argv.append("--no_local_rank")
    if not entry.endswith(".py"):
        argv.append("--module")
    return argv + [entry, "--config", str(resolved_path)]


def rank_env(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    return {key: environ.get(key, default) for key, default in RANK_ENV_DEFAULTS.items()}


def write_env_file(run_dir: Path, env: dict[str, str]) -> Path:
    """DeepSpeed's env file for multi-node launches: the user's own env file lines, then ours if not set there."""
    path = run_dir / ENV_FILE_NAME
    user_name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
    entries: dict[str, str] = {}  # the runner reads ~ then ., a later line winning, as here
    for folder in (Path.home(), Path(".")):
        candidate = folder / user_name
        if candidate.is_file() and candidate.resolve() != path.resolve():
            for line in candidate.read_text().splitlines():
                if "=" in line:
                    entries[line.split("=", 1)[0].strip()] = line
    for key, value in env.items():
        entries.setdefault(key, f"{key}={value}")
    lines = list(entries.values())
    fd, tmp = tempfile.mkstemp(prefix=f".{ENV_FILE_NAME}.", dir=run_dir)
    with os.fdopen(fd, "w") as handle:
        handle.write("".join(f"{ln}\n" for ln in lines))
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def _environ(updates: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_deepspeed(
    cfg: NeoXConfig, resolved_path: Path, *, entry: str = TRAIN_ENTRY, local_gpus: int | None = None
) -> int:
    """Launch every rank through deepspeed.launcher.runner.main; return the exit code of the job."""
    local_gpus = detect_local_gpus() if local_gpus is None else local_gpus
    argv = runner_argv(cfg, resolved_path, entry=entry, local_gpus=local_gpus)
    env = rank_env(os.environ)
    env_file = write_env_file(resolved_path.parent, env)
    with _environ({**env, "DS_ENV_FILE": str(env_file.resolve())}):
        from deepspeed.launcher import runner

        if runner.DEEPSPEED_ENVIRONMENT_NAME != os.environ["DS_ENV_FILE"]:
            runner = importlib.reload(runner)  # it reads DS_ENV_FILE once, at import
        try:
            runner.main(argv)
        except SystemExit as done:  # the runner exits with the failing rank's code
            return 0 if done.code is None else done.code if isinstance(done.code, int) else 1
        except (RuntimeError, ValueError, AssertionError, OSError, subprocess.SubprocessError) as err:
            raise LaunchError(f"DeepSpeed's launcher refused the job ({' '.join(argv)}): {err}") from None
    return 0


def run_dir_of(cfg: NeoXConfig) -> Path:
    return Path(cfg.train.save if cfg.train.save is not None else cfg.log.log_dir)


def train(files: Sequence[str], overrides: Sequence[str], config_dir: str | None) -> int:
    cfg = resolve(files, overrides, config_dir, need_vocab=True)
    try:
        launch = cfg.launch
        if launch.hostfile is None or launch.no_ssh:
            check_precision_supported(cfg, cuda_available=detect_local_gpus() > 0)
    except ConfigError as err:
        raise annotate(err, cfg) from None
    resolved_path = save_resolved(cfg, run_dir_of(cfg) / RESOLVED_NAME)
    print(f"deepy: resolved config written to {resolved_path}", flush=True)
    return run_deepspeed(cfg, resolved_path)


def pull_short_options(overrides: Sequence[str], options: Sequence[str] = ("-i", "-o")) -> tuple[list[str], list[str]]:
    """Take `-i FILE` / `-o FILE` typed after the first --key value out of the overrides."""
    pulled: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(overrides):
        token = overrides[i]
        if token in options and i + 1 < len(overrides):
            pulled += [token, overrides[i + 1]]
            i += 2
        elif token.startswith("--") and "=" not in token and i + 1 < len(overrides):
            rest += [token, overrides[i + 1]]
            i += 2
        else:
            rest.append(token)
            i += 1
    return pulled, rest


def generate_short_forms(input_file: str | None, output_file: str | None) -> list[str]:
    """`-i FILE -o FILE` as config overrides (absolute paths: the ranks may start elsewhere)."""
    overrides: list[str] = []
    if input_file is not None:
        overrides += ["--text_gen_type", "input-file", "--sample_input_file", os.path.abspath(input_file)]
    if output_file is not None:
        overrides += ["--sample_output_file", os.path.abspath(output_file)]
    return overrides


def generate(files: Sequence[str], overrides: Sequence[str], config_dir: str | None) -> int:
    """Sample from the checkpoint at 'load' with every rank of the launch (python -m neox.generate)."""
    cfg = resolve(files, overrides, config_dir, need_vocab=False)
    if cfg.train.load is None:
        raise ConfigError("generate needs 'load', the checkpoint directory to sample from (e.g. --load runs/ckpt)")
    out_dir = Path(cfg.log.log_dir) if cfg.log.log_dir is not None else Path(cfg.generate.sample_output_file).parent
    resolved_path = save_resolved(cfg, out_dir.resolve() / GENERATE_RESOLVED_NAME)
    print(f"deepy: resolved config written to {resolved_path}", flush=True)
    return run_deepspeed(cfg, resolved_path, entry=GENERATE_ENTRY)


def evaluate(files: Sequence[str], overrides: Sequence[str], config_dir: str | None) -> int:
    """lm_eval tasks and perplexity on the checkpoint at 'load', with every rank of the launch (python -m neox.eval)."""
    from neox.eval.cli import fold_eval_overrides

    cfg = resolve(files, fold_eval_overrides(overrides), config_dir, need_vocab=False)
    if cfg.train.load is None:
        raise ConfigError("eval needs 'load', the checkpoint directory to evaluate (e.g. --load runs/ckpt)")
    if not cfg.eval.eval_tasks:
        raise ConfigError("eval needs 'eval_tasks', e.g. --eval_tasks piqa arc_easy perplexity")
    out_dir = Path(cfg.log.log_dir if cfg.log.log_dir is not None else cfg.train.load)
    resolved_path = save_resolved(cfg, out_dir.resolve() / EVAL_RESOLVED_NAME)
    print(f"deepy: resolved config written to {resolved_path}", flush=True)
    return run_deepspeed(cfg, resolved_path, entry=EVAL_ENTRY)


def show_config(files: Sequence[str], overrides: Sequence[str], config_dir: str | None) -> int:
    cfg = resolve(files, overrides, config_dir, need_vocab=False)
    print(format_config_table(cfg))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    own, overrides = split_argv(sys.argv[1:] if argv is None else argv)
    pulled, overrides = pull_short_options(overrides)
    own += pulled
    parser = build_parser()
    args = parser.parse_args(own)
    if args.command == "generate":
        overrides = generate_short_forms(args.input_file, args.output_file) + overrides
    elif args.input_file is not None or args.output_file is not None:
        parser.error("-i and -o apply to the generate command only")
    command = {"train": train, "show-config": show_config, "generate": generate, "eval": evaluate}[args.command]
    try:
        return command(args.configs, overrides, args.config_dir)
    except ConfigError as err:
        print(f"deepy: error: {err}", file=sys.stderr)
        return 2
    except LaunchError as err:
        print(f"deepy: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""deepy: resolve a config from YAML files and launch the ranks with DeepSpeed's own launcher.

    deepy.py train       [-d DIR] a.yml b.yml ... [--key value ...]
    deepy.py show-config [-d DIR] a.yml b.yml ... [--key value ...]
    deepy.py generate    [-d DIR] a.yml ... [-i PROMPTS] [-o SAMPLES.jsonl] [--key value ...]
    deepy.py eval        [-d DIR] a.yml ... --eval_tasks piqa arc_easy perplexity [--key value ...]
    deepy.py plan        [-d DIR] a.yml ... [--accelerator A100-40GB] [--mfu 0.4] [--nodes N] [--key value ...]

train merges and validates the config, writes it to {save or log_dir}/resolved_config.yml, then calls
deepspeed.launcher.runner.main(argv) so that each rank runs `python -m neox.train --config <that file>`.
Ranks get OMP_NUM_THREADS=1 unless it is already set: through the environment on the local node (and with
--no_ssh), through a DeepSpeed env file (DS_ENV_FILE) for pdsh/openmpi/mvapich/slurm launches.
For multi-node runs the run directory must be on a filesystem every node sees.
While train runs, SIGTERM/SIGUSR1 ask every rank to checkpoint and stop (exit code preempt_exit_code; see
neox/train/preemption.py), and a failed job is reported rank by rank from {log_dir}/ranks (neox/train/rank_log.py).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from neox.config import ConfigError, NeoXConfig, load_config, save_resolved
from neox.config.deepspeed import check_device_support
from neox.config.derive import detect_local_gpus, resolve_hosts
from neox.config.load import resolve_paths
from neox.config.originals import original_config_files
from neox.config.resolved import RESOLVED_NAME
from neox.config.show import format_config_table
from neox.config.validate import annotate, require_for_training
from neox.train import rank_log
from neox.train.preemption import StopForwarder, stop_request_path

from launcher import preflight
from launcher.pdsh_ssh import PdshSsh, SshCheckError, prepare_pdsh_ssh

COMMANDS = ("train", "show-config", "generate", "eval", "plan")
# gpt-neox's form names the script instead: `./deepy.py train.py -d configs 125M.yml local_setup.yml`.
GPT_NEOX_SCRIPTS = {"train.py": "train", "eval.py": "eval", "evaluate.py": "eval", "generate.py": "generate"}
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
# neox.entrypoint.INPUT_ERROR_EXIT, not imported: it imports torch, which starts a thread (see train()).
RANK_INPUT_ERROR_EXIT = 2
# What remote ranks need from the launching shell and would not get from a bare ssh login: the network interface
# gloo/NCCL bind to, and the venv's bin first on PATH (as activation does; ninja for DeepSpeed's JIT ops lives there).
FORWARDED_ENV_PREFIXES = ("GLOO_", "NCCL_", "TP_SOCKET_IFNAME", "TORCH_DISTRIBUTED_DEBUG")
# Launchers that start the ranks themselves (mpirun, srun) rather than through deepspeed.launcher.launch, which is
# what hands pdsh and local ranks MASTER_ADDR/MASTER_PORT: theirs come from the env file.
DIRECT_RANK_LAUNCHERS = ("openmpi", "slurm")
# DeepSpeed's SlurmRunner starts `python -u SCRIPT` and drops --module, so slurm ranks run modules through this script.
MODULE_RUNNER = Path(__file__).resolve().parent / "run_module.py"


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
    parser.add_argument("command", type=command_name, choices=COMMANDS,
                        help="train: launch training; show-config: print the config; generate: sample from the "
                        "checkpoint at 'load'; plan: per-rank memory, batch and step time of a run, before launching "
                        "it. gpt-neox's script names (train.py, eval.py, evaluate.py, generate.py) mean the same.")
    parser.add_argument("-d", "--conf_dir", dest="config_dir", help="folder the config file names are relative to")
    parser.add_argument("configs", nargs="+", metavar="CONFIG.yml", help="YAML files, merged in order")
    parser.add_argument("-i", dest="input_file", metavar="PROMPTS",
                        help="generate: prompts file (text_gen_type input-file, sample_input_file)")
    parser.add_argument("-o", dest="output_file", metavar="SAMPLES.jsonl", help="generate: sample_output_file")
    parser.add_argument("-H", dest="hostfile", metavar="HOSTFILE", help="hostfile (gpt-neox's -H; = --hostfile)")
    return parser


def command_name(token: str) -> str:
    """The command of `deepy COMMAND`; gpt-neox's script argument (train.py, path/to/generate.py) names it too."""
    return GPT_NEOX_SCRIPTS.get(os.path.basename(token), token)


_vocab_sizes: dict[tuple, int] = {}  # resolve() loads twice and preflight asks again: build each tokenizer once


def tokenizer_vocab_size(cfg: NeoXConfig) -> int:
    from neox.tokenizer import build_tokenizer

    data = cfg.data
    stamps = tuple(os.stat(f).st_mtime_ns if f and os.path.isfile(f) else None
                   for f in (data.vocab_file, data.merge_file))
    key = (data.tokenizer_type, data.vocab_file, data.merge_file, stamps)
    if key not in _vocab_sizes:
        _vocab_sizes[key] = build_tokenizer(data.tokenizer_type, data.vocab_file, data.merge_file).vocab_size
    return _vocab_sizes[key]


def check_launch_size(cfg: NeoXConfig, local_gpus: int) -> None:
    """A launch on this machine alone starts no more ranks than it has GPUs, and exactly global_num_gpus (gpt-neox's
    job size) when that names the job. The config was derived without counting GPUs when num_gpus is set, and
    DeepSpeed's runner would hand the extra ranks device ordinals that do not exist."""
    launch = cfg.launch
    if launch.hostfile is None and local_gpus:
        resolve_hosts(launch, local_gpus)  # "'num_gpus' is N but this machine has M GPU(s)"
    if launch.global_num_gpus is None or launch.hostfile is not None or launch.num_gpus is not None:
        return  # derive.py already made hostfile/num_gpus agree with it
    if local_gpus and local_gpus != launch.global_num_gpus:
        raise ConfigError(f"'global_num_gpus' is {launch.global_num_gpus} but this machine has {local_gpus} GPU(s) "
                          "and no 'hostfile' names more nodes: set 'num_gpus' / 'hostfile', or drop global_num_gpus")


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
            raise annotate(ConfigError(f"cannot build the tokenizer ('tokenizer_type', 'vocab_file', 'merge_file'): "
                                       f"{err}"), cfg) from None
        return cfg  # show-config still shows everything else; padded_vocab_size stays unresolved
    cfg = load_config(files, overrides, config_dir=config_dir, vocab_size=vocab_size)
    if cfg.train.load:
        from neox.checkpoint.vocab_padding import adopt_checkpoint_padding  # deferred: imports torch

        note = adopt_checkpoint_padding(cfg, vocab_size)
        if note:
            print(f"deepy: {note}", file=sys.stderr, flush=True)
    return cfg


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
    launcher_args = launch.launcher_args or ""
    if launch.launcher == "slurm":  # gpt-neox hands comment / account to srun
        extra = [f"--{name}={value}" for name, value in (("comment", launch.comment), ("account", launch.account))
                 if value]
        launcher_args = " ".join([launcher_args, *map(shlex.quote, extra)]).strip()
    if launcher_args:
        # One token: as a separate argument, a single flag such as '--allow-run-as-root' reads as a runner option.
        argv.append(f"--launcher_args={launcher_args}")
    if launch.no_ssh:
        argv += ["--no_ssh", "--node_rank", str(launch.node_rank)]
    if launch.no_ssh_check:
        argv.append("--no_ssh_check")
    if launch.force_multi:
        argv.append("--force_multi")
    # Our entrypoints read LOCAL_RANK from the environment DeepSpeed sets; no --local_rank argument.
    argv.append("--no_local_rank")
    if not entry.endswith(".py"):
        if launch.launcher == "slurm":
            return argv + [str(MODULE_RUNNER), entry, "--config", str(resolved_path)]
        argv.append("--module")
    return argv + [entry, "--config", str(resolved_path)]


def rendezvous_env(cfg: NeoXConfig) -> dict[str, str]:
    """MASTER_PORT (and MASTER_ADDR when the config names it) for ranks started by mpirun or srun.
    Without master_addr they find rank 0 themselves (neox/parallel/launcher_env.py)."""
    launch = cfg.launch
    if launch.launcher not in DIRECT_RANK_LAUNCHERS:
        return {}
    env = {"MASTER_PORT": str(launch.master_port)}
    if launch.master_addr is not None:
        env["MASTER_ADDR"] = launch.master_addr
    return env


def rank_env(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    return {key: environ.get(key, default) for key, default in RANK_ENV_DEFAULTS.items()}


def remote_env(cfg: NeoXConfig, environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """Env file entries for ranks on other nodes (srun exports the whole environment; local ranks inherit it)."""
    launch = cfg.launch
    if launch.hostfile is None or launch.no_ssh or launch.launcher == "slurm":
        return {}
    env = {key: value for key, value in environ.items() if key.startswith(FORWARDED_ENV_PREFIXES)}
    if sys.prefix != sys.base_prefix:
        bin_dir = str(Path(sys.executable).parent)
        path = environ.get("PATH", os.defpath)
        env["VIRTUAL_ENV"] = sys.prefix
        env["PATH"] = path if path.split(os.pathsep)[0] == bin_dir else f"{bin_dir}{os.pathsep}{path}"
    return env


def pdsh_ssh_setup(cfg: NeoXConfig) -> PdshSsh:
    try:
        return prepare_pdsh_ssh(cfg.launch, os.environ)
    except SshCheckError as err:
        raise LaunchError(str(err)) from None


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
    cfg: NeoXConfig, resolved_path: Path, *, entry: str = TRAIN_ENTRY, local_gpus: int | None = None,
    stop: StopForwarder | None = None,
) -> int:
    """Launch every rank through deepspeed.launcher.runner.main; return the exit code of the job.
    With stop (training): preemption signals become a stop request to the ranks, and a failed job names the
    rank that died and shows its last lines."""
    local_gpus = detect_local_gpus() if local_gpus is None else local_gpus
    check_launch_size(cfg, local_gpus)
    argv = runner_argv(cfg, resolved_path, entry=entry, local_gpus=local_gpus)
    ssh = pdsh_ssh_setup(cfg)
    argv = ssh.runner_args + argv
    env = rank_env(os.environ)
    env_file = write_env_file(resolved_path.parent, {**env, **rendezvous_env(cfg), **remote_env(cfg, os.environ)})
    with _environ({**env, **ssh.env, "DS_ENV_FILE": str(env_file.resolve())}):
        from deepspeed.launcher import runner

        if runner.DEEPSPEED_ENVIRONMENT_NAME != os.environ["DS_ENV_FILE"]:
            runner = importlib.reload(runner)  # it reads DS_ENV_FILE once, at import
        if stop is None:
            return _call_runner(runner, argv)
        stop.aim(stop_request_path(resolved_path.parent))
        started = time.time()
        code = _call_runner(runner, argv)
    # 2: a rank refused its input and has said what to fix in one paragraph already.
    if code not in (0, RANK_INPUT_ERROR_EXIT, cfg.train.preempt_exit_code):
        ranks = rank_log.ranks_dir(cfg.log.log_dir, resolved_path.parent)
        print(rank_log.failure_report(ranks, cfg.derived.world_size, started, code), file=sys.stderr, flush=True)
    return code


def _call_runner(runner, argv: list[str]) -> int:
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
    # First of all: torch starts a thread when imported, and every thread must inherit the blocked signals.
    with StopForwarder() as stop:
        return _train(files, overrides, config_dir, stop)


def _train(files: Sequence[str], overrides: Sequence[str], config_dir: str | None, stop: StopForwarder) -> int:
    cfg = resolve(files, overrides, config_dir, need_vocab=True)
    try:
        launch = cfg.launch
        if launch.hostfile is None or launch.no_ssh:
            check_device_support(cfg, cuda_available=detect_local_gpus() > 0)
    except ConfigError as err:
        raise annotate(err, cfg) from None
    preflight.before_train(cfg, tokenizer_vocab_size(cfg))
    if cfg.train.config_files is None:  # as gpt-neox: every checkpoint keeps the YAML files as written
        cfg.train.config_files = original_config_files(resolve_paths(files, config_dir))
        cfg.provenance["config_files"] = "derived: the YAML files given to deepy train"
    resolved_path = save_resolved(cfg, run_dir_of(cfg) / RESOLVED_NAME)
    print(f"deepy: resolved config written to {resolved_path}", flush=True)
    return run_deepspeed(cfg, resolved_path, stop=stop)


def pull_short_options(overrides: Sequence[str], options: Sequence[str] = ("-i", "-o", "-H")) -> tuple[list[str], list[str]]:
    """Take `-i FILE` / `-o FILE` / `-H FILE` typed after the first --key value out of the overrides."""
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
    preflight.before_generate(cfg)
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
    preflight.before_eval(cfg)
    out_dir = Path(cfg.log.log_dir if cfg.log.log_dir is not None else cfg.train.load)
    resolved_path = save_resolved(cfg, out_dir.resolve() / EVAL_RESOLVED_NAME)
    print(f"deepy: resolved config written to {resolved_path}", flush=True)
    return run_deepspeed(cfg, resolved_path, entry=EVAL_ENTRY)


def show_config(files: Sequence[str], overrides: Sequence[str], config_dir: str | None) -> int:
    cfg = resolve(files, overrides, config_dir, need_vocab=False)
    print(format_config_table(cfg))
    return 0


def plan(files: Sequence[str], overrides: Sequence[str], config_dir: str | None) -> int:
    """Print per-rank memory, batch arithmetic, FLOPs and step time of the run (neox/plan), launching nothing."""
    from neox.plan.cli import run_plan

    return run_plan(files, overrides, config_dir,
                    lambda f, o, d: resolve(f, o, d, need_vocab=False))


def main(argv: Sequence[str] | None = None) -> int:
    own, overrides = split_argv(sys.argv[1:] if argv is None else argv)
    pulled, overrides = pull_short_options(overrides)
    own += pulled
    parser = build_parser()
    args = parser.parse_args(own)
    if args.hostfile is not None:
        overrides = ["--hostfile", args.hostfile] + overrides
    if args.command == "generate":
        overrides = generate_short_forms(args.input_file, args.output_file) + overrides
    elif args.input_file is not None or args.output_file is not None:
        parser.error("-i and -o apply to the generate command only")
    command = {"train": train, "show-config": show_config, "generate": generate, "eval": evaluate,
               "plan": plan}[args.command]
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

"""`launcher: openmpi` (a real mpirun on this host) and `launcher: slurm` (a recording srun on PATH that starts the
ranks here, as srun would, with SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS) train the same losses as a local launch."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.deepy import MODULE_RUNNER, TRAIN_ENTRY
from tests.conftest import REPO_ROOT
from tests.e2e.train_helpers import (
    CPU_LAUNCH_CONFIG, DEEPY, LAUNCH_TIMEOUT_S, Launch, free_port, preprocess_kjv, write_config,
)

pytestmark = pytest.mark.slow
STEPS = 10
SRUN_ARGS = "--kill-on-bad-exit=1 --cpu-bind=none"

# srun's options before the command, the ones DeepSpeed's SlurmRunner and SRUN_ARGS use; '--x=y' is one token.
FAKE_SRUN = r'''#!{python}
import json, os, subprocess, sys
argv = sys.argv[1:]
with_value = {{"-n", "--ntasks", "-N", "--nodes", "--gpus-per-node", "--comment", "--nodelist", "-w"}}
options, i = {{}}, 0
while i < len(argv) and argv[i].startswith("-"):
    if argv[i] in with_value:
        options[argv[i]] = argv[i + 1]
        i += 2
    else:
        key, _, value = argv[i].partition("=")
        options[key] = value
        i += 1
command, ntasks = argv[i:], int(options.get("-n", options.get("--ntasks", "1")))
env = dict(os.environ)
exports = options.get("--export", "ALL").split(",")
assert exports[0] == "ALL", exports
env.update(item.split("=", 1) for item in exports[1:])
with open(os.environ["FAKE_SRUN_RECORD"], "w") as out:
    json.dump({{"argv": ["srun", *argv], "env": dict(os.environ)}}, out)
ranks = [subprocess.Popen(command, env={{**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r),
                                        "SLURM_NTASKS": str(ntasks), "SLURM_NODEID": "0", "SLURM_STEP_ID": "0",
                                        "SLURM_STEP_NODELIST": "localhost"}}) for r in range(ntasks)]
codes = [rank.wait() for rank in ranks]
sys.exit(next((c for c in codes if c), 0))
'''


@pytest.fixture(scope="module")
def model_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mpi_slurm")
    data = preprocess_kjv(root)
    return write_config(root / "model.yml", data, train_iters=STEPS, lr_decay_iters=STEPS, eval_interval=100)


@pytest.fixture(scope="module")
def local_losses(model_config, tmp_path_factory) -> dict[int, float]:
    launch = run_deepy(tmp_path_factory.mktemp("local"), model_config, {"num_gpus": 2})
    losses = launch.losses()
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def clean_env(**extra: str) -> dict[str, str]:
    """The test runner's environment without any rank identity a launcher would set."""
    prefixes = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "OMPI_COMM_WORLD", "OMPI_ALLOW_RUN_AS_ROOT", "SLURM_",
                "PMIX_RANK")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(prefixes)}, **extra}


def run_deepy(run_dir: Path, model_config: Path, overrides: dict, env: dict[str, str] | None = None) -> Launch:
    overrides = {"zero_optimization.stage": 0, "master_port": free_port(), "save": str(run_dir / "ckpt"),
                 "log_dir": str(run_dir / "logs"), **overrides}
    argv = [sys.executable, str(DEEPY), "train", str(model_config), str(CPU_LAUNCH_CONFIG)]
    for key, value in overrides.items():  # --key=value: launcher_args itself starts with '--'
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        argv.append(f"--{key}={text}")
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                            env=env or clean_env())
    launch = Launch(run_dir, result, time.perf_counter() - start)
    assert result.returncode == 0, f"deepy train failed ({result.returncode}):\n{launch.output[-6000:]}"
    return launch


def one_host_launch(tmp_path: Path, launcher: str, **extra) -> dict:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    # force_multi: one host still goes through the multi-node runner; master_addr spares the runner an ssh to
    # the host for `hostname -I`, which no_ssh_check skips too.
    return {"hostfile": str(hostfile), "num_gpus": None, "launcher": launcher, "force_multi": True,
            "no_ssh_check": True, "master_addr": "127.0.0.1", "master_port": free_port(), **extra}


def test_openmpi_launch_trains_like_a_local_launch(model_config, local_losses, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed: tools/setup_system.sh installs openmpi-bin (it needs root and apt-get)")
    # mpirun refuses root without it (or OMPI_ALLOW_RUN_AS_ROOT=1 + OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, which
    # test_launcher_env.py uses); CI and containers run as root. A lone flag is also the launcher_args case that
    # DeepSpeed's argument parser would take for one of its own options.
    overrides = one_host_launch(tmp_path, "openmpi", launcher_args="--allow-run-as-root")
    launch = run_deepy(tmp_path, model_config, overrides)
    command = next(line.split("cmd = ", 1)[1] for line in launch.output.splitlines() if "cmd = " in line)
    argv = shlex.split(command)
    assert argv[:3] == ["mpirun", "-n", "2"] and "--allow-run-as-root" in argv
    resolved = str(launch.save_dir / "resolved_config.yml")
    # --module reaches mpirun as `python -u -m`, and no --local_rank argument is appended.
    assert argv[-6:] == [sys.executable, "-u", "-m", TRAIN_ENTRY, "--config", resolved]
    rendezvous = {"OMP_NUM_THREADS=1", f"MASTER_PORT={overrides['master_port']}", "MASTER_ADDR=127.0.0.1"}
    assert rendezvous <= exported(argv, "-x")
    assert launch.losses() == local_losses


def test_slurm_launch_issues_deepspeeds_srun_command_and_trains(model_config, local_losses, tmp_path):
    from deepspeed.accelerator import get_accelerator
    from deepspeed.launcher import runner as ds_runner
    from deepspeed.launcher.multinode_runner import SlurmRunner

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"srun": FAKE_SRUN.format(python=sys.executable), "sinfo": "#!/bin/sh\nexit 0\n"}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "srun.json"
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SRUN_RECORD=str(record))
    overrides = one_host_launch(tmp_path, "slurm", launcher_args=SRUN_ARGS)
    launch = run_deepy(tmp_path, model_config, overrides, env)
    issued = json.loads(record.read_text())

    # What DeepSpeed's own runner issues for these resources and this program, given the same environment.
    resolved = str(launch.save_dir / "resolved_config.yml")
    args = ds_runner.parse_args(["--hostfile", str(tmp_path / "hostfile"), "--launcher", "slurm",
                                 "--launcher_args", SRUN_ARGS, "--master_addr", "127.0.0.1", "--force_multi",
                                 "--no_ssh_check", str(MODULE_RUNNER), TRAIN_ENTRY, "--config", resolved])
    pool = ds_runner.fetch_hostfile(args.hostfile)
    active = ds_runner.parse_inclusion_exclusion(pool, args.include, args.exclude)
    expected_runner = SlurmRunner(args, ds_runner.encode_world_info(active), pool)
    exported_prefixes = ds_runner.EXPORT_ENVS + get_accelerator().export_envs()
    for key, value in issued["env"].items():
        if key.startswith(tuple(exported_prefixes)):
            expected_runner.add_export(key, value)
    # deepy's env file: the rank defaults, then the rendezvous mpirun/srun ranks need.
    env_file = {"OMP_NUM_THREADS": "1", "MASTER_PORT": str(overrides["master_port"]), "MASTER_ADDR": "127.0.0.1"}
    for key, value in env_file.items():
        expected_runner.add_export(key, value)
    expected = expected_runner.get_cmd(dict(issued["env"]), active)
    assert issued["argv"] == expected and "--local_rank" not in " ".join(expected)
    assert expected[:3] == ["srun", "-n", "2"] and expected[3:5] == shlex.split(SRUN_ARGS)
    assert launch.losses() == local_losses


def exported(argv: list[str], flag: str) -> set[str]:
    return {argv[i + 1] for i, token in enumerate(argv[:-1]) if token == flag}



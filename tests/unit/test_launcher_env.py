"""Rank identity under torch/DeepSpeed, mpirun and srun variables; what deepy hands mpirun/srun ranks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.deepy import MODULE_RUNNER, rendezvous_env, runner_argv
from neox.config import load_config
from neox.parallel.launcher_env import LauncherEnvError, first_slurm_host, torch_rank_env
from tests.conftest import REPO_ROOT

MODEL = "num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nseq_length: 32\ntrain_micro_batch_size_per_gpu: 2\n"


def test_torch_variables_pass_through():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "31000",
           "OMPI_COMM_WORLD_RANK": "0", "SLURM_PROCID": "0"}
    assert torch_rank_env(env) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.1.1.1",
                                   "MASTER_PORT": "31000"}


def test_process_started_by_hand_is_a_world_of_one():
    assert torch_rank_env({}) == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


def test_openmpi_variables_win_over_the_slurm_allocation_around_mpirun():
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "MASTER_ADDR": "node7", "MASTER_PORT": "29611", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
           "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0"}
    assert torch_rank_env(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
                                   "MASTER_PORT": "29611"}


def test_slurm_ranks_find_rank0_on_the_first_node_of_the_step():
    env = {"SLURM_PROCID": "6", "SLURM_NTASKS": "16", "SLURM_LOCALID": "2", "SLURM_STEP_ID": "3",
           "SLURM_STEP_NODELIST": "gpu[03-06,09],login1", "SLURM_JOB_NODELIST": "other[1-9]"}
    assert torch_rank_env(env) == {"RANK": "6", "WORLD_SIZE": "16", "LOCAL_RANK": "2", "MASTER_ADDR": "gpu03",
                                   "MASTER_PORT": "29500"}
    assert torch_rank_env({**env, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "1234"})["MASTER_ADDR"] == "10.0.0.9"


def test_a_batch_script_is_one_process_whatever_its_allocation():
    batch = {"SLURM_JOB_ID": "200505", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0",
             "SLURM_JOB_NODELIST": "gnode[10,20]"}
    assert torch_rank_env(batch) == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("a,b", "a"), ("gpu[03-05,09],cpu1", "gpu03"), ("gpu[7,2]", "gpu7"),
    ("rack[1-2]-n[07-08]", "rack1-n07"), ("10.0.0.[4-5]", "10.0.0.4"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.parametrize("env, message", [
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0"}, "SLURM_NTASKS is not"),
    ({"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, "not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "outside the world"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"}, "set 'master_addr'"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
      "SLURM_STEP_NODELIST": "n[1-2"}, "unclosed"),
])
def test_unusable_launcher_variables_name_what_is_wrong(env, message):
    with pytest.raises(LauncherEnvError, match=message):
        torch_rank_env(env)


def test_mpirun_ranks_without_master_addr_ask_rank0_over_mpi(tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed: tools/setup_system.sh installs openmpi-bin (it needs root and apt-get)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    # A file per rank: mpirun forwards the ranks' stdout without keeping their lines apart.
    program = ("import json, os, sys; from pathlib import Path; from neox.parallel.launcher_env import torch_rank_env; "
               "Path(sys.argv[1], os.environ['OMPI_COMM_WORLD_RANK'] + '.json')"
               ".write_text(json.dumps(torch_rank_env(os.environ)))")
    result = subprocess.run(["mpirun", "-n", "2", sys.executable, "-c", program, str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    ranks = sorted((json.loads(p.read_text()) for p in tmp_path.glob("*.json")), key=lambda r: r["RANK"])
    own = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    assert [r["RANK"] for r in ranks] == ["0", "1"] and [r["LOCAL_RANK"] for r in ranks] == ["0", "1"]
    assert {r["WORLD_SIZE"] for r in ranks} == {"2"} and {r["MASTER_PORT"] for r in ranks} == {"29500"}
    assert {r["MASTER_ADDR"] for r in ranks} == {own[0] if own else "127.0.0.1"}


def test_run_module_runs_a_module_like_python_dash_m(tmp_path):
    (tmp_path / "echo_argv.py").write_text(
        "import json, os, sys\nprint(json.dumps([__name__, sys.argv[1:], sys.path[0] == os.getcwd()]))\n")
    result = subprocess.run([sys.executable, str(MODULE_RUNNER), "echo_argv", "a", "--config", "c.yml"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["__main__", ["a", "--config", "c.yml"], True]
    missing = subprocess.run([sys.executable, str(MODULE_RUNNER)], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "usage: run_module.py MODULE" in missing.stderr


def config(tmp_path: Path, text: str):
    path = tmp_path / "c.yml"
    path.write_text(MODEL + text)
    return load_config([path], local_gpus=0)


def test_slurm_ranks_start_the_module_through_run_module_and_mpirun_ranks_with_dash_m(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=2\nb slots=2\n")
    slurm = config(tmp_path, f"hostfile: {hosts}\nlauncher: slurm\nmaster_addr: 10.0.0.1\nmaster_port: 31000\n")
    argv = runner_argv(slurm, Path("r.yml"))
    assert "--module" not in argv
    assert argv[-5:] == ["--no_local_rank", str(MODULE_RUNNER), "neox.train", "--config", "r.yml"]
    assert rendezvous_env(slurm) == {"MASTER_PORT": "31000", "MASTER_ADDR": "10.0.0.1"}
    openmpi = config(tmp_path, f"hostfile: {hosts}\nlauncher: openmpi\n")
    assert runner_argv(openmpi, Path("r.yml"))[-5:] == ["--no_local_rank", "--module", "neox.train", "--config",
                                                        "r.yml"]
    assert rendezvous_env(openmpi) == {"MASTER_PORT": "29500"}
    # pdsh ranks start through deepspeed.launcher.launch, which sets both itself.
    assert rendezvous_env(config(tmp_path, f"hostfile: {hosts}\n")) == {}


def test_a_single_launcher_flag_reaches_deepspeed_as_launcher_args(tmp_path):
    from deepspeed.launcher.runner import parse_args

    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=2\n")
    cfg = config(tmp_path, f"hostfile: {hosts}\nlauncher: openmpi\nlauncher_args: '--allow-run-as-root'\n")
    args = parse_args(runner_argv(cfg, Path("r.yml")))
    assert (args.launcher, args.launcher_args, args.user_script, args.user_args) == (
        "openmpi", "--allow-run-as-root", "neox.train", ["--config", "r.yml"])

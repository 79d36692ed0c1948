"""`deepy train` with a hostfile of two hosts (two network namespaces on this machine) trains across them.

(a) launcher pdsh over a real sshd per host, deepy started on host A as a user would; (b) no_ssh, one deepy per
host with node_rank 0 and 1. One rank per host (world size 2, ZeRO-2 of configs/cpu.yml) must give the per-step
lm_loss of the same config run as 2 ranks on one host. Both hosts see this filesystem, as cluster nodes share one.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from neox.config.resolved import load_resolved
from tests.conftest import REPO_ROOT
from tests.e2e.netns_hosts import INTERFACE, NAME_PREFIX, VETH_PREFIX, Host, NetnsUnavailable, remove_stale, two_hosts
from tests.e2e.ssh_hosts import ssh_servers
from tests.e2e.train_helpers import (CPU_LAUNCH_CONFIG, DEEPY, LAUNCH_TIMEOUT_S, Launch, deepy_train, free_port,
                                     max_relative_diff, preprocess_kjv)

pytestmark = pytest.mark.slow

TINY_CONFIG = REPO_ROOT / "configs" / "tiny.yml"
TRAIN_ITERS = 10
LOSS_RTOL = 1e-5
# What a short test run changes in configs/tiny.yml: the char-level KJV data, 10 steps, a loss at every step.
RUN_SETTINGS = {
    "tokenizer_type": "CharLevelTokenizer",
    "split": "949,50,1",
    "train_iters": TRAIN_ITERS,
    "log_interval": 1,
    "eval_interval": 1000,
    "eval_iters": 0,
    "save_interval": 1000,
    "peak_flops": 1.0e11,  # skip the matmul peak probe; MFU only needs some denominator
}


@pytest.fixture(scope="module")
def hosts():
    with contextlib.ExitStack() as stack:
        try:
            pair = stack.enter_context(two_hosts())
        except NetnsUnavailable as err:
            pytest.skip(f"two-host tests need network namespaces: {err}")
        yield pair


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multinode")


@pytest.fixture(scope="module")
def ssh_config(hosts, work) -> Path:
    with ssh_servers(hosts, work / "ssh") as config:
        yield config


@pytest.fixture(scope="module")
def model_config(work) -> Path:
    """configs/tiny.yml with RUN_SETTINGS and the data path, as one file deepy takes before configs/cpu.yml."""
    data_path = preprocess_kjv(work / "data")
    config = {**yaml.safe_load(TINY_CONFIG.read_text()), **RUN_SETTINGS, "data_path": str(data_path)}
    path = work / "tiny_kjv.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def hostfile(hosts, work) -> Path:
    path = work / "hostfile"
    path.write_text("".join(f"{host.address} slots=1\n" for host in hosts))
    return path


@pytest.fixture(scope="module")
def single_host_losses(work, model_config) -> dict[int, float]:
    launch = deepy_train(work / "single_host", model_config, num_gpus=2, zero_stage=2)
    losses = launch.losses()
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    return losses


def deepy_argv(host: Host, run_dir: Path, model_config: Path, **overrides) -> list[str]:
    """`deepy.py train MODEL configs/cpu.yml --key value ...` run on host, with a venv python that is not activated."""
    argv = [sys.executable, str(DEEPY), "train", str(model_config), str(CPU_LAUNCH_CONFIG)]
    for key, value in {"save": run_dir / "ckpt", "log_dir": run_dir / "logs", **overrides}.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return host.argv(argv)


def launch_env(**extra: str) -> dict[str, str]:
    """The user's shell: no rank variables; gloo binds to the cluster interface (hostnames resolve to loopback)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    return {**env, "GLOO_SOCKET_IFNAME": INTERFACE, **extra}


def run_all(commands: list[list[str]], cwd: Path, env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """Start every command at once (one per host), wait for all; a hang is killed and reported with its output."""
    logs = [cwd / f"launch{index}.log" for index in range(len(commands))]
    processes = []
    for command, log in zip(commands, logs):
        with log.open("w") as out:
            processes.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    for process in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(other.pid, 9)
            for other in processes:
                other.wait()
            raise AssertionError("launch hung:\n" + "\n".join(log.read_text()[-3000:] for log in logs))
    return [subprocess.CompletedProcess(command, process.returncode, log.read_text(), "")
            for command, process, log in zip(commands, processes, logs)]


def check_ran_across(run_dir: Path, hostfile: Path) -> None:
    cfg = load_resolved(run_dir / "ckpt" / "resolved_config.yml")
    assert (cfg.derived.world_size, cfg.derived.node_count, cfg.launch.hostfile) == (2, 2, str(hostfile))


def test_pdsh_launch_over_ssh_matches_single_host(hosts, ssh_config, hostfile, model_config, single_host_losses, work):
    host_a, host_b = hosts
    run_dir = work / "pdsh"
    run_dir.mkdir()
    # As a user types it on host A: hostfile, one rank per host, rank 0 on A, ssh options in the config.
    command = deepy_argv(host_a, run_dir, model_config, hostfile=hostfile, num_gpus=1, launcher="pdsh",
                         master_addr=host_a.address, master_port=free_port(), ssh_args=f"-F {ssh_config}")
    start = time.perf_counter()
    (result,) = run_all([command], run_dir, launch_env())
    launch = Launch(run_dir, result, time.perf_counter() - start)
    assert result.returncode == 0, launch.output[-6000:]
    check_ran_across(run_dir, hostfile)
    # pdsh prefixes each host's output with its address: both hosts ran a rank and finished it.
    for host in hosts:
        assert f"{host.address}: " in launch.output and f"{host.address}: [" in launch.output
    assert sum("exits successfully" in line for line in launch.output.splitlines()) == 2
    # Host B only has GLOO_SOCKET_IFNAME and the venv's PATH through the env file deepy ships.
    env_file = (run_dir / "ckpt" / "deepspeed_env").read_text().splitlines()
    assert f"GLOO_SOCKET_IFNAME={INTERFACE}" in env_file
    assert f"PATH={Path(sys.executable).parent}{os.pathsep}" in "\n".join(env_file)
    assert "Accepted publickey" in (work / "ssh" / "sshd_1.log").read_text()
    diff = max_relative_diff(single_host_losses, launch.losses())
    print(f"pdsh two-host run: {launch.seconds:.1f} s, max relative lm_loss difference {diff:.3g}")
    assert diff <= LOSS_RTOL


PROBE_SCRIPT = """
import json, os, sys
from launcher.pdsh_ssh import prepare_pdsh_ssh
from neox.config.launch import LaunchConfig
launch = LaunchConfig(hostfile=sys.argv[1], ssh_args=sys.argv[2], num_gpus=1)
setup = prepare_pdsh_ssh(launch, os.environ)
print(json.dumps({"runner_args": setup.runner_args, "env": setup.env}))
"""


def test_pdsh_finds_master_addr_with_ssh_args(hosts, ssh_config, hostfile):
    """Without master_addr, deepy asks the first host for its address over ssh with ssh_args (DeepSpeed's own probe
    runs a bare ssh, which cannot log in here); pdsh gets the options after any PDSH_SSH_ARGS_APPEND already set."""
    host_a, _ = hosts
    command = host_a.argv([sys.executable, "-c", PROBE_SCRIPT, str(hostfile), f"-F {ssh_config}"])
    result = subprocess.run(command, cwd=REPO_ROOT, env=launch_env(PDSH_SSH_ARGS_APPEND="-o LogLevel=ERROR"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    setup = json.loads(result.stdout)
    assert setup["runner_args"] == ["--no_ssh_check", "--master_addr", host_a.address]
    assert setup["env"] == {"PDSH_SSH_ARGS_APPEND": f"-o LogLevel=ERROR -F {ssh_config}"}


def test_unreachable_host_is_a_one_paragraph_error(hosts, ssh_config, hostfile, model_config, work):
    host_a, _ = hosts
    run_dir = work / "pdsh_no_key"
    run_dir.mkdir()
    wrong = work / "ssh" / "ssh_config_without_key"  # same known hosts, a key the hosts do not accept
    wrong.write_text(ssh_config.read_text().replace("client_ed25519", "host0_ed25519"))
    command = deepy_argv(host_a, run_dir, model_config, hostfile=hostfile, num_gpus=1, launcher="pdsh",
                         master_addr=host_a.address, ssh_args=f"-F {wrong}")
    result = subprocess.run(command, cwd=run_dir, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"host {host_a.address} (first in the 'hostfile') is not reachable" in result.stderr
    assert "Permission denied" in result.stderr and "ssh_args" in result.stderr


def test_no_ssh_one_launch_per_host_matches_single_host(hosts, hostfile, model_config, single_host_losses, work):
    run_dir = work / "no_ssh"
    run_dir.mkdir()
    port = free_port()
    commands = [deepy_argv(host, run_dir, model_config, hostfile=hostfile, num_gpus=1, no_ssh=True, node_rank=rank,
                           master_addr=hosts[0].address, master_port=port) for rank, host in enumerate(hosts)]
    start = time.perf_counter()
    results = run_all(commands, run_dir, launch_env())
    seconds = time.perf_counter() - start
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"node_rank {rank}:\n{result.stdout[-6000:]}"
        assert "exits successfully" in result.stdout
    check_ran_across(run_dir, hostfile)
    launch = Launch(run_dir, results[0], seconds)
    diff = max_relative_diff(single_host_losses, launch.losses())
    print(f"no_ssh two-host run: {seconds:.1f} s, max relative lm_loss difference {diff:.3g}")
    assert diff <= LOSS_RTOL


def test_namespaces_of_a_killed_run_are_removed():
    if os.geteuid() != 0:
        pytest.skip("two-host tests need network namespaces: creating them needs root (CAP_NET_ADMIN)")
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer runs: the "killed earlier run"
    stale = Host(f"{NAME_PREFIX}{gone.pid}-a", "")
    veths = (f"{VETH_PREFIX}{gone.pid}a", f"{VETH_PREFIX}{gone.pid}b")
    subprocess.run(["ip", "netns", "add", stale.netns], check=True)
    subprocess.run(["ip", "link", "add", veths[0], "type", "veth", "peer", "name", veths[1]], check=True)
    left_running = subprocess.Popen(stale.argv(["sleep", "600"]))
    try:
        deadline = time.monotonic() + 10
        while left_running.pid not in stale.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left_running.pid in stale.pids()
        assert set(remove_stale()) >= {stale.netns, *veths}
        assert left_running.wait(timeout=10) != 0
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        assert stale.netns not in names and veths[0] not in links and veths[1] not in links
    finally:
        left_running.kill()
        subprocess.run(["ip", "netns", "delete", stale.netns], capture_output=True)
        subprocess.run(["ip", "link", "delete", veths[0]], capture_output=True)

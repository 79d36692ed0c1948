"""ssh_args (launcher pdsh) and what deepy's env file hands ranks on other nodes."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from launcher.deepy import remote_env
from launcher.pdsh_ssh import PdshSsh, SshCheckError, host_addresses, prepare_pdsh_ssh, ssh_argv
from neox.config import ConfigError, load_config
from neox.config.launch import LaunchConfig
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"


def two_host_config(tmp_path: Path, *extra: str):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    return load_config(["tiny.yml", "cpu.yml", "local_setup.yml"],
                       ["--num_gpus", "1", "--hostfile", str(hostfile), *extra], config_dir=CONFIGS, local_gpus=0)


def test_ssh_args_belong_to_pdsh():
    with pytest.raises(ConfigError, match="'ssh_args' applies to launcher pdsh, not 'openmpi'.*plm_rsh_args"):
        LaunchConfig(launcher="openmpi", ssh_args="-p 2222").validate()
    with pytest.raises(ConfigError, match="'ssh_args' .* cannot be split"):
        LaunchConfig(ssh_args="-o 'ProxyCommand=ssh gw").validate()
    LaunchConfig(ssh_args="-p 2222 -i ~/.ssh/cluster").validate()


def test_user_options_come_before_ours():
    # ssh keeps the first value it sees for an option, so a user's BatchMode/ConnectTimeout wins over deepy's.
    argv = ssh_argv("-p 2222 -o 'ConnectTimeout=5'", "node-a", "hostname", "-I")
    assert argv[:5] == ["ssh", "-p", "2222", "-o", "ConnectTimeout=5"]
    assert argv[-3:] == ["node-a", "hostname", "-I"] and "BatchMode=yes" in argv


def test_without_ssh_args_deepspeed_keeps_its_own_check(tmp_path):
    cfg = two_host_config(tmp_path, "--master_addr", "10.0.0.1")
    assert prepare_pdsh_ssh(cfg.launch, {}) == PdshSsh()
    no_ssh = two_host_config(tmp_path, "--ssh_args", "-p 2222", "--no_ssh", "true", "--node_rank", "1")
    assert prepare_pdsh_ssh(no_ssh.launch, {}) == PdshSsh()


def test_known_master_and_no_check_skip_the_probe(tmp_path):
    cfg = two_host_config(tmp_path, "--master_addr", "10.0.0.1", "--no_ssh_check", "true", "--ssh_args", "-p 2222")
    setup = prepare_pdsh_ssh(cfg.launch, {"PDSH_SSH_ARGS_APPEND": " -o LogLevel=ERROR "})
    assert setup == PdshSsh(["--no_ssh_check"], {"PDSH_SSH_ARGS_APPEND": "-o LogLevel=ERROR -p 2222"})


def test_failed_probe_names_the_host_and_what_to_fix(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text("#!/bin/sh\necho 'root@node-a: Permission denied (publickey).' >&2\nexit 255\n")
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(SshCheckError, match=r"host node-a .* not reachable .*Permission denied.*fix 'ssh_args'"):
        host_addresses("-p 2222", "node-a")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SshCheckError, match="install openssh-client"):
        host_addresses("-p 2222", "node-a")


def test_remote_ranks_get_interface_and_venv(tmp_path, monkeypatch):
    environ = {"GLOO_SOCKET_IFNAME": "eth1", "NCCL_DEBUG": "INFO", "HOME": "/root", "PATH": "/usr/bin:/bin"}
    monkeypatch.setattr(sys, "prefix", "/opt/venv")
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    monkeypatch.setattr(sys, "executable", "/opt/venv/bin/python")
    env = remote_env(two_host_config(tmp_path), environ)
    assert env == {"GLOO_SOCKET_IFNAME": "eth1", "NCCL_DEBUG": "INFO", "VIRTUAL_ENV": "/opt/venv",
                   "PATH": f"/opt/venv/bin{os.pathsep}/usr/bin:/bin"}
    already_first = remote_env(two_host_config(tmp_path), {**environ, "PATH": "/opt/venv/bin:/bin"})
    assert already_first["PATH"] == "/opt/venv/bin:/bin"
    # Local ranks inherit the environment, and srun exports all of it: no entries then.
    assert remote_env(two_host_config(tmp_path, "--no_ssh", "true", "--node_rank", "0"), environ) == {}
    assert remote_env(two_host_config(tmp_path, "--launcher", "slurm"), environ) == {}

"""ssh options for pdsh launches (the `ssh_args` config key).

pdsh reads extra ssh options from PDSH_SSH_ARGS_APPEND, but DeepSpeed's runner checks the first host, and finds
the master address when none is configured, with a plain `ssh HOST`. With ssh_args set, deepy does both itself
with those options and tells the runner to skip its check.
"""
from __future__ import annotations

import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

from neox.config.derive import resolve_hosts
from neox.config.launch import LaunchConfig

SSH_CHECK_TIMEOUT_S = 60
SSH_APPEND_VAR = "PDSH_SSH_ARGS_APPEND"


class SshCheckError(RuntimeError):
    """The first host of the hostfile cannot be reached with the configured ssh options."""


@dataclass(frozen=True)
class PdshSsh:
    runner_args: list[str] = field(default_factory=list)  # extra deepspeed.launcher.runner options
    env: dict[str, str] = field(default_factory=dict)  # for the runner's (and so pdsh's) environment


def ssh_argv(ssh_args: str, host: str, *command: str) -> list[str]:
    # The user's options come first: for ssh the first value given for an option wins.
    return ["ssh", *shlex.split(ssh_args), "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", host, *command]


def uses_pdsh_ssh(launch: LaunchConfig) -> bool:
    return launch.launcher == "pdsh" and bool(launch.ssh_args) and launch.hostfile is not None and not launch.no_ssh


def prepare_pdsh_ssh(launch: LaunchConfig, environ: Mapping[str, str]) -> PdshSsh:
    """Runner options and environment that make every ssh of a pdsh launch use `ssh_args`."""
    if not uses_pdsh_ssh(launch):
        return PdshSsh()
    assert launch.ssh_args is not None
    appended = " ".join(part for part in (environ.get(SSH_APPEND_VAR, "").strip(), launch.ssh_args) if part)
    runner_args = ["--no_ssh_check"]
    if launch.no_ssh_check and launch.master_addr is not None:
        return PdshSsh(runner_args, {SSH_APPEND_VAR: appended})
    first_host = next(iter(resolve_hosts(launch, local_gpus=0)))
    addresses = host_addresses(launch.ssh_args, first_host)
    if launch.master_addr is None:
        runner_args += ["--master_addr", addresses[0]]
    return PdshSsh(runner_args, {SSH_APPEND_VAR: appended})


def host_addresses(ssh_args: str, host: str) -> list[str]:
    """`hostname -I` on host over ssh with ssh_args: proves the host is reachable, and lists its addresses."""
    argv = ssh_argv(ssh_args, host, "hostname", "-I")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=SSH_CHECK_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SshCheckError("launcher pdsh needs the ssh client: 'ssh' is not on PATH (install openssh-client)") \
            from None
    except subprocess.TimeoutExpired:
        raise SshCheckError(f"`{shlex.join(argv)}` did not finish within {SSH_CHECK_TIMEOUT_S} s") from None
    addresses = done.stdout.split()
    if done.returncode != 0 or not addresses:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
        raise SshCheckError(
            f"host {host} (first in the 'hostfile') is not reachable with `{shlex.join(argv)}`: {reason}. "
            "Every host must accept this ssh without a password; fix 'ssh_args' or the host's authorized_keys."
        )
    return addresses

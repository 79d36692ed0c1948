"""A real sshd in each test host (netns_hosts.Host), and the ssh client config that reaches them.

Everything lives in one temporary folder: host keys, one sshd_config per host (AuthorizedKeysFile points at the
folder), a client key made by the test, known_hosts with the hosts' real keys. /root/.ssh and the system's sshd are
never touched; the only system path used is /run/sshd, the empty privilege-separation folder sshd insists on.
"""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.e2e.netns_hosts import Host

PRIVSEP_DIR = Path("/run/sshd")
START_TIMEOUT_S = 20


def find_sshd() -> str:
    candidates = (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd")  # sbin is off a user's PATH
    found = next((path for path in candidates if path and Path(path).exists()), None)
    if found is None:
        raise RuntimeError("sshd not found: install openssh-server (tools/setup_system.sh does)")
    return found


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "neox-test", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    return path.with_suffix(".pub").read_text().strip()


def _sshd_config(host: Host, host_key: Path, authorized_keys: Path) -> str:
    return "\n".join([
        f"ListenAddress {host.address}",
        "Port 22",  # each namespace has its own port space
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized_keys}",
        "StrictModes no",  # the key files sit under /tmp, which is world-writable
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "PidFile none",
        "LogLevel VERBOSE",
        "",
    ])


def write_client_config(folder: Path, client_key: Path, known_hosts: Path) -> Path:
    """The file a user would name in `ssh_args: -F FILE`: key, known hosts, no prompts."""
    path = folder / "ssh_config"
    path.write_text("\n".join([
        "Host *",
        f"  IdentityFile {client_key}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {known_hosts}",
        "  StrictHostKeyChecking yes",
        "  BatchMode yes",
        "",
    ]))
    return path


def _wait_until_reachable(client: Host, target: Host, config: Path, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        probe = subprocess.run(client.argv(["ssh", "-F", str(config), target.address, "true"]),
                               capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if probe.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"sshd on {target.address} not reachable: {probe.stderr.strip()}\n"
                               f"sshd log:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def ssh_servers(hosts: Sequence[Host], folder: Path) -> Iterator[Path]:
    """Start sshd on port 22 of every host; yields the client config (`ssh -F`) that logs in to all of them."""
    sshd = find_sshd()
    folder.mkdir(parents=True, exist_ok=True)
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    client_key = folder / "client_ed25519"
    authorized_keys = folder / "authorized_keys"
    authorized_keys.write_text(_keygen(client_key) + "\n")
    authorized_keys.chmod(0o600)
    known_lines = []
    servers: list[subprocess.Popen] = []
    try:
        for index, host in enumerate(hosts):
            host_key = folder / f"host{index}_ed25519"
            known_lines.append(f"{host.address} {' '.join(_keygen(host_key).split()[:2])}")
            config = folder / f"sshd_config_{index}"
            config.write_text(_sshd_config(host, host_key, authorized_keys))
            log = folder / f"sshd_{index}.log"
            with log.open("w") as out:
                servers.append(subprocess.Popen(host.argv([sshd, "-D", "-e", "-f", str(config)]),
                                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        known_hosts = folder / "known_hosts"
        known_hosts.write_text("\n".join(known_lines) + "\n")
        client_config = write_client_config(folder, client_key, known_hosts)
        for index, host in enumerate(hosts):
            _wait_until_reachable(hosts[0], host, client_config, folder / f"sshd_{index}.log")
        yield client_config
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

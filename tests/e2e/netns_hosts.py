"""Two network namespaces joined by a veth pair: two "hosts" on one machine for the multi-node launch tests.

Each namespace's end of the link is named nx0 (one name on every host, as eth0 is on identical cluster nodes), so
one GLOO_SOCKET_IFNAME fits both. Names carry the creating process id; namespaces left by a killed run (its process
gone) are removed, with whatever still runs in them, before new ones are made.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

NAME_PREFIX = "neoxtest-"
VETH_PREFIX = "nxv"  # root-namespace names of the pair before each end moves into its namespace
INTERFACE = "nx0"
SUBNET = "10.231.8"
PREFIX_LENGTH = 24


class NetnsUnavailable(RuntimeError):
    """This process may not create network namespaces (not root, or no CAP_NET_ADMIN)."""


@dataclass(frozen=True)
class Host:
    netns: str
    address: str

    def argv(self, command: Sequence[str]) -> list[str]:
        """command run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.netns, *command]

    def pids(self) -> list[int]:
        listing = _ip("netns", "pids", self.netns, check=False)
        return [int(pid) for pid in listing.stdout.split()] if listing.returncode == 0 else []


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str, prefix: str) -> int | None:
    digits = name[len(prefix):].split("-", 1)[0].rstrip("ab")
    return int(digits) if name.startswith(prefix) and digits.isdigit() else None


def stop_processes(host: Host, grace_s: float = 3.0) -> None:
    """End what runs in the namespace (sshd, the ranks it started): the test started all of it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = host.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline and host.pids():
            time.sleep(0.1)
        if not host.pids():
            return


def delete_host(host: Host) -> None:
    stop_processes(host)
    _ip("netns", "delete", host.netns, check=False)


def remove_stale() -> list[str]:
    """Delete namespaces and veth ends of earlier runs whose process is gone; returns their names."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        owner = _owner_pid(name, NAME_PREFIX)
        if owner is not None and not _alive(owner):
            delete_host(Host(name, ""))
            removed.append(name)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if line.count(":") >= 2 else ""
        owner = _owner_pid(name, VETH_PREFIX)
        if owner is not None and not _alive(owner):
            _ip("link", "delete", name, check=False)
            removed.append(name)
    return removed


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Hosts A (SUBNET.1) and B (SUBNET.2) on one link, loopback up in each; removed on exit, failure included."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("creating network namespaces needs root (CAP_NET_ADMIN); CI runs as root")
    remove_stale()
    pid = os.getpid()
    hosts = (Host(f"{NAME_PREFIX}{pid}-a", f"{SUBNET}.1"), Host(f"{NAME_PREFIX}{pid}-b", f"{SUBNET}.2"))
    veths = (f"{VETH_PREFIX}{pid}a", f"{VETH_PREFIX}{pid}b")
    created: list[Host] = []
    try:
        for host in hosts:
            added = _ip("netns", "add", host.netns, check=False)
            if added.returncode != 0:
                raise NetnsUnavailable(f"`ip netns add {host.netns}` failed: {added.stderr.strip()}")
            created.append(host)
        _ip("link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
        for host, veth in zip(hosts, veths):
            _ip("link", "set", veth, "netns", host.netns)
            _ip("-n", host.netns, "link", "set", veth, "name", INTERFACE)
            _ip("-n", host.netns, "addr", "add", f"{host.address}/{PREFIX_LENGTH}", "dev", INTERFACE)
            _ip("-n", host.netns, "link", "set", INTERFACE, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for host in created:
            delete_host(host)
        for veth in veths:  # only left in the root namespace when setup failed before moving it
            if _ip("link", "show", veth, check=False).returncode == 0:
                _ip("link", "delete", veth, check=False)

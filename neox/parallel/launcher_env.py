"""Who this rank is, read from whichever launcher started the process.

DeepSpeed's local and pdsh launches (and torchrun) set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
mpirun (`launcher: openmpi`) sets OMPI_COMM_WORLD_* instead, srun (`launcher: slurm`) SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID and SLURM_STEP_ID; deepy hands those ranks MASTER_PORT, and MASTER_ADDR when the config names it.
Without MASTER_ADDR, OpenMPI ranks ask rank 0 for its address over MPI and Slurm ranks use the first node of the step.
"""
from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from neox.config.errors import ConfigError

DEFAULT_MASTER_PORT = "29500"  # LaunchConfig.master_port's default, and DeepSpeed's
SLURM_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


class LauncherEnvError(ConfigError):
    """The launcher's variables do not say who this rank is, or where rank 0 listens (a ConfigError, so every rank
    program reports it in one paragraph: the fix is in the launch settings)."""


@dataclass(frozen=True)
class RankVariables:
    """The names one launcher gives a rank's global index, the world size and the index on its node."""
    launcher: str
    rank: str
    world_size: str
    local_rank: str
    marker: str  # present only in processes this launcher started


LAUNCHER_VARIABLES = (  # first match wins: mpirun inside a Slurm allocation also sees SLURM_PROCID=0
    RankVariables("torch", "RANK", "WORLD_SIZE", "LOCAL_RANK", marker="RANK"),
    RankVariables("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                  marker="OMPI_COMM_WORLD_RANK"),
    # A batch script has SLURM_PROCID=0 and the allocation's SLURM_NTASKS too, yet is one process: only the tasks
    # srun starts for a job step carry SLURM_STEP_ID.
    RankVariables("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", marker="SLURM_STEP_ID"),
)


def detect_launcher(environ: Mapping[str, str]) -> RankVariables | None:
    return next((names for names in LAUNCHER_VARIABLES if names.marker in environ and names.rank in environ), None)


def torch_rank_env(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for torch.distributed's env:// rendezvous.
    MASTER_PORT is left out when no launcher names it for a world of one (the caller picks a free port)."""
    names = detect_launcher(environ)
    if names is None:
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
               "MASTER_ADDR": environ.get("MASTER_ADDR", "127.0.0.1")}
        if "MASTER_PORT" in environ:
            env["MASTER_PORT"] = environ["MASTER_PORT"]
        return env
    rank = _integer(environ, names.rank, names)
    world_size = _integer(environ, names.world_size, names, default=1 if names.launcher == "torch" else None)
    local_rank = _integer(environ, names.local_rank, names, default=0 if names.launcher == "torch" else None)
    if not 0 <= rank < world_size:
        raise LauncherEnvError(f"{names.launcher} launch: {names.rank}={rank} is outside the world of "
                               f"{names.world_size}={world_size}")
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank)}
    if "MASTER_PORT" in environ or world_size > 1:
        env["MASTER_PORT"] = environ.get("MASTER_PORT", DEFAULT_MASTER_PORT)
    if "MASTER_ADDR" in environ:
        env["MASTER_ADDR"] = environ["MASTER_ADDR"]
    elif names.launcher == "openmpi" and world_size > 1:
        env["MASTER_ADDR"] = _mpi_rank0_address()
    elif names.launcher == "slurm" and world_size > 1:
        env["MASTER_ADDR"] = _slurm_first_node(environ)
    else:
        env["MASTER_ADDR"] = "127.0.0.1"
    return env


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: 'gpu[03-05,09],cpu1' -> 'gpu03', 'r[1-2]-n[7-8]' -> 'r1-n7'."""
    host: list[str] = []
    i = 0
    while i < len(nodelist) and nodelist[i] != ",":
        if nodelist[i] == "[":
            close = nodelist.find("]", i)
            if close < 0:
                raise LauncherEnvError(f"Slurm node list {nodelist!r} has an unclosed '['")
            host.append(re.split(r"[,-]", nodelist[i + 1:close], maxsplit=1)[0])
            i = close + 1
        else:
            host.append(nodelist[i])
            i += 1
    if not host:
        raise LauncherEnvError(f"Slurm node list {nodelist!r} names no host")
    return "".join(host)


def _integer(environ: Mapping[str, str], key: str, names: RankVariables, default: int | None = None) -> int:
    if key not in environ:
        if default is not None:
            return default
        raise LauncherEnvError(f"{names.launcher} launch: {names.rank} is set but {key} is not; start the ranks "
                               f"with {'mpirun' if names.launcher == 'openmpi' else 'srun'} (deepy does)")
    try:
        return int(environ[key])
    except ValueError:
        raise LauncherEnvError(f"{names.launcher} launch: {key}={environ[key]!r} is not an integer") from None


def _slurm_first_node(environ: Mapping[str, str]) -> str:
    # srun's default block distribution puts task 0 on the first node of the step.
    for key in SLURM_NODELIST_VARS:
        if environ.get(key):
            return first_slurm_host(environ[key])
    raise LauncherEnvError("slurm launch without MASTER_ADDR or SLURM_STEP_NODELIST: set 'master_addr' in the "
                           "config to the address of the node running rank 0")


def _mpi_rank0_address() -> str:
    try:
        from mpi4py import MPI
    except ImportError:
        raise LauncherEnvError("openmpi launch without MASTER_ADDR needs mpi4py to find rank 0 (pip install "
                               "'neox[mpi]'), or set 'master_addr' in the config to the first host's address") from None
    comm = MPI.COMM_WORLD
    return comm.bcast(_own_address() if comm.Get_rank() == 0 else None, root=0)


def _own_address() -> str:
    """This host's first non-loopback address (what DeepSpeed's runner asks `hostname -I` for)."""
    try:
        addresses = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10, check=True).stdout
        if addresses.split():
            return addresses.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return socket.gethostbyname(socket.gethostname())

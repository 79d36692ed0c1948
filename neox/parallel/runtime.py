"""Process-group start-up for every per-rank entrypoint (train, eval, generate).

Ranks are started by DeepSpeed's launcher or torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), mpirun or
srun (their own variables, mapped by launcher_env.py). A process started by hand runs as a world of one.
"""
from __future__ import annotations

import datetime
import os
import re
import sys
import time
from dataclasses import dataclass

import torch

from neox.parallel import rank_status
from neox.parallel.launcher_env import torch_rank_env


_C10D_LOG_LINE = re.compile(r"\[[EWI]\d{4} \d\d:\d\d")  # "[E1206 18:15:06.260 socket.cpp:1028] ..."


class RendezvousError(RuntimeError):
    """This rank could not join the process group: what it waited for, where, and for how long."""


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def _quiet_cpu_deepspeed() -> None:
    # DeepSpeed's shared-memory CPU collectives JIT-compile a C++ op at start-up (40-75 s here); gloo needs none.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_runtime(backend: str | None = None, timeout_minutes: float = 10.0) -> Runtime:
    """Join the process group (or make a world of one) and pick this rank's device."""
    import deepspeed

    rank_from_environment()
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        _quiet_cpu_deepspeed()
        device = torch.device("cpu")
    if backend == "nccl" and not cuda:
        # gpt-neox configs say nccl (its default); without CUDA the same job runs on gloo.
        if os.environ.get("RANK", "0") == "0":
            print("distributed_backend nccl needs CUDA; this machine has none: using gloo", file=sys.stderr, flush=True)
        backend = "gloo"
    backend = backend or ("nccl" if cuda else "gloo")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    # Groups made later (DeepSpeed's data/model/pipe groups, the topology's) call new_group without a timeout and
    # would get torch's module default (30 min gloo, 10 min NCCL): the configured timeout becomes that default, so a
    # rank blocked on a dead or hung peer in any group raises after timeout_minutes.
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout
    if not torch.distributed.is_initialized():
        _join(deepspeed, backend, timeout)
    return Runtime(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                   local_rank=local_rank, device=device)


def rank_from_environment() -> int:
    """This rank's index, from whichever launcher started it. RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT are written back to the environment: DeepSpeed's comm layer reads them too."""
    os.environ.update(torch_rank_env(os.environ))
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    return int(os.environ["RANK"])


def _join(deepspeed, backend: str, timeout: datetime.timedelta) -> None:
    """The rendezvous (rank 0 hosts a TCP store at MASTER_ADDR:MASTER_PORT, the others connect to it), bounded by
    timeout; a failure names what this rank waited for, for how long, and the likely cause."""
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    where = f"the rendezvous with {address} ({os.environ['WORLD_SIZE']} ranks)"
    rank_status.enter(where)
    started = time.monotonic()
    try:
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    except RuntimeError as err:  # torch's DistError family, and gloo's own errors while the groups connect
        raise RendezvousError(
            f"rank {os.environ['RANK']}: {where} failed after {time.monotonic() - started:.0f} s "
            f"(distributed_timeout_minutes {timeout.total_seconds() / 60:g}): {_message_of(err)}. "
            f"{_rendezvous_hint(str(err), address)}".rstrip()) from err
    rank_status.enter("joined the process group; setting up")


def _message_of(error: BaseException) -> str:
    # torch appends its C++ stack, and log lines glued to the message, to a store error: the first sentence says it.
    lines = str(error).strip().splitlines()
    text = _C10D_LOG_LINE.split(lines[0], 1)[0].rstrip(" .") if lines else ""
    return text or type(error).__name__


def _rendezvous_hint(text: str, address: str) -> str:
    if "EADDRINUSE" in text or "address already in use" in text.lower():
        return (f"Another process listens on {address} (another job, or ranks of an earlier launch still running): "
                "pick a free master_port")
    if "waiting for clients" in text:
        return ("Not every rank connected: some did not start, hung before the rendezvous or were given another "
                "master_addr/master_port (deepy's failure report says where each rank was)")
    if "trying to connect" in text or "Connection refused" in text:
        return (f"Rank 0 did not answer at {address}: it did not start, failed, or listens at another "
                "master_addr/master_port")
    return ""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_mean(value: torch.Tensor, group=None) -> torch.Tensor:
    if not torch.distributed.is_initialized():
        return value
    value = value.clone()
    torch.distributed.all_reduce(value, group=group)
    return value / torch.distributed.get_world_size(group)

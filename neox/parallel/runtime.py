"""Process-group start-up for every per-rank entrypoint (train, eval, generate).

Ranks are started by DeepSpeed's launcher or torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), mpirun or
srun (their own variables, mapped by launcher_env.py). A process started by hand runs as a world of one.
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch

from neox.parallel.launcher_env import torch_rank_env


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

    # Written back to the environment: DeepSpeed's comm layer reads these variables too.
    os.environ.update(torch_rank_env(os.environ))
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
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
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    return Runtime(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                   local_rank=local_rank, device=device)


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

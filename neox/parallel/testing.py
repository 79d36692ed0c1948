"""run_distributed(fn, world_size, *args): run fn on N local gloo ranks and return each rank's result.

Product code, not a test helper: it is how tests (and anyone checking a layer) get a real multi-rank process
group on CPU. fn must be importable (module-level) and its result picklable; an exception on any rank is
re-raised in the caller with that rank's traceback. Ranks join through init_runtime, like the per-rank entrypoints,
so DeepSpeed's topology and engine code works inside fn.
"""
from __future__ import annotations

import os
import pickle
import random
import socket
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from neox.parallel.runtime import init_runtime

if TYPE_CHECKING:
    from neox.config.neox_config import NeoXConfig


class DistributedRunError(RuntimeError):
    pass


def free_port() -> int:
    """A port nothing listens on, from below the kernel's ephemeral range. bind(0) and outgoing connections draw
    their ports from that range: a port found free there could be taken by any socket on the machine (the gloo groups
    of tests running beside this one) before rank 0 binds it, seconds later. Below it only a test picking the same
    number at random can take it (system randomness: tests seed `random`, and concurrent test runs must differ)."""
    low = _lowest_ephemeral_port()
    pick = random.SystemRandom()
    for _ in range(200):
        port = pick.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # SO_REUSEADDR as torch's store binds: a port in TIME_WAIT is free for it, a listening one is not
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port below {low} after 200 tries")


def _lowest_ephemeral_port() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    try:
        init_runtime("gloo")  # as the entrypoints do: torch.distributed and DeepSpeed's comm layer both ready
        # Plain pickle copies tensors by value; torch's queue would pass shared-memory handles that vanish when
        # this process exits before the parent has read them.
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """Results ordered by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout_s)
            if ok:
                collected[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    except Exception as err:  # queue.Empty: a rank hung or died without reporting
        errors.append(f"no result within {timeout_s} s ({type(err).__name__})")
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout_s)
            if p.is_alive():
                p.terminate()
                p.join()
    if errors:
        raise DistributedRunError("run_distributed failed on " + "\n".join(errors))
    return [collected[r] for r in range(world_size)]


def shared_config(path: Path, values: dict[str, Any], vocab_size: int) -> "NeoXConfig":
    """Collective, inside run_distributed: rank 0 writes `values` as the YAML config at path, every rank loads it."""
    import yaml

    from neox.config import load_config

    if dist.get_rank() == 0:
        path.write_text(yaml.safe_dump(values))
    dist.barrier()
    return load_config([path], vocab_size=vocab_size)

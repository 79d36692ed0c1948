"""Keys handed to DeepSpeed's launcher (deepspeed.launcher.runner) and the process group backend."""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Literal

from neox.config.errors import ConfigError
from neox.config.fields import option


@dataclass
class LaunchConfig:
    num_gpus: int | None = option(
        None,
        "Ranks per node (GPUs, or CPU processes on a machine without GPU). None: every GPU of each node "
        "(the hostfile's slots), or 1 rank on a machine without GPU.",
    )
    num_nodes: int = option(-1, "Use the first N hosts of the hostfile; -1 uses all (1 without a hostfile).")
    hostfile: str | None = option(None, "DeepSpeed hostfile: one 'HOST slots=N' line per node.")
    include: str | None = option(
        None, "Resources to use, 'HOST[:SLOT,...]@HOST...' (e.g. 'worker-0@worker-1:0,2'); excludes num_gpus/num_nodes."
    )
    exclude: str | None = option(None, "Resources to leave out, same format as include.")
    master_addr: str | None = option(None, "Address of rank 0; None: 127.0.0.1 locally, the first host otherwise.")
    master_port: int = option(29500, "TCP port of the rendezvous on master_addr.")
    launcher: Literal["pdsh", "openmpi", "mvapich", "slurm"] = option(
        "pdsh", "How DeepSpeed starts ranks on several nodes."
    )
    launcher_args: str | None = option(
        None, "Extra arguments DeepSpeed passes to the multi-node launcher (e.g. srun flags)."
    )
    ssh_args: str | None = option(
        None,
        "launcher pdsh: options for every ssh to the hosts, e.g. '-p 2222 -i ~/.ssh/cluster_key' or "
        "'-F cluster_ssh_config' (appended to PDSH_SSH_ARGS_APPEND); deepy checks the first host with them.",
    )
    no_ssh: bool = option(
        False, "Run `deepy` on every node yourself (no ssh): each node starts only its own ranks; needs node_rank."
    )
    node_rank: int = option(-1, "This node's index in the hostfile when no_ssh is set.")
    no_ssh_check: bool = option(False, "Skip DeepSpeed's check that the first host is reachable by ssh.")
    force_multi: bool = option(False, "Use the multi-node launcher even for a single host.")
    distributed_backend: Literal["nccl", "gloo"] | None = option(
        "nccl", "torch.distributed backend. nccl (gpt-neox's default) on a machine without CUDA runs on gloo, "
        "with a note; None picks nccl on GPU and gloo on CPU."
    )
    distributed_timeout_minutes: float = option(
        10.0,
        "Timeout of every collective (init_process_group's timeout): a rank blocked on a dead or hung peer raises "
        "after this long instead of waiting forever. Longer than the slowest legitimate wait (rank 0 building "
        "the data index caches, writing a checkpoint).",
    )
    global_num_gpus: int | None = option(
        None, "Total ranks of the job (gpt-neox meaning). Unset: num_gpus x nodes of the hostfile (or this machine). "
        "Set: the batch arithmetic and `deepy plan` use it without a hostfile; a launch must start exactly this many."
    )
    deepspeed_slurm: bool = option(
        False, "Ranks are started by srun (launcher slurm, forced multi-node) and read their rank from SLURM_* "
        "variables; comment / account go to srun."
    )
    deepspeed_mpi: bool = option(
        False, "Ranks are started by mpirun (launcher openmpi, forced multi-node) and read their rank from the MPI "
        "environment (OMPI_COMM_WORLD_*)."
    )
    comment: str | None = option(None, "srun --comment of a slurm launch (launcher slurm / deepspeed_slurm).")
    account: str | None = option(None, "srun --account of a slurm launch (launcher slurm / deepspeed_slurm).")
    deepspeed_extra_args: dict | None = option(
        None, "Extra entries merged into the generated DeepSpeed JSON config (for keys this config does not model)."
    )

    def validate(self) -> None:
        if self.num_gpus is not None and self.num_gpus < 1:
            raise ConfigError(f"'num_gpus' must be >= 1, got {self.num_gpus}")
        if self.num_nodes == 0 or self.num_nodes < -1:
            raise ConfigError(f"'num_nodes' must be >= 1 or -1 (all hosts), got {self.num_nodes}")
        if not 0 < self.master_port < 65536:
            raise ConfigError(f"'master_port' must be a TCP port (1-65535), got {self.master_port}")
        if self.include and self.exclude:
            raise ConfigError("'include' and 'exclude' are mutually exclusive")
        if (self.include or self.exclude) and (self.num_gpus is not None or self.num_nodes != -1):
            raise ConfigError(
                "'include'/'exclude' cannot be combined with 'num_gpus'/'num_nodes' (DeepSpeed refuses it)"
            )
        if not self.distributed_timeout_minutes > 0:
            raise ConfigError(f"'distributed_timeout_minutes' must be > 0, got {self.distributed_timeout_minutes}")
        if self.ssh_args is not None:
            self._validate_ssh_args()
        if self.global_num_gpus is not None and self.global_num_gpus < 1:
            raise ConfigError(f"'global_num_gpus' must be >= 1, got {self.global_num_gpus}")
        if self.deepspeed_slurm and self.deepspeed_mpi:
            raise ConfigError("'deepspeed_slurm' and 'deepspeed_mpi' are both true; ranks come from srun or from "
                              "mpirun, set one")
        if self.deepspeed_slurm and self.launcher not in ("pdsh", "slurm"):
            raise ConfigError(f"'deepspeed_slurm' starts ranks with srun, but 'launcher' is {self.launcher!r}; set "
                              "launcher slurm (or leave it unset)")
        if self.deepspeed_mpi and self.launcher not in ("pdsh", "openmpi", "mvapich"):
            raise ConfigError(f"'deepspeed_mpi' starts ranks with mpirun, but 'launcher' is {self.launcher!r}; set "
                              "launcher openmpi or mvapich (or leave it unset)")
        if self.no_ssh and self.node_rank < 0:
            raise ConfigError("'no_ssh' needs 'node_rank' (this node's index in the hostfile)")

    def _validate_ssh_args(self) -> None:
        if self.launcher != "pdsh":
            raise ConfigError(
                f"'ssh_args' applies to launcher pdsh, not {self.launcher!r}; for openmpi put "
                "'--mca plm_rsh_args \"...\"' in 'launcher_args'"
            )
        try:
            shlex.split(self.ssh_args or "")
        except ValueError as err:
            raise ConfigError(f"'ssh_args' {self.ssh_args!r} cannot be split into ssh options: {err}") from None

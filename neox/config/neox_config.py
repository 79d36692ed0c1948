"""The whole configuration: one instance of every group, the derived sizes, and where each value came from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from neox.config.data import DataConfig
from neox.config.eval import EvalConfig
from neox.config.fields import group_fields, option
from neox.config.generate import GenerateConfig
from neox.config.launch import LaunchConfig
from neox.config.log import LogConfig
from neox.config.model import ModelConfig
from neox.config.mup import MupConfig
from neox.config.optim import OptimConfig
from neox.config.parallel import ParallelConfig
from neox.config.post_training import PostTrainingConfig
from neox.config.train import TrainConfig


@dataclass
class DerivedConfig:
    """Sizes computed by derive.py; never written by users (they set num_gpus, num_nodes, hostfile...)."""

    world_size: int = option(1, "Ranks in the job = ranks per node summed over the nodes used.")
    node_count: int = option(1, "Nodes the job runs on.")
    data_parallel_size: int = option(1, "world_size / (model_parallel_size x pipeline stages).")


# Group name -> dataclass; users write keys flat (as in gpt-neox), the group is only our filing.
GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "optim": OptimConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "log": LogConfig,
    "launch": LaunchConfig,
    "generate": GenerateConfig,
    "eval": EvalConfig,
    "mup": MupConfig,
    "post_training": PostTrainingConfig,
}
DERIVED_KEYS = frozenset(group_fields(DerivedConfig))


def _key_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for group, cls in GROUPS.items():
        for key in group_fields(cls):
            if key in index or key in DERIVED_KEYS:
                owner = index.get(key, "derived")
                raise RuntimeError(f"config key '{key}' is declared by both '{owner}' and '{group}'")
            index[key] = group
    return index


KEY_GROUP: dict[str, str] = _key_index()

# Provenance labels for values that come from no file.
DEFAULT = "default"
COMMAND_LINE = "command line"


@dataclass
class NeoXConfig:
    model: ModelConfig
    parallel: ParallelConfig
    optim: OptimConfig
    data: DataConfig
    train: TrainConfig
    log: LogConfig
    launch: LaunchConfig
    generate: GenerateConfig
    eval: EvalConfig
    mup: MupConfig
    post_training: PostTrainingConfig
    derived: DerivedConfig = field(default_factory=DerivedConfig)
    # Dotted key ("num_layers", "optimizer.params.lr") -> "configs/125M.yml:14", "command line", "default"
    # or "derived: <rule>". Dict-valued keys are tracked per leaf, so a merge shows which file set what.
    provenance: dict[str, str] = field(default_factory=dict)
    # The YAML files merged, in order.
    sources: list[str] = field(default_factory=list)

    def get(self, key: str) -> Any:
        """Value of a flat key, wherever it is filed."""
        if key in DERIVED_KEYS:
            return getattr(self.derived, key)
        return getattr(getattr(self, KEY_GROUP[key]), key)

    def origin(self, key: str) -> str:
        """Where a key's value came from; for a dict key, every leaf origin joined."""
        if key in self.provenance:
            return self.provenance[key]
        leaves = sorted({v for k, v in self.provenance.items() if k.startswith(key + ".")})
        return ", ".join(leaves) if leaves else DEFAULT

    def groups(self) -> dict[str, Any]:
        """Group name -> group instance, including 'derived'."""
        out = {name: getattr(self, name) for name in GROUPS}
        out["derived"] = self.derived
        return out

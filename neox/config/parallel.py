"""Parallelism keys: tensor (model) and pipeline parallel sizes; data parallel is derived."""
from __future__ import annotations

from dataclasses import dataclass

from neox.config.errors import ConfigError
from neox.config.fields import option


@dataclass
class ParallelConfig:
    model_parallel_size: int = option(1, "Tensor-parallel ranks per model replica (gpt-neox name).")
    pipe_parallel_size: int = option(
        0,
        "Pipeline stages. 0 trains without DeepSpeed's pipeline engine; 1 or more builds a PipelineModule "
        "with that many stages (gpt-neox meaning).",
    )
    pipe_partition_method: str = option(
        "type:transformer|mlp",
        "How DeepSpeed splits layers across stages: 'type:REGEX' balances the layers whose class name matches "
        "(gpt-neox's default 'type:transformer|mlp' = the transformer layers), 'parameters' balances parameter "
        "counts, 'uniform' layer counts.",
    )

    @property
    def pipe_stages(self) -> int:
        return max(self.pipe_parallel_size, 1)

    def validate(self) -> None:
        if self.model_parallel_size < 1:
            raise ConfigError(f"'model_parallel_size' must be >= 1, got {self.model_parallel_size}")
        if self.pipe_parallel_size < 0:
            raise ConfigError(f"'pipe_parallel_size' must be >= 0, got {self.pipe_parallel_size}")
        method = self.pipe_partition_method
        if method not in ("parameters", "uniform") and not (method.startswith("type:") and len(method) > 5):
            raise ConfigError(
                f"'pipe_partition_method' is {method!r}; use 'parameters', 'uniform' or 'type:REGEX'"
            )

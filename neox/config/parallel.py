"""Parallelism keys: tensor (model) and pipeline parallel sizes, sequence parallelism; data parallel is derived."""
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
    moe_expert_parallel_size: int = option(
        1,
        "Expert parallelism: split each MoE layer's routed experts over this many data-parallel ranks (experts "
        "[r E/ep, (r+1) E/ep) on the r-th rank of each group of ep consecutive data-parallel ranks), tokens sent to "
        "their experts' ranks and back by all-to-all. Must divide the data-parallel size and moe_num_experts. The "
        "experts' gradients are averaged over the ranks holding the same experts (DeepSpeed's expert-data-parallel "
        "group); everything else is data-parallel as before. A training layout: checkpoints hold whole experts, and "
        "eval / generate run them whole.",
    )
    sequence_parallel: bool = option(
        False,
        "Megatron-style sequence parallelism (arXiv 2205.05198): between the tensor-parallel matrices, norms, dropout "
        "and the residual stream hold 1/model_parallel_size of the sequence on each tp rank (all-gather before, "
        "reduce-scatter after instead of all-reduce), dividing those activations by tp. No effect with "
        "model_parallel_size 1 (as in gpt-neox).",
    )

    @property
    def pipe_stages(self) -> int:
        return max(self.pipe_parallel_size, 1)

    @property
    def is_model_parallel(self) -> bool:
        """The one answer to "is this run model-parallel": the model runs through neox.parallel's layout (tensor
        shards and/or pipeline stages; pipe_parallel_size 1 is DeepSpeed's pipeline engine with one stage, as in
        gpt-neox), not as the single-device model. Training, eval, generate and checkpoint reading all ask this."""
        return self.model_parallel_size > 1 or self.pipe_parallel_size >= 1

    @property
    def shards_parameters(self) -> bool:
        """Ranks hold different pieces of the model during training: model-parallel, or experts split over
        data-parallel ranks (expert parallelism). Such a run trains through neox.parallel's engine."""
        return self.is_model_parallel or self.moe_expert_parallel_size > 1

    @property
    def shards_sequence(self) -> bool:
        """sequence_parallel in effect: asked for, and a tensor-parallel group to shard over."""
        return self.sequence_parallel and self.model_parallel_size > 1

    def validate(self) -> None:
        if self.model_parallel_size < 1:
            raise ConfigError(f"'model_parallel_size' must be >= 1, got {self.model_parallel_size}")
        ep = self.moe_expert_parallel_size
        if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
            raise ConfigError(f"'moe_expert_parallel_size' must be an integer >= 1, got {ep!r}")
        if self.pipe_parallel_size < 0:
            raise ConfigError(f"'pipe_parallel_size' must be >= 0, got {self.pipe_parallel_size}")
        method = self.pipe_partition_method
        if method not in ("parameters", "uniform") and not (method.startswith("type:") and len(method) > 5):
            raise ConfigError(
                f"'pipe_partition_method' is {method!r}; use 'parameters', 'uniform' or 'type:REGEX'"
            )


def check_sequence_parallel(parallel: ParallelConfig, seq_length: int, curriculum: dict | None) -> None:
    """Every sequence a training step feeds must split evenly over the tp ranks: seq_length, and with a seqlen
    curriculum (curriculum_learning) each length its schedule can cut to."""
    if not parallel.shards_sequence:
        return
    tp = parallel.model_parallel_size
    if seq_length % tp:
        raise ConfigError(f"'sequence_parallel' splits each sequence over the 'model_parallel_size' ({tp}) ranks, so "
                          f"'seq_length' ({seq_length}) must be a multiple of it")
    if not (curriculum and curriculum.get("enabled") is True):
        return
    schedule = curriculum["schedule_config"]
    if curriculum["schedule_type"] == "fixed_discrete":
        lengths = {f"schedule_config.difficulty[{i}]": d for i, d in enumerate(schedule["difficulty"])}
    else:  # fixed_linear / fixed_root cut to multiples of difficulty_step, capped at max_difficulty
        lengths = {"schedule_config.difficulty_step": schedule["difficulty_step"],
                   "max_difficulty": curriculum["max_difficulty"]}
    for key, length in lengths.items():
        if length % tp:
            raise ConfigError(f"'sequence_parallel' splits each sequence over the 'model_parallel_size' ({tp}) ranks, "
                              f"so the curriculum's sequence lengths must be multiples of it: "
                              f"'curriculum_learning.{key}' is {length}")

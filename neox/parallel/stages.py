"""Where the pipeline is cut into stages: DeepSpeed's PipelineModule._partition_layers, step for step, so the cut is
known before DeepSpeed makes it (a rank initialises only its stage's layers), and `deepy plan`, evaluation and
generation put every layer on the stage training puts it on.

The layers are the pipeline's (neox/parallel/pipeline.py): embedding, the blocks, final norm, head (a tied head is
the embedding layer again). DeepSpeed weighs them by pipe_partition_method: 'parameters' a layer's trainable
parameter count, 'type:REGEX' 1 for a layer whose class name matches (case-insensitive) and 0 otherwise (both cut
by partition_balanced), 'uniform' the layer count (partition_uniform).
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

from neox.config.errors import ConfigError


def partition_layers(kinds: Sequence[str], param_counts: Callable[[], Sequence[int]], stages: int,
                     method: str) -> list[int]:
    """Stage boundaries [0, b1, ..., len(kinds)] of the layers whose class names are `kinds`; param_counts() (each
    layer's parameters on this rank) is called only for 'parameters', the one method that weighs them."""
    from deepspeed.runtime.utils import partition_balanced, partition_uniform

    method = method.lower()  # as DeepSpeed does, the pattern included
    if method == "uniform":
        return [int(b) for b in partition_uniform(len(kinds), stages)]
    if method == "parameters":
        weights = list(param_counts())
    elif method.startswith("type:"):
        pattern = re.compile(method.split(":")[1], re.IGNORECASE)
        weights = [1 if pattern.search(kind) else 0 for kind in kinds]
        if not any(weights):
            raise ConfigError(f"'pipe_partition_method' {method!r} matches no layer "
                              f"({', '.join(dict.fromkeys(kinds))})")
    else:
        raise ConfigError(f"'pipe_partition_method' is {method!r}; use 'parameters', 'uniform' or 'type:REGEX'")
    return [int(b) for b in partition_balanced(weights, stages)]

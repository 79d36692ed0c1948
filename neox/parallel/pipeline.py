"""The (tensor-parallelised) GPTNeoX as a DeepSpeed PipelineModule: embedding, N blocks, final norm, head.

Each LayerSpec wraps a module of an already built GPTNeoX, so every layout starts from the weights a single
device would have; a stage keeps only its own layers. A meta-device model is initialised only in those
(`stage_parameters`: the cut is known before DeepSpeed makes it), the other layers stay on the meta device.
Activations between stages are (hidden, position_ids); the first stage reads (tokens, position_ids) and the last
stage's loss (neox/parallel/global_batch.py GlobalBatchLoss) reads the objective's targets, a tuple of tensors. With tied embeddings the head is a TiedLayerSpec on the embedding:
DeepSpeed keeps one copy per owning stage, sums the tied gradient over them and marks the non-first copy
`ds_pipe_replicated` (counted once in the norm).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from neox.model import GPTNeoX
from neox.parallel.stages import partition_layers
from neox.parallel.tensor import column_linear
from neox.parallel.topology import Topology

TIED_KEY = "word_embeddings"
TIED_WEIGHT = "embedding.word_embeddings.weight"


class EmbeddingPipe(nn.Module):
    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, position_ids = inputs
        return self.embedding(tokens, position_ids), position_ids


class TransformerLayerPipe(nn.Module):
    """Named so that pipe_partition_method 'type:transformer' balances these layers."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, position_ids = inputs
        return self.block(hidden, position_ids), position_ids


class FinalNormPipe(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.norm(inputs[0])


class HeadPipe(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


def _tied_head_forward(tp_group, sequence_parallel: bool, module: EmbeddingPipe,
                       hidden: torch.Tensor) -> torch.Tensor:
    # The embedding's (vocab-sharded) table used as the output projection, as VocabParallelHead uses it.
    return column_linear(hidden, module.embedding.word_embeddings.weight, None, tp_group, sequence_parallel)


def _checkpoint_without_reentry(function, *args):
    return checkpoint(function, *args, use_reentrant=False)


def pipeline_layers(model: GPTNeoX, topo: Topology) -> list:
    """The layer specs of the pipeline: embedding, blocks, final norm, head (a TiedLayerSpec on the embedding when
    the weights are tied). Each wraps a module of `model` (which may still be on the meta device)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    tied = getattr(model.head, "weight", None) is model.embedding.word_embeddings.weight  # not a value head
    if tied:
        specs: list = [TiedLayerSpec(TIED_KEY, EmbeddingPipe, model.embedding, tied_weight_attr=TIED_WEIGHT)]
    else:
        specs = [LayerSpec(EmbeddingPipe, model.embedding)]
    specs += [LayerSpec(TransformerLayerPipe, block) for block in model.blocks]
    specs.append(LayerSpec(FinalNormPipe, model.final_norm))
    if tied:
        specs.append(TiedLayerSpec(TIED_KEY, EmbeddingPipe, model.embedding, tied_weight_attr=TIED_WEIGHT,
                                   forward_fn=partial(_tied_head_forward, topo.tp_group,
                                                      getattr(model.head, "sequence_parallel", False))))
    else:
        specs.append(LayerSpec(HeadPipe, model.head))
    return specs


def stage_bounds(specs: list, stages: int, partition_method: str) -> list[int]:
    """[0, b1, ..., len(specs)]: the layers of each stage, as PipelineModule will cut them."""
    def counts() -> list[int]:  # PipelineModule._count_layer_params: a built layer's trainable parameters
        return [sum(p.numel() for p in spec.build().parameters() if p.requires_grad) for spec in specs]

    return partition_layers([spec.typename.__name__ for spec in specs], counts, stages, partition_method)


def stage_parameters(model: GPTNeoX, topo: Topology, partition_method: str) -> list[nn.Parameter]:
    """The parameters of this rank's pipeline stage (a tied embedding on the first and the last stage)."""
    specs = pipeline_layers(model, topo)
    bounds = stage_bounds(specs, topo.pp_size, partition_method)
    own = specs[bounds[topo.pp_rank]:bounds[topo.pp_rank + 1]]
    return list(dict.fromkeys(p for spec in own for p in spec.build().parameters()))


def build_pipeline_module(model: GPTNeoX, topo: Topology, loss_fn: Callable[[torch.Tensor, tuple], torch.Tensor],
                          partition_method: str,
                          checkpoint_activations: bool, checkpoint_num_layers: int = 1,
                          checkpoint_func: Callable | None = None):
    """Collective. `model` must already be tensor-parallelised (apply_tensor_parallel), and this stage's layers
    (stage_parameters) real: the others may stay on the meta device. loss_fn(logits, targets) runs on the last
    stage (targets: the tuple pipeline_batches yields second). With checkpoint_activations,
    runs of checkpoint_num_layers layers of a stage are recomputed together by checkpoint_func (DeepSpeed's, from
    neox/parallel/activation_checkpoint.py, or None for torch's); a run holding a non-transformer layer (the
    embedding, the final norm, the head) is not recomputed, as DeepSpeed decides."""
    from deepspeed.pipe import PipelineModule

    specs = pipeline_layers(model, topo)
    bounds = stage_bounds(specs, topo.pp_size, partition_method)
    mismatch = (f"neox/parallel/stages.py cut the pipeline at {bounds}, DeepSpeed elsewhere: stage {topo.pp_rank} "
                "holds layers it did not initialise; align partition_layers with this DeepSpeed version's "
                "PipelineModule._partition_layers")
    try:
        module = PipelineModule(layers=specs, topology=topo.ds_topology, loss_fn=loss_fn,
                                partition_method=partition_method,
                                activation_checkpoint_interval=checkpoint_num_layers if checkpoint_activations else 0,
                                activation_checkpoint_func=checkpoint_func or _checkpoint_without_reentry,
                                checkpointable_layers=["TransformerLayerPipe"])
    except NotImplementedError as err:  # moving a layer still on the meta device to the device
        raise RuntimeError(f"{mismatch} ({err})") from err
    if [int(b) for b in module.partitions()] != bounds:
        raise RuntimeError(f"{mismatch} (DeepSpeed's cut: {list(module.partitions())})")
    return module


def pipeline_batches(batches: Iterable[dict[str, torch.Tensor]], inputs: Callable[[dict], tuple],
                     targets: Callable[[dict], tuple]) -> Iterator[tuple[tuple, tuple]]:
    """Micro-batches in the engine's shape: (inputs(batch) for the first stage, targets(batch) for the last)."""
    for batch in batches:
        yield tuple(inputs(batch)), tuple(targets(batch))

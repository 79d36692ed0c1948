"""The (tensor-parallelised) GPTNeoX as a DeepSpeed PipelineModule: embedding, N blocks, final norm, head.

Each LayerSpec wraps a module of an already built GPTNeoX, so every layout starts from the weights a single
device would have; a stage keeps only its own layers. Activations between stages are (hidden, position_ids);
the first stage reads (tokens, position_ids) and the last stage's loss reads (labels, loss_mask). With tied
embeddings the head is a TiedLayerSpec on the embedding: DeepSpeed keeps one copy per owning stage, sums the
tied gradient over them and marks the non-first copy `ds_pipe_replicated` (counted once in the norm).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neox.model import GPTNeoX
from neox.parallel.parallelize import LossFn
from neox.parallel.tensor import copy_to_tp
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


def _tied_head_forward(tp_group, module: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    # The embedding's (vocab-sharded) table used as the output projection.
    weight = module.embedding.word_embeddings.weight
    return F.linear(copy_to_tp(hidden, tp_group), weight)


class PipeLoss:
    """loss_fn(logits, (labels, loss_mask)) as DeepSpeed's pipeline engine calls it on the last stage."""

    def __init__(self, lm_loss: LossFn):
        self.lm_loss = lm_loss
        self.__name__ = "lm_loss"

    def __call__(self, logits: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        labels, loss_mask = targets
        return self.lm_loss(logits, labels, loss_mask)


def _checkpoint_without_reentry(function, *args):
    return checkpoint(function, *args, use_reentrant=False)


def build_pipeline_module(model: GPTNeoX, topo: Topology, lm_loss: LossFn, partition_method: str,
                          checkpoint_activations: bool, checkpoint_num_layers: int = 1,
                          checkpoint_func: Callable | None = None):
    """Collective. `model` must already be tensor-parallelised (apply_tensor_parallel). With checkpoint_activations,
    runs of checkpoint_num_layers layers of a stage are recomputed together by checkpoint_func (DeepSpeed's, from
    neox/parallel/activation_checkpoint.py, or None for torch's); a run holding a non-transformer layer (the
    embedding, the final norm, the head) is not recomputed, as DeepSpeed decides."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    tied = model.head.weight is model.embedding.word_embeddings.weight
    if tied:
        specs: list = [TiedLayerSpec(TIED_KEY, EmbeddingPipe, model.embedding, tied_weight_attr=TIED_WEIGHT)]
    else:
        specs = [LayerSpec(EmbeddingPipe, model.embedding)]
    specs += [LayerSpec(TransformerLayerPipe, block) for block in model.blocks]
    specs.append(LayerSpec(FinalNormPipe, model.final_norm))
    if tied:
        specs.append(TiedLayerSpec(TIED_KEY, EmbeddingPipe, model.embedding, tied_weight_attr=TIED_WEIGHT,
                                   forward_fn=partial(_tied_head_forward, topo.tp_group)))
    else:
        specs.append(LayerSpec(HeadPipe, model.head))
    return PipelineModule(layers=specs, topology=topo.ds_topology, loss_fn=PipeLoss(lm_loss),
                          partition_method=partition_method,
                          activation_checkpoint_interval=checkpoint_num_layers if checkpoint_activations else 0,
                          activation_checkpoint_func=checkpoint_func or _checkpoint_without_reentry,
                          checkpointable_layers=["TransformerLayerPipe"])


def pipeline_batches(loader: Iterator[dict[str, torch.Tensor]]) -> Iterator[tuple[tuple, tuple]]:
    """Loader micro-batches in the engine's shape: ((tokens, position_ids), (labels, loss_mask))."""
    for batch in loader:
        yield (batch["tokens"], batch["position_ids"]), (batch["labels"], batch["loss_mask"])

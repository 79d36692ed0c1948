"""The decodable model at a tensor/pipeline-parallel layout, built from the full single-device model.

Every rank loads the full weights (the checkpoint is consolidated whatever its training layout), then keeps its
pipeline stage, tensor-parallel shards included (neox.parallel's PipelineStage: the stages training's PipelineModule
would cut). One forward: every stage runs its layers on its own KV cache slots, the last stage computes the logits
of the last position and gathers the vocabulary shards over tp. Ranks without logits return None and adopt the
tokens sampled on `sampling_rank` (decode.TokenSync).

With no topology it is the single-device model whose forward skips the head on every position but the
last (a 32-token prompt at batch 8 would otherwise spend a tenth of a second of a 162M model's head on
logits nobody reads).
"""
from __future__ import annotations

import torch
from torch import nn

from neox.model import GPTNeoX, KVCache
from neox.parallel.stage_forward import PipelineStage
from neox.parallel.topology import Topology


class ParallelDecoder(nn.Module):
    def __init__(self, model: GPTNeoX, topo: Topology | None = None, *, partition_method: str | None = None):
        super().__init__()
        self.cfg = model.cfg
        self.stage = PipelineStage(model, topo, partition_method)
        self.layers = self.stage.blocks_held
        self.sampling_rank = 0
        self.replica, self.replicas, self.replica_group = 0, 1, None
        if topo is not None:
            # Each data-parallel replica decodes its own batches: its ranks adopt its last stage's tp rank 0 tokens.
            self.sampling_rank = topo.ds_topology.get_rank(pipe=topo.pp_size - 1, data=topo.dp_rank, model=0)
            self.replica, self.replicas, self.replica_group = topo.dp_rank, topo.dp_size, topo.model_group

    def new_cache(self, max_length: int) -> KVCache:
        return KVCache(max_length)

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor | None:
        """Full-vocabulary logits [batch, 1, padded_vocab] of the last position on the last stage, else None."""
        logits = self.stage(tokens, position_ids, attention_mask, cache, last_position_only=True)
        return None if logits is None else self.stage.full_vocab(logits)

"""ShardedRunner: the Runner of a model split over tensor-parallel ranks and/or pipeline stages.

The model runs through neox.parallel's PipelineStage (the stages training's PipelineModule would cut, tp shards as
training makes them); every rank of a replica calls it with the same batch. The last stage's vocab-parallel logits
are gathered over tp and broadcast to every stage, so every rank of the replica holds the same full logits and
makes the same decisions (greedy tokens, stop strings). Each stage keeps a KV cache for its own layers. Requests are
divided over the data-parallel groups of the topology.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from neox.model import GPTNeoX, KVCache
from neox.parallel.stage_forward import PipelineStage
from neox.parallel.topology import Topology


class ShardedRunner:
    def __init__(self, model: GPTNeoX, topo: Topology, vocab_size: int, *, partition_method: str,
                 max_length: int | None = None, device: torch.device | str = "cpu"):
        self.topo = topo
        self.vocab_size = int(vocab_size)
        self.max_length = int(max_length if max_length is not None else model.cfg.seq_length)
        self.device = torch.device(device)
        self.dp_rank, self.dp_size, self.dp_group = topo.dp_rank, topo.dp_size, topo.dp_group
        # Only this stage's modules stay referenced (and move to the device); the others go with the full model.
        self.stage = PipelineStage(model, topo, partition_method).eval().to(self.device)

    @torch.inference_mode()
    def logits(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        tokens = tokens.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        local = self.stage(tokens, attention_mask=attention_mask, cache=cache)
        if local is not None:
            out = self.stage.full_vocab(local)[..., : self.vocab_size].float().contiguous()
        else:
            out = torch.empty(*tokens.shape, self.vocab_size, dtype=torch.float32, device=self.device)
        if self.stage.pipe_group is not None:
            dist.broadcast(out, src=self.stage.last_stage_rank, group=self.stage.pipe_group)
        return out

    def new_cache(self, max_length: int) -> KVCache:
        return KVCache(max_length)

"""ShardedRunner: the Runner of a model split over tensor-parallel ranks and/or pipeline stages.

The single-device GPTNeoX is sharded by neox.parallel (apply_tensor_parallel) and cut into contiguous runs of
blocks per pipeline stage (balanced by layer count). A forward runs stage by stage: the first stage embeds,
each stage sends its activations to the next (point-to-point, inside one tp x pp model replica), the last
stage's vocab-parallel logits are gathered over tp and broadcast to every stage, so every rank of the replica
holds the same full logits and makes the same decisions (greedy tokens, stop strings). Each stage keeps a KV
cache for its own layers. Requests are divided over the data-parallel groups of the topology.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from neox.model import GPTNeoX, KVCache
from neox.parallel.parallelize import apply_tensor_parallel
from neox.parallel.topology import Topology


def stage_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous layer ranges, the first num_layers % num_stages stages one layer longer."""
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for stage in range(num_stages):
        bounds.append(bounds[-1] + base + (1 if stage < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]


class ShardedRunner:
    def __init__(self, model: GPTNeoX, topo: Topology, vocab_size: int, *, max_length: int | None = None,
                 device: torch.device | str = "cpu"):
        self.topo = topo
        self.vocab_size = int(vocab_size)
        self.max_length = int(max_length if max_length is not None else model.cfg.seq_length)
        self.device = torch.device(device)
        self.dp_rank, self.dp_size, self.dp_group = topo.dp_rank, topo.dp_size, topo.dp_group
        self.hidden_size = model.cfg.hidden_size
        model = apply_tensor_parallel(model, topo).eval()
        self.layers = stage_layers(len(model.blocks), topo.pp_size)[topo.pp_rank]
        # Only this stage's blocks stay referenced; the others are freed with the full model.
        self.blocks = nn.ModuleList(model.blocks[i] for i in self.layers).to(self.device)
        self.embedding = model.embedding.to(self.device) if topo.is_first_stage else None
        self.final_norm = model.final_norm.to(self.device) if topo.is_last_stage else None
        self.head = model.head.to(self.device) if topo.is_last_stage else None
        self.dtype = next(self.blocks.parameters()).dtype
        coords = {"data": topo.dp_rank, "model": topo.tp_rank}
        stage_rank = [topo.ds_topology.get_rank(pipe=s, **coords) for s in range(topo.pp_size)]
        self.previous = stage_rank[topo.pp_rank - 1] if not topo.is_first_stage else None
        self.next = stage_rank[topo.pp_rank + 1] if not topo.is_last_stage else None
        self.last_stage_rank = stage_rank[-1]
        self.pipe_group = topo.grid.get_pipe_parallel_group() if topo.pp_size > 1 else None

    @torch.inference_mode()
    def logits(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        tokens = tokens.to(self.device)
        b, s = tokens.shape
        start = cache.length if cache is not None else 0
        position_ids = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start : start + s]
        mask = GPTNeoX._attention_mask(attention_mask, s, start, self.device)
        if self.embedding is not None:
            x = self.embedding(tokens, position_ids, start)
        else:
            x = torch.empty(b, s, self.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(x, src=self.previous)
        for block in self.blocks:
            x = block(x, position_ids, mask, cache)
        if cache is not None:
            cache.advance(s)
        if self.next is not None:
            dist.send(x.contiguous(), dst=self.next)
            out = torch.empty(b, s, self.vocab_size, dtype=torch.float32, device=self.device)
        else:
            out = self._full_logits(self.head(self.final_norm(x)))
        if self.pipe_group is not None:
            dist.broadcast(out, src=self.last_stage_rank, group=self.pipe_group)
        return out

    def _full_logits(self, local: torch.Tensor) -> torch.Tensor:
        if self.topo.tp_size > 1:
            pieces = [torch.empty_like(local) for _ in range(self.topo.tp_size)]
            dist.all_gather(pieces, local.contiguous(), group=self.topo.tp_group)
            local = torch.cat(pieces, dim=-1)
        return local[..., : self.vocab_size].float().contiguous()

    def new_cache(self, max_length: int) -> KVCache:
        return KVCache(max_length)

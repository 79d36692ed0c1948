"""The decodable model at a tensor/pipeline-parallel layout, built from the full single-device model.

Every rank loads the full weights (the checkpoint is consolidated whatever its training layout), then keeps its
tensor-parallel shard (neox.parallel.apply_tensor_parallel) of its pipeline stage's blocks. One forward:
stage 0 embeds, each stage runs its blocks on its own KV cache slots and sends the hidden states on, the last
stage computes the logits of the last position and gathers the vocabulary shards over tp. Ranks without logits
return None and adopt the tokens sampled on `sampling_rank` (decode.TokenSync).

With no topology it is the single-device model whose forward skips the head on every position but the
last (a 32-token prompt at batch 8 would otherwise spend a tenth of a second of a 162M model's head on
logits nobody reads).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from neox.model import GPTNeoX, KVCache
from neox.parallel.parallelize import apply_tensor_parallel
from neox.parallel.topology import Topology, check_model_divides


def stage_layers(num_layers: int, stages: int, stage: int) -> range:
    """Blocks of `stage` when num_layers are split as evenly as possible (earlier stages take the remainder)."""
    base, extra = divmod(num_layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


class ParallelDecoder(nn.Module):
    def __init__(self, model: GPTNeoX, topo: Topology | None = None):
        super().__init__()
        self.topo = topo
        self.cfg = model.cfg
        self.tp_size = topo.tp_size if topo is not None else 1
        self.prev_rank = self.next_rank = None
        self.sampling_rank = 0
        self.replica, self.replicas, self.replica_group = 0, 1, None
        self.layers = range(model.cfg.num_layers)
        if topo is not None:
            check_model_divides(model.cfg, topo.tp_size, topo.pp_size)
            if topo.tp_size > 1:
                apply_tensor_parallel(model, topo)
            self.layers = stage_layers(model.cfg.num_layers, topo.pp_size, topo.pp_rank)
            model.blocks = nn.ModuleList(model.blocks[i] for i in self.layers)  # blocks keep their cache index
            grid = topo.ds_topology
            here = dict(data=topo.dp_rank, model=topo.tp_rank)
            self.prev_rank = None if topo.is_first_stage else grid.get_rank(pipe=topo.pp_rank - 1, **here)
            self.next_rank = None if topo.is_last_stage else grid.get_rank(pipe=topo.pp_rank + 1, **here)
            # Each data-parallel replica decodes its own batches: its ranks adopt its last stage's tp rank 0 tokens.
            self.sampling_rank = grid.get_rank(pipe=topo.pp_size - 1, data=topo.dp_rank, model=0)
            self.replica, self.replicas, self.replica_group = topo.dp_rank, topo.dp_size, topo.model_group
        self.model = model

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
        model = self.model
        start = cache.length if cache is not None else 0
        b, s = tokens.shape
        if model.cfg.pos_emb == "learned" and start + s > model.cfg.max_positions:
            raise ValueError(f"{start + s} positions exceed the learned position table "
                             f"(max_position_embeddings = {model.cfg.max_positions})")
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start : start + s]
        mask = GPTNeoX._attention_mask(attention_mask, s, start, tokens.device)
        if self.prev_rank is None:
            x = model.embedding(tokens, position_ids, start)
        else:
            param = next(model.final_norm.parameters(), None)
            dtype = param.dtype if param is not None else torch.float32
            x = torch.empty((b, s, self.cfg.hidden_size), dtype=dtype, device=tokens.device)
            dist.recv(x, self.prev_rank)
        for block in model.blocks:
            x = block(x, position_ids, mask, cache)
        if cache is not None:
            cache.advance(s)
        if self.next_rank is not None:
            dist.send(x.contiguous(), self.next_rank)
            return None
        logits = model.head(model.final_norm(x[:, -1:]))
        if self.tp_size > 1:
            shards = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(shards, logits.contiguous(), group=self.topo.tp_group)
            logits = torch.cat(shards, dim=-1)
        return logits

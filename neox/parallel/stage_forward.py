"""One pipeline stage's forward, for inference: evaluation (neox/eval/parallel_runner.py) and generation
(neox/generate/parallel_model.py) run the model split tp x pp ways through this one module.

The stage holds the layers training's PipelineModule gives it (neox/parallel/pipeline.py cuts them, with
neox/parallel/stages.py), tensor-parallelised as training shards them. It runs without DeepSpeed's engine
(inference has no backward and no micro-batch schedule): the stage holding the embedding embeds, each stage runs its
layers and sends the hidden states to the next (point-to-point inside the model replica), the stage holding the head
returns its vocab-parallel logits, which full_vocab gathers over tp. Without a topology it is the whole model on one
rank, through the same forward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from neox.model import GPTNeoX, KVCache
from neox.parallel.parallelize import apply_tensor_parallel
from neox.parallel.pipeline import pipeline_layers, stage_bounds
from neox.parallel.topology import Topology


class PipelineStage(nn.Module):
    """This rank's stage of a model split tp x pp ways (tensor shards by apply_tensor_parallel, the layers training's
    PipelineModule gives this stage), or with topo None the whole model on one rank. The full model passed in may
    be dropped afterwards: only this stage's modules stay referenced."""

    def __init__(self, model: GPTNeoX, topo: Topology | None, partition_method: str | None,
                 parallelised: bool = False):
        """parallelised: `model` is already tensor-parallel (a training engine's, whose stage this runs)."""
        super().__init__()
        if topo is not None and partition_method is None:
            raise ValueError("a pipeline stage needs pipe_partition_method: the stages are cut as training cuts them")
        self.cfg = model.cfg
        self.topo = topo
        self.dtype = next(model.parameters()).dtype
        num_blocks = len(model.blocks)
        if topo is None:
            bounds = [0, num_blocks + 3]
        else:
            if not parallelised:
                apply_tensor_parallel(model, topo)
            bounds = stage_bounds(pipeline_layers(model, topo), topo.pp_size, partition_method)
        stage = topo.pp_rank if topo is not None else 0
        # Pipeline layers: 0 embedding, 1..N the blocks, N+1 the final norm, N+2 the head.
        self.layers = range(bounds[stage], bounds[stage + 1])
        self.blocks_held = range(max(self.layers.start, 1) - 1, min(self.layers.stop - 1, num_blocks))
        self.embedding = model.embedding if 0 in self.layers else None
        self.blocks = nn.ModuleList(model.blocks[i] for i in self.blocks_held)  # a block keeps its cache index
        self.final_norm = model.final_norm if num_blocks + 1 in self.layers else None
        self.head = model.head if num_blocks + 2 in self.layers else None
        self.prev_rank = self.next_rank = None
        self.last_stage_rank, self.pipe_group = 0, None
        if topo is not None:
            grid, here = topo.ds_topology, {"data": topo.dp_rank, "model": topo.tp_rank}
            stage_ranks = [grid.get_rank(pipe=s, **here) for s in range(topo.pp_size)]
            self.prev_rank = stage_ranks[stage - 1] if stage > 0 else None
            self.next_rank = stage_ranks[stage + 1] if stage < topo.pp_size - 1 else None
            self.last_stage_rank = stage_ranks[-1]
            self.pipe_group = topo.grid.get_pipe_parallel_group() if topo.pp_size > 1 else None

    @property
    def tp_size(self) -> int:
        return self.topo.tp_size if self.topo is not None else 1

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                last_position_only: bool = False) -> torch.Tensor | None:
        """This stage's part of one forward of its replica (every stage of it calls this with the same tokens):
        the stage holding the head returns its logits (this tp rank's vocabulary shard; only the last position's
        with last_position_only), the others send their hidden states on and return None. Positions and the
        attention mask follow GPTNeoX.forward; with a cache, each stage appends its own layers' keys and values."""
        cfg = self.cfg
        start = cache.length if cache is not None else 0
        b, s = tokens.shape
        if cfg.pos_emb == "learned" and start + s + cfg.opt_pos_emb_offset > cfg.max_positions:
            raise ValueError(f"{start + s} positions (+ opt_pos_emb_offset {cfg.opt_pos_emb_offset}) exceed the "
                             f"learned position table (max_position_embeddings = {cfg.max_positions})")
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start : start + s]
        mask = GPTNeoX._attention_mask(attention_mask, s, start, tokens.device)
        if self.embedding is not None:
            x = self.embedding(tokens, position_ids, start)
        else:
            x = torch.empty((b, s, cfg.hidden_size), dtype=self.dtype, device=tokens.device)
            dist.recv(x, self.prev_rank)
        for block in self.blocks:
            x = block(x, position_ids, mask, cache)
        if cache is not None:
            cache.advance(s)
        if last_position_only and self.head is not None:
            x = x[:, -1:]  # the norm and the head act per position: only the last one's logits are read
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.head is None:
            dist.send(x.contiguous(), self.next_rank)
            return None
        return self.head(x)

    def full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's vocab-parallel logits gathered over tp: the padded vocabulary, on every tp rank."""
        if self.tp_size == 1:
            return logits
        shards = [torch.empty_like(logits) for _ in range(self.tp_size)]
        dist.all_gather(shards, logits.contiguous(), group=self.topo.tp_group)
        return torch.cat(shards, dim=-1)

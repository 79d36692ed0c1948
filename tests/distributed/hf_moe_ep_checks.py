"""Per-rank function for tests/e2e/test_hf_moe_convert.py (module level: spawned ranks import it)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def expert_parallel_logits(neox_dirs: list[str], batches: list[torch.Tensor]) -> dict:
    """Each converted model on an expert-parallel group of all the ranks (ep = world size), rank r feeding batches[r]:
    its logits for that batch, the experts it holds (checked by the caller against the whole model's), and how many
    token rows its MoE blocks sent to each rank (so the caller sees tokens really crossed ranks)."""
    from neox.checkpoint import load_model
    from neox.parallel.expert_parallel import apply_expert_parallel
    from neox.parallel.topology import build_topology

    rank, world = dist.get_rank(), dist.get_world_size()
    topo = build_topology(1, 0, ep_size=world)
    out = {}
    for neox_dir in map(Path, neox_dirs):
        model, _, _ = load_model(neox_dir)
        blocks = apply_expert_parallel(model, topo)
        sent = torch.zeros(world, dtype=torch.int64)
        for dispatcher in {m.dispatcher for m in model.modules() if hasattr(m, "dispatcher")}:
            dispatcher.dispatch = _counting(dispatcher.dispatch, sent)
        experts = {name: p.detach().clone() for name, p in model.named_parameters()
                   if getattr(p, "neox_expert_parallel", False)}
        with torch.no_grad():
            logits = model.eval()(batches[rank])
        out[neox_dir.name] = {"ep_rank": topo.ep_rank, "blocks": blocks, "experts": experts, "logits": logits,
                              "sent": sent.tolist()}
    return out


def _counting(dispatch, sent: torch.Tensor):
    """dispatch, adding the rows each call sends to every rank of the group to `sent`."""
    def counted(*args, **kwargs):
        exchanged = dispatch(*args, **kwargs)
        sent.add_(torch.tensor(exchanged.send_splits))
        return exchanged
    return counted

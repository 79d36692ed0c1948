"""Per-rank dropout seeds for a dp x tp x pp layout."""
from __future__ import annotations

from neox.parallel.topology import Topology


def dropout_seed(base_seed: int, topo: Topology) -> int:
    """Identical on the tp ranks of one replica, whose activations are replicated and must stay so (every tp rank
    draws the same number of values, so their streams stay in step); different across dp replicas, so each sees
    its own masks, and across pipeline stages, whose layers would otherwise share masks. Stage 0 keeps the
    single-stage seed, base + 1000 x dp rank."""
    return base_seed + 1000 * topo.dp_rank + 1_000_003 * topo.pp_rank

"""The engine a training run builds for a config, for rank functions that step it directly (module level: spawned
ranks import it): the run's topology, its initial model (the meta-device structure when ranks hold different shards)
and build_train_engine, as neox/train/run.py does."""
from __future__ import annotations

import torch


def trainer_engine(cfg, objective, seed: int = 0):
    """(topology, train engine in training mode) of this config on this rank. Collective."""
    from neox.parallel.topology import topology_for
    from neox.train.engine import build_train_engine, initial_model

    topo = topology_for(cfg.parallel)
    torch.manual_seed(seed)
    train_engine = build_train_engine(cfg, initial_model(cfg), torch.device("cpu"), topo, objective)
    train_engine.engine.train()
    return topo, train_engine

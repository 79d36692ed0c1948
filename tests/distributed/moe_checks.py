"""Rank functions for tests/distributed/test_moe_parallel.py (module level: spawned ranks import them).

One 2-rank world runs everything, so the test pays for one spawn: the tensor-parallel MoE block against the
single-device model (reusing tp_checks' harness), the meta-device build, and three real DeepSpeed training steps
with gradient accumulation 2 -- tp2, a two-stage pipeline, and dp2 under ZeRO-1 -- each against a plain-torch
reference that adds the routers' auxiliary losses to the loss explicitly."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from neox.model import GPTNeoX, causal_lm_loss
from neox.model.moe import load_balancing_loss, moe_blocks, z_loss
from tests.distributed import tp_checks

VOCAB, SEQ, MICRO, ACCUM = 64, 8, 2, 2
MOE = {"moe_num_experts": 4, "moe_top_k": 2, "moe_router_type": "topk", "activation": "swiglu",
       "moe_intermediate_size": 32, "moe_aux_loss_coeff": 0.5, "moe_z_loss_coeff": 0.05, "moe_norm_topk_prob": True,
       "moe_num_shared_experts": 1, "moe_shared_expert_gate": True, "use_bias_in_mlp": False}
# tp_checks' 2-layer model with MoE layers: top-2 gated experts with a gated shared expert and both losses, and
# gpt-neox's Sinkhorn top-1 router on every other layer with token dropping and DeepSpeed's activation checkpointing.
TP_VARIANTS = [
    MOE,
    {"moe_num_experts": 4, "moe_top_k": 1, "moe_router_type": "sinkhorn", "moe_expert_interval": 2,
     "moe_capacity_factor": 1.0, "moe_intermediate_size": 48, "moe_aux_loss_coeff": 0.1, "num_layers": 3,
     "checkpoint_activations": True},
]
ENGINE_MODEL = {"padded_vocab_size": VOCAB, "num_layers": 2, "hidden_size": 16, "num_attention_heads": 2,
                "seq_length": SEQ, "max_position_embeddings": SEQ, "pos_emb": "rotary", "hidden_dropout": 0.0,
                "attention_dropout": 0.0, "num_gpus": 2, "train_micro_batch_size_per_gpu": MICRO,
                "gradient_accumulation_steps": ACCUM, "train_iters": 2, "lr_decay_style": "constant",
                "optimizer": {"type": "Adam", "params": {"lr": 1.0e-3}}, "gradient_clipping": 1.0, **MOE}
# In this order: a data-parallel engine built after a pipeline one in the same process finds DeepSpeed's global
# model-parallel state left behind by it.
LAYOUTS = {
    "dp2-zero1": {"zero_optimization": {"stage": 1}},
    "tp2": {"model_parallel_size": 2},
    "pp2": {"pipe_parallel_size": 2, "pipe_partition_method": "type:transformer"},
}

# Expert parallelism composed with tp and with a pipeline (4 ranks: ep2 inside dp2); ep alone trains through
# `deepy train` in tests/e2e/test_moe_expert_parallel.py.
EP_LAYOUTS = {
    "tp2xep2": {"num_gpus": 4, "model_parallel_size": 2, "moe_expert_parallel_size": 2},
    "pp2xep2-zero1": {"num_gpus": 4, "pipe_parallel_size": 2, "pipe_partition_method": "type:transformer",
                      "moe_expert_parallel_size": 2, "zero_optimization": {"stage": 1}},
}


def _batches() -> list[dict[str, torch.Tensor]]:
    """The same micro-batches on every rank (dp2 then averages two identical halves)."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(ACCUM):
        text = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=gen)
        out.append({"tokens": text[:, :-1], "labels": text[:, 1:], "loss_mask": torch.ones(MICRO, SEQ),
                    "position_ids": torch.arange(SEQ).expand(MICRO, SEQ)})
    return out


def reference_step(cfg_model) -> dict:
    """Plain torch: mean over the micro-batches of (LM loss + the aux losses, added explicitly from the routers'
    outputs) on a model whose blocks attach nothing: its LM loss, global gradient norm and mean router losses."""
    torch.manual_seed(5)
    model = GPTNeoX(dataclasses.replace(cfg_model, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=0.0)).train()
    routings: list = []
    for _, block in moe_blocks(model):
        block.router.register_forward_hook(lambda module, args, routing: routings.append(routing))
    lm_losses, balances, zs = [], [], []
    for batch in _batches():
        routings.clear()
        lm = causal_lm_loss(model(batch["tokens"], batch["position_ids"]), batch["labels"], batch["loss_mask"])
        balance = [load_balancing_loss(r.probs, r.experts) for r in routings]
        z = [z_loss(r.logits) for r in routings]
        aux = sum(cfg_model.moe_aux_loss_coeff * b + cfg_model.moe_z_loss_coeff * zz for b, zz in zip(balance, z))
        ((lm + aux) / ACCUM).backward()
        lm_losses.append(float(lm))
        balances += [float(b) for b in balance]
        zs += [float(zz) for zz in z]
    squares = sum(p.grad.double().square().sum() for p in model.parameters())
    return {"loss": sum(lm_losses) / ACCUM, "grad_norm": float(squares.sqrt()),
            "moe_aux_loss": sum(balances) / len(balances), "moe_z_loss": sum(zs) / len(zs)}


def _engine_step(work: Path, name: str, layout: dict) -> dict:
    from neox.parallel.testing import shared_config
    from neox.parallel.topology import topology_for
    from neox.train.engine import build_train_engine
    from neox.train.moe_metrics import MoEMetrics
    from neox.train.objectives import LanguageModelObjective

    cfg = shared_config(work / f"{name}.yml", {**ENGINE_MODEL, **layout}, VOCAB)
    torch.manual_seed(5)
    model = GPTNeoX(cfg.model)
    topo = topology_for(cfg.parallel)
    engine = build_train_engine(cfg, model, torch.device("cpu"), topo, LanguageModelObjective())
    loss, norm = engine.step(iter(_batches()), ACCUM, 1.0e-3)
    metrics = MoEMetrics(model, cfg.model, topo.tp_rank, torch.device("cpu")).collect()
    return {"loss": float(loss), "grad_norm": norm, "metrics": metrics, "reference": reference_step(cfg.model)}


def moe_layouts(work: str) -> dict:
    return {
        "tp_model": tp_checks.full_model_tp(TP_VARIANTS),
        "meta": tp_checks.meta_build_matches_full_build(TP_VARIANTS),
        **{name: _engine_step(Path(work), name, layout) for name, layout in LAYOUTS.items()},
    }


def moe_ep_layouts(work: str) -> dict:
    return {name: _engine_step(Path(work), name, layout) for name, layout in EP_LAYOUTS.items()}

"""Per-rank functions for tests/distributed/test_sequence_parallel.py (module level: spawned ranks import them), and
the single-process training reference they are compared with.

Everything runs in one 4-rank launch: tp2 x dp2 for the layer checks and the tp2 layouts, tp2 x pp2 for the pipeline.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from neox.config import load_config
from neox.model import GPTNeoX, causal_lm_loss
from neox.parallel.sequence import (gather_from_sequence, gathered_linear, reduce_scatter_to_sequence,
                                    scatter_to_sequence)
from tests.distributed.tp_checks import VOCAB as LAYER_VOCAB
from tests.distributed.tp_checks import model_cfg
from tests.unit.test_plan_estimates import saved_bytes

VOCAB = 128
SEQ = 16
GLOBAL_BATCH = 4
STEPS = 4
LR = 1e-2
TRAIN = {"padded_vocab_size": VOCAB, "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
         "seq_length": SEQ, "max_position_embeddings": SEQ, "pos_emb": "rotary", "norm": "layernorm",
         "hidden_dropout": 0.0, "attention_dropout": 0.0, "weight_decay": 0.0, "gradient_clipping": 1.0,
         "optimizer": {"type": "Adam", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1.0e-8}},
         "lr_decay_style": "constant", "train_iters": STEPS, "use_bias_in_attn_linear": False}


def _gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t, group=group)
    return t


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def everything(work: str, variants: dict[str, dict], dropout_cfg: dict, layouts: dict[str, dict],
               lora: dict | None = None) -> dict:
    """All checks of the launch; rank 0's results (the others return theirs too, for the parent to see agreement).
    lora: the LoRA checks of tests/distributed/lora_checks.py, which share this launch ({"variants", "first",
    "resumed"})."""
    from neox.parallel.topology import build_topology
    from tests.distributed import lora_checks

    topo = build_topology(2, 0)
    out = {"collectives": collectives(topo.tp_group), "models": {n: model_parity(topo, c) for n, c in variants.items()},
           "dropout": dropout(topo, dropout_cfg), "saved": saved_activations(topo), "indivisible": indivisible(topo)}
    out["training"] = train_layouts(work, layouts)
    if lora is not None:
        out["lora"] = {"layers": {n: lora_checks.layers(topo, c) for n, c in lora["variants"].items()},
                       "training": lora_checks.training(work, lora["first"], *lora["resumed"])}
    return out


def collectives(group) -> dict:
    """Each sequence-parallel function's forward and backward against the same sums written with all_reduce and
    chunk on full tensors (the tensor-parallel math they replace)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(100 + rank)  # every rank its own input and upstream gradient
    x = torch.randn(2, 6, 5, requires_grad=True)
    w_shard, w_full = torch.randn(2, 6 // size, 5), torch.randn(2, 6, 5)
    errs = {}

    y = scatter_to_sequence(x, group)
    (y * w_shard).sum().backward()
    errs["scatter_fwd"] = _max_err(y, x.chunk(size, 1)[rank])
    errs["scatter_bwd"] = _max_err(x.grad, torch.cat(_gather(w_shard, group), 1))

    x.grad = None
    y = reduce_scatter_to_sequence(x, group)
    (y * w_shard).sum().backward()
    errs["reduce_scatter_fwd"] = _max_err(y, _all_reduce(x, group).chunk(size, 1)[rank])
    errs["reduce_scatter_bwd"] = _max_err(x.grad, torch.cat(_gather(w_shard, group), 1))

    shard = torch.randn(2, 3, 5, requires_grad=True)
    y = gather_from_sequence(shard, group)
    (y * w_full).sum().backward()
    errs["gather_fwd"] = _max_err(y, torch.cat(_gather(shard.detach(), group), 1))
    errs["gather_bwd"] = _max_err(shard.grad, _all_reduce(w_full, group).chunk(size, 1)[rank])

    # gathered_linear against F.linear on the all-gathered input (autograd's own backward), input gradient summed
    # over the ranks and cut to this rank's positions; and it keeps only the shard for backward.
    weight = torch.randn(4, 5, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = gathered_linear(shard, weight, bias, group)
    upstream = torch.randn(2, 6, 4)
    shard.grad = None
    (y * upstream).sum().backward()
    full = torch.cat(_gather(shard.detach(), group), 1).requires_grad_(True)
    ref_w, ref_b = weight.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    ref = F.linear(full, ref_w, ref_b)
    (ref * upstream).sum().backward()
    errs["linear_fwd"] = _max_err(y, ref)
    errs["linear_bwd_x"] = _max_err(shard.grad, _all_reduce(full.grad, group).chunk(size, 1)[rank])
    errs["linear_bwd_w"] = _max_err(weight.grad, ref_w.grad)
    errs["linear_bwd_b"] = _max_err(bias.grad, ref_b.grad)
    return {"errs": errs, "linear_saved": sorted(saved), "shard_numel": shard.numel(), "weight_numel": weight.numel()}


def _tp_model(topo, cfg, sequence_parallel: bool):
    from neox.parallel.activation_checkpoint import install_activation_checkpointing
    from neox.parallel.parallelize import apply_tensor_parallel

    torch.manual_seed(3)
    model = GPTNeoX(cfg)
    apply_tensor_parallel(model, topo, row_parallel_head=cfg.row_parallel_head, sequence_parallel=sequence_parallel)
    install_activation_checkpointing(model, cfg, topo, sequence_parallel)
    return model


def model_parity(topo, changes: dict) -> dict:
    """Loss and every gradient (merged over tp by the sharding plan) of tp2 + sequence_parallel against one device
    and against plain tp2; the replicated gradients come out equal on both tp ranks."""
    from neox.parallel.parallelize import lm_loss_fn
    from neox.parallel.sharding import config_overrides, merge_state_dicts

    cfg = model_cfg(**changes)
    overrides = config_overrides(cfg)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, LAYER_VOCAB, (2, 16), generator=gen)
    labels = torch.randint(0, LAYER_VOCAB, (2, 16), generator=gen)
    mask = (torch.rand(2, 16, generator=gen) > 0.2).float()
    torch.manual_seed(3)
    reference = GPTNeoX(dataclasses.replace(cfg, checkpoint_activations=False))
    ref_loss = causal_lm_loss(reference(tokens), labels, mask)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    result = {"ref_loss": ref_loss.item()}
    for name, sp in (("tp", False), ("sp", True)):
        model = _tp_model(topo, cfg, sp)
        loss = lm_loss_fn(topo, LAYER_VOCAB, cfg.row_parallel_head)(model(tokens), labels, mask)
        loss.backward()
        local = {n: p.grad.clone() for n, p in model.named_parameters()}
        gathered: list = [None] * topo.tp_size
        dist.all_gather_object(gathered, local, group=topo.tp_group)
        merged = merge_state_dicts(gathered, overrides)  # raises if a replicated gradient differs between ranks
        result[f"{name}_loss"] = loss.item()
        result[f"{name}_grad_err"] = max(_max_err(merged[n], g) for n, g in ref_grads.items())
        result[f"{name}_grads"] = merged
    result["sp_vs_tp_grad_err"] = max(_max_err(result["sp_grads"][n], g) for n, g in result["tp_grads"].items())
    del result["sp_grads"], result["tp_grads"]
    return result


def dropout(topo, changes: dict) -> dict:
    """Hidden dropout on the sequence shards: the tp ranks' masks differ (each rank's positions their own), the
    default streams stay in step, the same default-stream state redraws the same masks (what a resume restores),
    and activation recomputation reproduces the gradients of the plain forward."""
    from neox.parallel.parallelize import lm_loss_fn
    from neox.parallel.rng import dropout_seed

    cfg = model_cfg(**changes)
    model = _tp_model(topo, cfg, True)
    tokens = torch.randint(0, LAYER_VOCAB, (2, 16), generator=torch.Generator().manual_seed(8))
    loss_fn = lm_loss_fn(topo, LAYER_VOCAB)

    # One vector at every position makes every position's (and so both ranks') block output the same without
    # dropout; with hidden dropout alone (attention dropout off here), the masks are all that tells the ranks apart.
    block = model.blocks[0]
    block.attention.dropout = 0.0
    x = torch.randn(1, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(9)).expand(2, 8, -1)
    with torch.no_grad():
        plain = block.eval()(x)
        torch.manual_seed(dropout_seed(1234, topo))
        dropped = block.train()(x)
    block.attention.dropout = cfg.attention_dropout
    model.train()

    def run(checkpointed: bool) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        model.zero_grad()
        model.cfg.checkpoint_activations = checkpointed
        torch.manual_seed(dropout_seed(1234, topo))
        loss = loss_fn(model(tokens), tokens, None)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], torch.get_rng_state()

    plain_loss, plain_grads, rng = run(False)
    again_loss, again_grads, _ = run(False)
    ckpt_loss, ckpt_grads, _ = run(True)
    model.cfg.checkpoint_activations = False
    return {"plain_rank_diff": _max_err(*_gather(plain, topo.tp_group)),
            "dropped_rank_diff": _max_err(*_gather(dropped, topo.tp_group)),
            "dropout_effect": _max_err(plain, dropped),
            "rng_in_step": torch.equal(*_gather(rng, topo.tp_group)),
            "same_state_same_loss": torch.equal(plain_loss, again_loss)
            and all(torch.equal(a, b) for a, b in zip(plain_grads, again_grads)),
            "recompute_err": max(_max_err(a, b) for a, b in zip(plain_grads, ckpt_grads)),
            "recompute_loss_equal": torch.equal(plain_loss, ckpt_loss)}


def saved_activations(topo) -> dict:
    """Bytes autograd keeps for one block's backward, per token per hidden unit (weights excluded), with and without
    sequence parallelism: what neox/plan/memory.py counts."""
    from neox.plan.memory import layer_activation_elements

    out = {}
    for variant, changes in {"pythia": {"gpt_j_residual": True, "rotary_pct": 0.25},
                             "llama": {"num_kv_heads": 2, "activation": "swiglu", "norm": "rmsnorm",
                                       "use_bias_in_norms": False}}.items():
        cfg = model_cfg(seq_length=32, **changes)
        for sp in (False, True):
            model = _tp_model(topo, cfg, sp).train()
            x = torch.randn(4, 32 // topo.tp_size if sp else 32, cfg.hidden_size, requires_grad=True)
            saved = saved_bytes(model, lambda: model.blocks[0](x, torch.arange(32).expand(4, 32)))
            measured = saved / (4 * 32 * cfg.hidden_size * 4)
            planned = layer_activation_elements(cfg, tp=topo.tp_size, sequence_parallel=sp)
            out[f"{variant}-{'sp' if sp else 'tp'}"] = (measured, planned)
    return out


def indivisible(topo) -> str:
    model = _tp_model(topo, model_cfg(), True)
    try:
        model(torch.zeros(1, 15, dtype=torch.long))
    except ValueError as err:
        return str(err)
    return ""


def global_batches() -> list[dict[str, torch.Tensor]]:
    """Two batches in turn (random tokens: nothing to learn but the batch itself)."""
    gen = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(2):
        tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
        batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                        "position_ids": torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ).contiguous(),
                        "loss_mask": torch.ones(GLOBAL_BATCH, SEQ)})
    return [batches[step % 2] for step in range(STEPS)]


def _slice(batch: dict[str, torch.Tensor], start: int, size: int) -> dict[str, torch.Tensor]:
    return {k: v[start:start + size] for k, v in batch.items()}


def train_layouts(work: str, layouts: dict[str, dict]) -> dict[str, dict]:
    """(loss, grad_norm) of each step of each layout, through ParallelTrainEngine as training builds it, and the
    trained model's state dict (what a checkpoint holds) where it is one module (no pipeline)."""
    from neox.parallel.engine import ParallelTrainEngine
    from neox.train.objectives import LanguageModelObjective
    from neox.parallel.materialize import meta_model
    from neox.parallel.runtime import all_reduce_mean
    from neox.parallel.topology import build_topology

    rank = dist.get_rank()
    out = {}
    for name, extra in layouts.items():
        path = Path(work) / f"{name}.yml"
        if rank == 0:
            path.write_text(yaml.safe_dump({**TRAIN, "num_gpus": 4, **extra}))
        dist.barrier()
        cfg = load_config([path], vocab_size=VOCAB)
        topo = build_topology(cfg.parallel.model_parallel_size, cfg.parallel.pipe_parallel_size)
        torch.manual_seed(0)
        engine = ParallelTrainEngine(cfg, meta_model(cfg.model), torch.device("cpu"), topo,
                                     LanguageModelObjective())
        engine.engine.train()
        micro, accum = cfg.train.train_micro_batch_size_per_gpu, cfg.train.gradient_accumulation_steps
        records = []
        for batch in global_batches():
            mine = _slice(batch, topo.dp_rank * micro * accum, micro * accum)
            loss, grad_norm = engine.step(iter([_slice(mine, i * micro, micro) for i in range(accum)]), accum, LR)
            records.append((float(all_reduce_mean(loss)), grad_norm))
        state = None if topo.use_pipeline else {k: v.clone() for k, v in engine.engine.module.state_dict().items()}
        out[name] = {"records": records, "state": state}
    return out


def reference_training(extra: dict) -> list[tuple[float, float]]:
    """The same steps on one process: the single-device model, the configured optimizer, the engines' clipping."""
    import tempfile

    from neox.optim import configured_optimizer

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "single.yml"
        path.write_text(yaml.safe_dump({**TRAIN, "num_gpus": 1, **extra}))
        cfg = load_config([path], vocab_size=VOCAB)
    torch.manual_seed(0)
    model = GPTNeoX(cfg.model)
    optimizer = configured_optimizer(model, cfg.optim, "cpu", None)
    records = []
    for batch in global_batches():
        logits = model(batch["tokens"], position_ids=batch["position_ids"])
        loss = causal_lm_loss(logits, batch["labels"], batch["loss_mask"])
        loss.backward()
        # As the engines clip (neox/parallel/parallelize.py: GradNormClipper): squares summed in fp64.
        norm = torch.stack([p.grad.double().square().sum() for p in model.parameters()]).sum().sqrt()
        coef = torch.clamp(cfg.optim.gradient_clipping / (norm + 1e-6), max=1.0)
        for p in model.parameters():
            p.grad.mul_(coef.float())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        records.append((loss.item(), float(norm)))
    return records

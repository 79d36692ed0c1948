"""Per-rank LoRA checks (run inside the 4-rank launch of tests/distributed/test_sequence_parallel.py, as tp2 x dp2),
and the single-process reference they are compared with.

- layers: a LoRA model (adapters on every linear, B made non-zero) at tp2 and tp2 + sequence_parallel against one
  device: loss, and every adapter gradient merged over tp by the sharding plan (which refuses replicated factors
  that differ between the ranks); the base gradients stay None (frozen).
- training: optimizer steps through ParallelTrainEngine (DeepSpeed) of a LoRA model at one layout, its layout-free
  state written after step 2 and resumed at another layout (another ZeRO stage, sequence parallelism): per-step
  losses, gradient norms and the trained adapters against one process.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from neox.config import load_config
from neox.config.lora import lora_settings
from neox.model import GPTNeoX, causal_lm_loss
from neox.model.lora import add_lora, adapter_state
from tests.distributed.sequence_checks import LR, TRAIN, VOCAB, _slice, global_batches
from tests.distributed.tp_checks import VOCAB as LAYER_VOCAB
from tests.distributed.tp_checks import model_cfg

LORA = {"r": 4, "alpha": 8, "target_modules": ["query_key_value", "dense", "linear1", "linear2"]}


def _lora_model(cfg, settings, seed: int = 3) -> GPTNeoX:
    torch.manual_seed(seed)
    model = add_lora(GPTNeoX(cfg), settings, seed)
    with torch.no_grad():  # B starts at zero; a non-zero B lets every adapter's A receive a gradient
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model


def layers(topo, changes: dict) -> dict:
    from neox.parallel.parallelize import apply_tensor_parallel, lm_loss_fn
    from neox.parallel.sharding import merge_state_dicts

    cfg = model_cfg(**changes)
    settings = lora_settings({"r": 4, "alpha": 8, "target_modules": ["all-linear"]}, cfg.gated_mlp)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, LAYER_VOCAB, (2, 16), generator=gen)
    labels = torch.randint(0, LAYER_VOCAB, (2, 16), generator=gen)
    reference = _lora_model(cfg, settings)
    ref_loss = causal_lm_loss(reference(tokens), labels)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    result = {"ref_loss": ref_loss.item(), "adapters": len(ref_grads)}
    for name, sp in (("tp", False), ("sp", True)):
        model = apply_tensor_parallel(_lora_model(cfg, settings), topo, sequence_parallel=sp)
        loss = lm_loss_fn(topo, LAYER_VOCAB)(model(tokens), labels, None)
        loss.backward()
        result[f"{name}_frozen_grads"] = sum(p.grad is not None for p in model.parameters() if not p.requires_grad)
        result[f"{name}_trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        local = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        gathered: list = [None] * topo.tp_size
        dist.all_gather_object(gathered, local, group=topo.tp_group)
        merged = merge_state_dicts(gathered)  # raises if a replicated factor's gradient differs between tp ranks
        result[f"{name}_loss"] = loss.item()
        result[f"{name}_grad_err"] = max((merged[n] - g).abs().max().item() for n, g in ref_grads.items())
    result["ref_trainable"] = sorted(ref_grads)
    return result


def _config(work: str, name: str, world: int, extra: dict):
    path = Path(work) / f"lora-{name}.yml"
    if not dist.is_initialized() or dist.get_rank() == 0:
        path.write_text(yaml.safe_dump({**TRAIN, "num_gpus": world, "lora": LORA, "load": work, "finetune": True,
                                        "weight_decay": 0.1, **extra}))
    if dist.is_initialized():
        dist.barrier()
    return load_config([path], vocab_size=VOCAB)


def _engine(work: str, name: str, extra: dict):
    from neox.parallel.engine import ParallelTrainEngine
    from neox.parallel.topology import build_topology
    from neox.train.objectives import build_objective

    cfg = _config(work, name, dist.get_world_size(), extra)
    topo = build_topology(cfg.parallel.model_parallel_size, cfg.parallel.pipe_parallel_size)
    model = add_lora(_seeded(cfg.model), lora_settings(cfg.train.lora), seed=5)
    engine = ParallelTrainEngine(cfg, model, torch.device("cpu"), topo, build_objective(cfg))
    engine.engine.train()
    return cfg, topo, model, engine


def _steps(cfg, topo, engine, batches) -> list[tuple[float, float]]:
    from neox.parallel.runtime import all_reduce_mean

    micro, accum = cfg.train.train_micro_batch_size_per_gpu, cfg.train.gradient_accumulation_steps
    records = []
    for batch in batches:
        mine = _slice(batch, topo.dp_rank * micro * accum, micro * accum)
        loss, grad_norm = engine.step(iter([_slice(mine, i * micro, micro) for i in range(accum)]), accum, LR)
        records.append((float(all_reduce_mean(loss)), grad_norm))
    return records


def _adapters(cfg, topo, model, engine) -> dict[str, torch.Tensor]:
    """The trained adapters, merged over tp by the sharding plan (and over pipeline stages)."""
    from neox.parallel.sharding import merge_state_dicts

    # A pipeline stage trains only the parameters of its own layers (the model's others are stale copies).
    trained = [(n, p) for n, p in model.named_parameters()
               if p.requires_grad and id(p) in {id(q) for q in engine.engine.module.parameters()}]
    if cfg.optim.zero_stage == 3:  # each parameter's partitions, gathered
        from deepspeed.utils import safe_get_full_fp32_param
        local = {n: safe_get_full_fp32_param(p).clone() for n, p in trained}
    else:
        local = {n: p.detach().clone() for n, p in trained}
    gathered: list = [None] * topo.tp_size
    dist.all_gather_object(gathered, local, group=topo.tp_group)
    merged = merge_state_dicts(gathered)
    if topo.pp_size > 1:  # each stage holds its own layers' adapters
        stages: list = [None] * topo.pp_size
        dist.all_gather_object(stages, merged, group=topo.grid.get_pipe_parallel_group())
        merged = {name: t for stage in stages for name, t in stage.items()}
    return merged


def training(work: str, first: tuple[str, dict], *resumed: tuple[str, dict]) -> dict:
    """The first layout trains every step, writing the layout-free state (adapters and their Adam moments) after
    step 2; each other layout loads it and trains the remaining steps. Per-step (loss, grad_norm) and the trained
    adapters of each, and the names the checkpoint holds."""
    from neox.checkpoint.layout_state import (load_layout_free_state, param_names_of, read_layout_free_state,
                                              save_layout_free_state)

    batches, ckpt = global_batches(), Path(work) / "lora-step2"
    cfg, topo, model, engine = _engine(work, first[0], first[1])
    records = _steps(cfg, topo, engine, batches[:2])
    save_layout_free_state(ckpt, engine.engine, param_names_of(engine), topo, {"iteration": 2})
    records += _steps(cfg, topo, engine, batches[2:])
    out = {first[0]: {"records": records, "adapters": _adapters(cfg, topo, model, engine)},
           "saved": sorted(read_layout_free_state(ckpt).weights)}
    for name, layout in resumed:
        cfg, topo, model, engine = _engine(work, name, layout)
        load_layout_free_state(engine.engine, param_names_of(engine), topo, ckpt)
        out[name] = {"records": _steps(cfg, topo, engine, batches[2:]), "adapters": _adapters(cfg, topo, model, engine)}
    return out


def _seeded(model_cfg) -> GPTNeoX:
    torch.manual_seed(0)
    return GPTNeoX(model_cfg)


def reference_training(work: str) -> dict:
    """The same steps on one process: the single-device LoRA model, the configured optimizer, the engines' clipping."""
    from neox.optim import configured_optimizer

    cfg = _config(work, "single", 1, {})
    model = add_lora(_seeded(cfg.model), lora_settings(cfg.train.lora), seed=5)
    optimizer = configured_optimizer(model, cfg.optim, "cpu", None)
    trained = [p for p in model.parameters() if p.requires_grad]
    records = []
    for batch in global_batches():
        loss = causal_lm_loss(model(batch["tokens"], position_ids=batch["position_ids"]), batch["labels"],
                              batch["loss_mask"])
        loss.backward()
        norm = torch.stack([p.grad.double().square().sum() for p in trained]).sum().sqrt()
        coef = torch.clamp(cfg.optim.gradient_clipping / (norm + 1e-6), max=1.0)
        for p in trained:
            p.grad.mul_(coef.float())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        records.append((loss.item(), float(norm)))
    optimized = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    return {"records": records, "adapters": adapter_state(model.state_dict()), "optimized": optimized,
            "all_params": sum(p.numel() for p in model.parameters())}

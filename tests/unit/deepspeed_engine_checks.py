"""Rank function for tests/unit/test_deepspeed_engine_keys.py (module level: the spawned rank imports it).

Builds real DeepSpeed engines from YAML configs in a world of one rank and reports what the engine made of each
gpt-neox key, plus the files its monitors and profiler wrote."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from neox.config import load_config
from neox.model import GPTNeoX, causal_lm_loss

VOCAB = 64
SEQ = 8
MODEL = {"padded_vocab_size": VOCAB, "num_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "seq_length": SEQ,
         "max_position_embeddings": SEQ, "hidden_dropout": 0.0, "attention_dropout": 0.0, "num_gpus": 1,
         "train_micro_batch_size_per_gpu": 2, "train_iters": 2, "lr_decay_style": "constant", "weight_decay": 0.1}


def batch(seed: int) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": torch.arange(SEQ).expand(2, SEQ),
            "loss_mask": torch.ones(2, SEQ)}


def _engine(work: Path, name: str, extra: dict, optimizer: dict | None = None):
    from neox.train.engine import TrainEngine

    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump({**MODEL, **extra}))
    cfg = load_config([path], vocab_size=VOCAB)
    if optimizer is not None:
        # set after loading: the loader merges the default Adam's betas / eps into any optimizer's params
        cfg.optim.optimizer = optimizer
        cfg.optim.validate()
    torch.manual_seed(0)
    return cfg, TrainEngine(cfg, GPTNeoX(cfg.model), torch.device("cpu"))


def read_back(work: str) -> dict:
    import deepspeed.comm.comm as ds_comm

    work_dir = Path(work)
    out: dict = {}

    cfg, te = _engine(work_dir, "keys", {
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
        "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"},
        "fp32_allreduce": True, "prescale_gradients": True, "gradient_predivide_factor": 2.0, "dump_state": True,
        "flops_profiler": {"enabled": True, "profile_step": 1, "output_file": str(work_dir / "flops.txt")},
        "comms_logger": {"enabled": True, "prof_all": True},
        "csv_monitor": {"enabled": True, "output_path": str(work_dir / "csv"), "job_name": "run"},
        "tensorboard": {"enabled": True, "output_path": str(work_dir / "tb"), "job_name": "run"},
        "wandb": {"enabled": False, "project": "neox-keys", "group": "g"},
        "checkpoint": {"tag_validation": "Fail", "use_node_local_storage": True},
    })
    engine = te.engine
    out["keys"] = {
        "communication_data_type": str(engine.communication_data_type),
        "postscale_gradients": engine.postscale_gradients(),
        "gradient_predivide_factor": engine.gradient_predivide_factor(),
        "data_types": [str(t) for t in engine.get_data_types()],
        "dump_state": engine.dump_state(),
        "flops_profiler": [engine.flops_profiler_enabled(), engine.flops_profiler_profile_step()],
        "comms_logger": [ds_comm.comms_logger.enabled, ds_comm.comms_logger.prof_all],
        "monitor": [engine.monitor.enabled, engine._config.monitor_config.wandb.project],
        "checkpoint": [engine.checkpoint_tag_validation_fail(), engine.use_node_local_storage()],
        "bf16": engine.bfloat16_enabled(),
    }
    for step in range(2):
        te.step(iter([batch(step)]), 1, 1e-3)
    engine.monitor.write_events([])  # nothing new; the monitors flush what the steps wrote
    out["files"] = sorted(str(p.relative_to(work_dir)) for p in work_dir.rglob("*") if p.is_file()
                          and p.suffix != ".yml")
    out["flops_report"] = (work_dir / "flops.txt").read_text() if (work_dir / "flops.txt").exists() else ""
    ds_comm.comms_logger.enabled = False

    # Pythia-1B's spelling of bf16 training
    _, te = _engine(work_dir, "pythia1b", {"fp16": {"enabled": True, "type": "bfloat16", "loss_scale": 0,
                                                    "loss_scale_window": 1000, "hysteresis": 2,
                                                    "min_loss_scale": 1}})
    out["pythia1b"] = [te.engine.bfloat16_enabled(), te.engine.fp16_enabled(), str(te.engine.communication_data_type)]

    # Lion under ZeRO 1 (DeepSpeed's flat fp32 partitions): one step is p * (1 - lr * wd) - lr * sign(grad)
    lr = 1e-2
    cfg, te = _engine(work_dir, "lion", {"zero_optimization": {"stage": 1}},
                      optimizer={"type": "Lion", "params": {"lr": lr, "betas": [0.9, 0.99]}})
    torch.manual_seed(0)
    reference = GPTNeoX(cfg.model)
    start = {n: p.detach().clone() for n, p in reference.named_parameters()}
    b = batch(7)
    causal_lm_loss(reference(b["tokens"], position_ids=b["position_ids"]), b["labels"], b["loss_mask"]).backward()
    te.step(iter([b]), 1, lr)
    worst = 0.0
    for name, p in te.engine.module.named_parameters():
        decay = 0.1 if p.ndim >= 2 else 0.0
        ref = reference.get_parameter(name)
        expected = start[name] * (1 - lr * decay) - lr * torch.sign(ref.grad)
        worst = max(worst, float((p.detach() - expected).abs().max()))
    out["lion"] = {"optimizer": type(te.engine.basic_optimizer).__name__, "worst": worst,
                   "untested_allowed": te.engine.zero_allow_untested_optimizer()}
    return out

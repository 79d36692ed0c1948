"""Per-rank function for tests/distributed/test_diagnostics_layouts.py (module level: spawned ranks import it), and
the single-process reference it is compared with."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml

from neox.config import load_config
from neox.model import GPTNeoX, causal_lm_loss
from neox.optim import param_groups

VOCAB = 128
SEQ = 16
GLOBAL_BATCH = 4
STEPS = 3
LR = 1e-2
CLIP = 0.5
N_BATCHES = 2
MODEL = {"padded_vocab_size": VOCAB, "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": SEQ,
         "max_position_embeddings": SEQ, "pos_emb": "rotary", "rotary_pct": 0.25, "norm": "layernorm",
         "gpt_j_residual": True, "activation": "gelu", "hidden_dropout": 0.0, "attention_dropout": 0.0,
         "optimizer": {"type": "Adam", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1.0e-8}},
         "weight_decay": 0.1, "gradient_clipping": CLIP, "lr_decay_style": "constant", "train_iters": STEPS,
         "log_grad_norm": True, "log_param_norm": True, "log_grad_pct_zeros": True, "log_optimizer_states": True,
         "log_gradient_noise_scale": True, "gradient_noise_scale_n_batches": N_BATCHES}


def global_batches() -> list[dict[str, torch.Tensor]]:
    """STEPS global batches of GLOBAL_BATCH sequences: 64 tokens drawn from 128, so with an untied head the
    embedding rows of the tokens a batch lacks have zero gradients (pct_grad_zeros has something to count)."""
    gen = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
        batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                        "position_ids": torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ).contiguous(),
                        "loss_mask": torch.ones(GLOBAL_BATCH, SEQ)})
    return batches


def _slice(batch: dict[str, torch.Tensor], start: int, size: int) -> dict[str, torch.Tensor]:
    return {k: v[start:start + size] for k, v in batch.items()}


def layouts_on_two_ranks(work: str, layouts: dict[str, dict]) -> dict[str, list[dict]]:
    """Train STEPS steps in each layout with every diagnostic on; rank 0 returns the diagnostics records."""
    from neox.checkpoint import layout_state
    from neox.parallel.runtime import all_reduce_mean
    from neox.parallel.testing import shared_config
    from neox.train.diagnostics import build_diagnostics
    from neox.train.objectives import LanguageModelObjective
    from tests.distributed.trainer_engine import trainer_engine

    rank = torch.distributed.get_rank()
    out: dict[str, list[dict]] = {}
    for name, extra in layouts.items():
        cfg = shared_config(Path(work) / f"{name}.yml", {**MODEL, "num_gpus": 2, **extra}, VOCAB)
        topo, train_engine = trainer_engine(cfg, LanguageModelObjective())
        diagnostics = build_diagnostics(cfg.log, train_engine.engine, topo,
                                        layout_state.param_names_of(train_engine), cfg.train.train_batch_size)
        names = layout_state.param_names_of(train_engine)
        gathered = _GatheredByDeepSpeed(train_engine.engine, names) if cfg.optim.zero_stage in (1, 2) else None
        micro, accum = cfg.train.train_micro_batch_size_per_gpu, cfg.train.gradient_accumulation_steps
        records = []
        for step, batch in enumerate(global_batches(), start=1):
            mine = _slice(batch, topo.dp_rank * micro * accum, micro * accum)
            micro_batches = iter([_slice(mine, i * micro, micro) for i in range(accum)])
            loss, grad_norm = train_engine.step(micro_batches, accum, LR)
            all_reduce_mean(loss)
            record = diagnostics.after_step(step)
            full = gathered.after_step() if gathered is not None else {}
            if record is not None:
                records.append({**record, "grad_norm": grad_norm, "gathered": full})
        out[name] = records
    return out if rank == 0 else {}


class _GatheredByDeepSpeed:
    """The same statistics from DeepSpeed's own whole-tensor gathers (safe_get_full_*: an all-reduce per parameter
    over dp): the reference for layouts whose numbers no plain-torch run reproduces (bf16)."""

    def __init__(self, engine, names: dict[int, str]):
        self.engine, self.names, self.stats = engine, names, {}
        take_model_step = engine._take_model_step

        def gather_then_step(*args, **kwargs):
            from deepspeed.utils import safe_get_full_grad

            for p in engine.module.parameters():
                g = safe_get_full_grad(p).detach().double()
                self.stats[f"gradient_norms/{names[id(p)]}"] = float(torch.linalg.vector_norm(g))
                self.stats[f"pct_grad_zeros/{names[id(p)]}"] = 100.0 * float((g == 0).sum()) / g.numel()
            return take_model_step(*args, **kwargs)

        engine._take_model_step = gather_then_step

    def after_step(self) -> dict:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        stats, self.stats = self.stats, {}
        for p in self.engine.module.parameters():
            name = self.names[id(p)]
            stats[f"parameter_norms/{name}"] = float(torch.linalg.vector_norm(safe_get_full_fp32_param(p).double()))
            for key in ("exp_avg", "exp_avg_sq"):
                value = safe_get_full_optimizer_state(p, key).double()
                stats[f"optimizer_state_norms/{name}_{key}"] = float(torch.linalg.vector_norm(value))
        return stats


def reference_records(model_keys: dict) -> list[dict]:
    """The same steps on one process in plain torch: full-batch loss, clip_grad_norm_, torch AdamW; the noise
    scale by gpt-neox's formula (one estimate at step N_BATCHES, whose EMA bias correction cancels in the ratio)."""
    cfg = load_config([_write_single({**MODEL, **model_keys})], vocab_size=VOCAB)
    torch.manual_seed(0)
    model = GPTNeoX(cfg.model)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(model.named_parameters(), cfg.optim.weight_decay), lr=LR,
                                  betas=(0.9, 0.95), eps=1e-8)
    records, grads = [], []
    for step, batch in enumerate(global_batches(), start=1):
        logits = model(batch["tokens"], position_ids=batch["position_ids"])
        causal_lm_loss(logits, batch["labels"], batch["loss_mask"]).backward()
        record = {"iteration": step}
        flat = []
        for p in model.parameters():
            g = p.grad.detach()
            record[f"gradient_norms/{names[id(p)]}"] = float(torch.linalg.vector_norm(g.double()))
            record[f"pct_grad_zeros/{names[id(p)]}"] = 100.0 * float((g == 0).sum()) / g.numel()
            flat.append(g.flatten().double())
        grads.append(torch.cat(flat))
        record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for p in model.parameters():
            record[f"parameter_norms/{names[id(p)]}"] = float(torch.linalg.vector_norm(p.detach().double()))
            for key in ("exp_avg", "exp_avg_sq"):
                record[f"optimizer_state_norms/{names[id(p)]}_{key}"] = float(
                    torch.linalg.vector_norm(optimizer.state[p][key].double()))
        if step >= N_BATCHES:
            b_small, b_big = GLOBAL_BATCH, GLOBAL_BATCH * N_BATCHES
            g_small = float(grads[N_BATCHES - 1].square().sum())
            g_big = float((sum(grads[:N_BATCHES]) / N_BATCHES).square().sum())
            noise = (b_big * g_big - b_small * g_small) / (b_big - b_small)
            scale = (g_small - g_big) / (1 / b_small - 1 / b_big)
            record["noise_scale"] = scale / noise
        records.append(record)
    assert math.isfinite(records[-1]["noise_scale"])
    return records


def _write_single(values: dict) -> Path:
    import tempfile

    handle = tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False)
    with handle:
        yaml.safe_dump({**values, "num_gpus": 1}, handle)
    return Path(handle.name)


def model_cfg_for_unit():
    """The model above with an untied head, for the one-process unit test."""
    return load_config([_write_single({**MODEL, "no_weight_tying": True})], vocab_size=VOCAB).model

"""Per-rank function for tests/distributed/test_sharded_checkpoint.py (module level: spawned ranks import it).

Four ranks train a small model at dp4 ZeRO-1, save its layout-free state (each rank its own shard), then load it at
tp2 x dp2 ZeRO-1 and at pp2 x dp2 ZeRO-1, counting the bytes each rank writes and reads and measuring the peak extra
host memory (VmHWM, reset through /proc/self/clear_refs) of the save and of each resharding load."""
from __future__ import annotations

import gc
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from neox.config import load_config

VOCAB = 1024
SEQ = 32
GLOBAL_BATCH = 8
STEPS = 2
LR = 1e-2
MODEL = {"padded_vocab_size": VOCAB, "num_layers": 4, "hidden_size": 128, "num_attention_heads": 4,
         "seq_length": SEQ, "max_position_embeddings": SEQ, "pos_emb": "rotary", "rotary_pct": 0.25,
         "norm": "layernorm", "gpt_j_residual": True, "activation": "gelu", "hidden_dropout": 0.0,
         "attention_dropout": 0.0, "no_weight_tying": True,
         "optimizer": {"type": "Adam", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1.0e-8}},
         "weight_decay": 0.1, "gradient_clipping": 1.0, "lr_decay_style": "constant", "train_iters": STEPS + 1,
         "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}, "num_gpus": 4}
LAYOUTS = {
    "dp4-zero1": {"gradient_accumulation_steps": 1},
    "tp2xdp2-zero1": {"model_parallel_size": 2, "gradient_accumulation_steps": 2},
    "pp2xdp2-zero1": {"pipe_parallel_size": 2, "gradient_accumulation_steps": 2},
}


def global_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(4321)
    out = []
    for _ in range(STEPS + 1):
        tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                    "position_ids": torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ).contiguous(),
                    "loss_mask": torch.ones(GLOBAL_BATCH, SEQ)})
    return out


def state_bytes() -> int:
    """fp32 weights and two Adam moments of the whole model."""
    from neox.model import GPTNeoX

    cfg = load_config([_write_yaml({**MODEL, "num_gpus": 1})], vocab_size=VOCAB)
    return 3 * 4 * sum(p.numel() for p in GPTNeoX(cfg.model).parameters())


def _write_yaml(values: dict) -> Path:
    import tempfile

    handle = tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False)
    with handle:
        yaml.safe_dump(values, handle)
    return Path(handle.name)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_extra_bytes(fn):
    """(fn(), bytes the process's resident memory rose above both its level before and after fn, at its peak)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    result = fn()
    peak, after = _status_kib("VmHWM"), _status_kib("VmRSS")
    return result, max(0, peak - max(before, after)) * 1024


def _engine(work: Path, name: str):
    from neox.checkpoint import layout_state
    from neox.parallel.testing import shared_config
    from neox.train.objectives import LanguageModelObjective
    from tests.distributed.trainer_engine import trainer_engine

    cfg = shared_config(work / f"{name}.yml", {**MODEL, **LAYOUTS[name]}, VOCAB)
    topo, train_engine = trainer_engine(cfg, LanguageModelObjective())
    return cfg, topo, train_engine, layout_state.param_names_of(train_engine)


def _step(cfg, topo, train_engine, batch) -> float:
    from neox.parallel.runtime import all_reduce_mean

    micro, accum = cfg.train.train_micro_batch_size_per_gpu, cfg.train.gradient_accumulation_steps
    start = topo.dp_rank * micro * accum
    micro_batches = iter([{k: v[start + i * micro:start + (i + 1) * micro] for k, v in batch.items()}
                          for i in range(accum)])
    loss, _ = train_engine.step(micro_batches, accum, LR)
    return float(all_reduce_mean(loss.detach().float()))


def _same_state(a: Path, b: Path) -> dict:
    from neox.checkpoint.layout_state import read_layout_free_state

    first, second = read_layout_free_state(a), read_layout_free_state(b)
    names = sorted(first.weights)
    equal = sorted(second.weights) == names and first.step == second.step
    for name in names:
        equal = equal and torch.equal(first.weights[name], second.weights.get(name, torch.empty(0)))
        for key, moment in first.moments.items():
            equal = equal and torch.equal(moment[name], second.moments[key][name])
    return {"equal": equal, "step": second.step, "moment_kinds": sorted(second.moments)}


def save_then_reshard(work: str) -> dict:
    from neox.checkpoint.layout_state import load_layout_free_state, save_layout_free_state

    work_dir = Path(work)
    rank = dist.get_rank()
    batches = global_batches()
    out: dict = {}

    cfg, topo, train_engine, names = _engine(work_dir, "dp4-zero1")
    for batch in batches[:STEPS]:
        _step(cfg, topo, train_engine, batch)
    saved = work_dir / "dp4-zero1"
    write, out["save_peak"] = peak_extra_bytes(
        lambda: save_layout_free_state(saved, train_engine.engine, names, topo, {"iteration": STEPS}))
    dist.barrier()
    out["written"], out["shard_bytes"] = write.stats.bytes_written, write.nbytes
    # What checkpoint_async adds: one host copy of the shard while the background write runs.
    _, out["snapshot_peak"] = peak_extra_bytes(lambda: len(write.snapshot().entries))
    out["file_bytes"] = (saved / "layout_free" / f"rank{rank:05d}.safetensors").stat().st_size
    out["losses"] = {"dp4-zero1": _step(cfg, topo, train_engine, batches[STEPS])}
    del train_engine
    gc.collect()

    for name in ("tp2xdp2-zero1", "pp2xdp2-zero1"):
        cfg, topo, train_engine, names = _engine(work_dir, name)
        loaded, out[f"load_peak/{name}"] = peak_extra_bytes(
            lambda: load_layout_free_state(train_engine.engine, names, topo, saved))
        out[f"read/{name}"] = loaded.stats.bytes_read
        # The all-gather of the 16-bit copies that the load ends with is the one every ZeRO step makes.
        _, out[f"allgather_peak/{name}"] = peak_extra_bytes(train_engine.engine.optimizer.update_lp_params)
        out[f"client_state/{name}"] = loaded.client_state
        again = work_dir / name
        save_layout_free_state(again, train_engine.engine, names, topo, loaded.client_state)
        dist.barrier()
        if rank == 0:
            out[f"same/{name}"] = _same_state(saved, again)
        out["losses"][name] = _step(cfg, topo, train_engine, batches[STEPS])
        del train_engine
        gc.collect()
    return out

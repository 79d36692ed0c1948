"""Rank function for tests/unit/test_safe_resume.py (module level: the spawned rank imports it).

Real DeepSpeed engines in a world of one: each layout saves through engine_state.save and resumes through
engine_state.load (the trainer's path), then a crafted pickle planted in one of its files must be refused there,
by the consolidating readers (deepy eval / generate / convert_neox_to_hf) and by the HF export, while DeepSpeed's
own load runs it."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from neox.checkpoint import engine_state
from neox.checkpoint.consolidated import consolidate
from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.hf_export import export_to_hf
from neox.config import load_config, save_resolved
from neox.model import GPTNeoX
from tests.malicious_pickle import plant
from tests.unit.deepspeed_engine_checks import MODEL, VOCAB, batch

# name -> (config keys, the file the crafted payload goes into, whether consolidating reads that file: an fp32
# ZeRO-2 run's weights are whole in its model states, a pipeline's fp32 weights are the ZeRO-1 partitions, so
# neither's file is read there)
LAYOUTS = {
    "zero0": ({"zero_optimization": {"stage": 0}, "precision": "fp32"}, "mp_rank_00_model_states.pt", True),
    "zero1-bf16": ({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}},
                   "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", True),
    "zero2": ({"zero_optimization": {"stage": 2}}, "zero_pp_rank_0_mp_rank_00_optim_states.pt", False),
    "zero3": ({"zero_optimization": {"stage": 3}}, "zero_pp_rank_0_mp_rank_00_model_states.pt", True),
    "pipeline": ({"pipe_parallel_size": 1, "zero_optimization": {"stage": 1}}, "layer_01-model_00-model_states.pt",
                 False),
}


def _engine(work: Path, name: str, extra: dict):
    from neox.parallel.engine import ParallelTrainEngine
    from neox.parallel.topology import build_topology
    from neox.train.engine import TrainEngine
    from neox.train.objectives import LanguageModelObjective

    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump({**MODEL, **extra}))
    cfg = load_config([path], vocab_size=VOCAB)
    torch.manual_seed(0)
    model = GPTNeoX(cfg.model)
    if cfg.parallel.pipe_parallel_size >= 1:
        topo = build_topology(cfg.parallel.model_parallel_size, cfg.parallel.pipe_parallel_size)
        return cfg, ParallelTrainEngine(cfg, model, torch.device("cpu"), topo, LanguageModelObjective())
    return cfg, TrainEngine(cfg, model, torch.device("cpu"))


def _losses(te, first: int) -> list[float]:
    return [float(te.step(iter([batch(first + i)]), 1, 1e-3)[0]) for i in range(2)]


def _refusal(call) -> str:
    try:
        call()
    except CheckpointError as err:
        return str(err)
    except Exception as err:  # past the files: the HF export then needs the tokenizer files this test leaves out
        return f"not refused, then {type(err).__name__}"
    return "not refused"


def check_layouts(work: str) -> dict:
    work_dir = Path(work)
    out: dict = {}
    for name, (extra, target, _) in LAYOUTS.items():
        cfg, te = _engine(work_dir, name, extra)
        save_dir = work_dir / name
        run_files = engine_state.RunFiles(save_resolved(cfg, work_dir / f"{name}-resolved.yml"), ())
        _losses(te, 0)
        engine_state.save(te.engine, save_dir, 2, {"iteration": 2}, run_files, rank=0, barrier=lambda: None)
        expected = _losses(te, 2)
        ckpt = save_dir / "global_step2"
        record: dict = {"files": sorted(p.name for p in ckpt.glob("*.pt"))}

        _, fresh = _engine(work_dir, name, extra)  # resumes as the trainer does, every file read weights-only
        record["client_state"] = engine_state.load(fresh.engine, save_dir, "global_step2", rank=0, finetune=False)
        record["resumed"], record["expected"] = _losses(fresh, 2), expected
        record["consolidated"] = sorted(consolidate(ckpt)[1]) == sorted(GPTNeoX(cfg.model).state_dict())

        crafted_dir = work_dir / f"{name}-crafted"
        shutil.copytree(save_dir, crafted_dir)
        marker = work_dir / f"{name}-pwned"
        record["target"] = str(plant(crafted_dir / "global_step2" / target, marker))
        _, victim = _engine(work_dir, name, extra)
        record["refused"] = _refusal(lambda: engine_state.load(victim.engine, crafted_dir, "global_step2", rank=0,
                                                               finetune=False))
        record["consolidate_refused"] = _refusal(lambda: consolidate(crafted_dir / "global_step2"))
        record["export_refused"] = _refusal(lambda: export_to_hf(crafted_dir, work_dir / f"{name}-hf",
                                                                 progress=False))
        record["marker_after_safe_loads"] = marker.exists()
        try:  # the code path resuming took before: DeepSpeed's default torch.load(weights_only=False)
            victim.engine.load_checkpoint(str(crafted_dir), tag="global_step2")
        except Exception:  # the payload ran already; what DeepSpeed makes of the extra key does not matter
            pass
        record["marker_after_deepspeed_load"] = marker.exists()
        out[name] = record
    return out

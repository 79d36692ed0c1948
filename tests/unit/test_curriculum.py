"""Sequence-length curriculum (curriculum_learning) against DeepSpeed's own CurriculumScheduler, and short training
runs: on one rank each step's batches are cut to the scheduled length, the first step's loss equals the loss of the
initial model on the cut batches computed by hand, evaluation stays full length and its record carries the
char_level_ppl of the text it read; two pipeline stages (whose activation buffers must follow the changing length)
give the same losses."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from neox.data.indexed import IndexedDatasetWriter
from neox.parallel.testing import run_distributed
from neox.train.curriculum import CurriculumSchedule, SeqlenWarmup, truncate_batch

SCHEDULES = [
    {"min_difficulty": 8, "max_difficulty": 64, "schedule_type": "fixed_linear",
     "schedule_config": {"total_curriculum_step": 10, "difficulty_step": 8}},
    # min_difficulty not a multiple of difficulty_step: the first length is the next multiple, never 0
    {"min_difficulty": 8, "max_difficulty": 100, "schedule_type": "fixed_linear",
     "schedule_config": {"total_curriculum_step": 30, "difficulty_step": 16}},
    {"min_difficulty": 16, "max_difficulty": 128, "schedule_type": "fixed_root",
     "schedule_config": {"total_curriculum_step": 50, "difficulty_step": 8, "root_degree": 2}},
    {"min_difficulty": 16, "max_difficulty": 64, "schedule_type": "fixed_discrete",
     "schedule_config": {"difficulty": [16, 32, 64], "max_step": [3, 7]}},
]


@pytest.mark.parametrize("section", SCHEDULES, ids=[s["schedule_type"] for s in SCHEDULES])
def test_schedule_follows_deepspeeds_curriculum_scheduler(section: dict) -> None:
    from deepspeed.runtime.data_pipeline.curriculum_scheduler import CurriculumScheduler

    section = {"enabled": True, "curriculum_type": "seqlen", **section}
    ours, theirs = CurriculumSchedule(section), CurriculumScheduler(copy.deepcopy(section))
    values = [ours.update(step) for step in range(1, 80)]
    assert values == [theirs.update_difficulty(step) for step in range(1, 80)]
    assert values[0] >= section["min_difficulty"] and values[-1] == section["max_difficulty"]
    assert values == sorted(values) and len(set(values)) > 2


def test_truncate_batch_cuts_every_sequence_entry() -> None:
    batch = {"tokens": torch.arange(12).view(2, 6), "labels": torch.arange(12).view(2, 6) + 1,
             "loss_mask": torch.ones(2, 6), "position_ids": torch.arange(6).expand(2, 6), "extra": torch.ones(2)}
    cut = truncate_batch(batch, 4)
    assert cut["tokens"].tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]] and cut["labels"][0].tolist() == [1, 2, 3, 4]
    assert cut["loss_mask"].shape == (2, 4) and cut["position_ids"][1].tolist() == [0, 1, 2, 3]
    assert cut["extra"] is batch["extra"]
    warmup = SeqlenWarmup({"enabled": True, "curriculum_type": "seqlen", **SCHEDULES[0]}, seq_length=32)
    widths = [next(warmup.step_batches(iter([batch | {"tokens": torch.zeros(2, 32)}]), i, None))["tokens"].shape[1]
              for i in range(10)]
    # floor(step / 10 x 56 + 8) down to a multiple of 8: 8, 16, 24, 24, 32, 40...; past 32 the sequences end
    assert widths == [8, 16, 24, 24, 32, 32, 32, 32, 32, 32]
    assert warmup.take_window_mean() == pytest.approx(sum(widths) / 10)


SEQ = 32
STEPS = 5
GRAD_ACCUM = 2
CURRICULUM = {"enabled": True, "curriculum_type": "seqlen", "min_difficulty": 8, "max_difficulty": SEQ,
              "schedule_type": "fixed_linear", "schedule_config": {"total_curriculum_step": 4, "difficulty_step": 8}}


def _train(root: str, overrides: list[str]) -> dict:
    """Trainer on every rank of run_distributed's world: STEPS steps, then a validation."""
    from neox.config import load_config
    from neox.model import GPTNeoX, causal_lm_loss
    from neox.parallel.runtime import Runtime
    from neox.train.run import Trainer

    config = Path(root) / "run.yml"
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    cfg = load_config([config], overrides, vocab_size=512, local_gpus=world)
    # use_shared_fs is false: with every local rank 0 (one rank per node) both ranks build the index caches at once
    local_rank = 0 if cfg.parallel.pipe_parallel_size > 1 else rank
    trainer = Trainer(cfg, config, Runtime(rank=rank, world_size=world, local_rank=local_rank,
                                           device=torch.device("cpu")))
    if world > 1:
        batches = trainer._loader(trainer.train_ds, 0)
        return {"losses": [trainer.train_step(batches)[0] for _ in range(STEPS)], "valid": trainer.validate()}
    initial = copy.deepcopy(trainer.engine.module.state_dict())
    widths: list[int] = []
    trainer.engine.module.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    raw: list[dict] = []

    def recorded(loader):
        for batch in loader:
            raw.append(batch)
            yield batch

    batches = recorded(trainer._loader(trainer.train_ds, 0))
    losses = [trainer.train_step(batches)[0] for _ in range(STEPS)]
    record = trainer._train_record(losses, None, 1.0, 1.0)
    valid = trainer.validate()
    model = GPTNeoX(cfg.model)
    model.load_state_dict(initial)
    with torch.no_grad():  # step 1: the mean over its GRAD_ACCUM micro-batches, cut to the first scheduled length
        cuts = [truncate_batch(batch, widths[0]) for batch in raw[:GRAD_ACCUM]]
        manual = sum(causal_lm_loss(model(cut["tokens"], position_ids=cut["position_ids"]), cut["labels"],
                                    cut["loss_mask"]).item() for cut in cuts) / GRAD_ACCUM
    texts = [trainer.valid_ds[i]["text"].tolist() for i in range(cfg.train.eval_iters * trainer.global_batch)]
    return {"widths": widths, "losses": losses, "manual": manual, "record": record, "valid": valid, "texts": texts}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("curriculum")
    rng = np.random.RandomState(0)
    words = ["grâce", "über", "naïve", "€uro", "plain", "text", "data"]
    with IndexedDatasetWriter(root / "d", np.uint16) as writer:
        for _ in range(60):
            text = " ".join(rng.choice(words, size=rng.randint(5, 20)))
            writer.add_document(list(text.encode("utf-8")) + [0])
    (root / "run.yml").write_text(yaml.safe_dump({
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "seq_length": SEQ,
        "max_position_embeddings": SEQ, "pos_emb": "rotary", "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "tokenizer_type": "CharLevelTokenizer", "precision": "fp32", "data_path": str(root / "d"), "split": "80,15,5",
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": GRAD_ACCUM, "train_iters": STEPS,
        "eval_interval": 100, "eval_iters": 2, "num_workers": 0, "peak_flops": 1.0e11,
        "log_dir": str(root / "logs"), "optimizer": {"type": "Adam", "params": {"lr": 1.0e-3}},
        "curriculum_learning": CURRICULUM, "char_level_ppl": True, "use_shared_fs": False,
    }))
    (result,) = run_distributed(_train, 1, str(root), [], timeout_s=180)
    return {**result, "root": str(root)}


def test_training_steps_read_batches_cut_to_the_deepspeed_schedule(run: dict) -> None:
    from deepspeed.runtime.data_pipeline.curriculum_scheduler import CurriculumScheduler

    theirs = CurriculumScheduler(copy.deepcopy(CURRICULUM))
    expected = [min(theirs.update_difficulty(step + 1), SEQ) for step in range(STEPS)]
    assert expected == [8, 16, 24, 32, 32]
    assert run["widths"][: STEPS * GRAD_ACCUM] == [w for w in expected for _ in range(GRAD_ACCUM)]
    # evaluation reads full-length batches (eval_iters x grad_accum micro-batches)
    assert run["widths"][STEPS * GRAD_ACCUM :] == [SEQ] * (2 * GRAD_ACCUM)
    assert run["losses"][0] == pytest.approx(run["manual"], rel=1e-6)
    assert run["record"]["curriculum_seqlen"] == SEQ
    # throughput counts the tokens the steps really read
    assert run["record"]["tokens_per_sec"] == pytest.approx(2 * GRAD_ACCUM * sum(expected) / STEPS)


def test_validation_reports_char_level_ppl_of_the_text_it_read(run: dict) -> None:
    tokens = sum(len(text) for text in run["texts"])
    chars = sum(len(bytes(text).decode("utf-8", errors="replace")) for text in run["texts"])
    assert tokens == 2 * 2 * GRAD_ACCUM * (SEQ + 1) and chars < tokens  # accented letters take two bytes
    loss = run["valid"]["valid_loss"]
    assert run["valid"]["valid_char_level_ppl"] == pytest.approx(math.exp(loss * tokens / chars), rel=1e-12)


def test_two_pipeline_stages_follow_the_curriculum_with_the_same_losses(run: dict) -> None:
    # Without resetting DeepSpeed's pipeline buffers at every change of length, the stages hang on a shape mismatch.
    stages = run_distributed(_train, 2, run["root"], ["--pipe_parallel_size", "2", "--data_cache_dir",
                                                      str(Path(run["root"]) / "pp_cache")], timeout_s=240)
    for stage in stages:
        assert stage["losses"] == pytest.approx(run["losses"], rel=1e-5)
        assert stage["valid"]["valid_loss"] == pytest.approx(run["valid"]["valid_loss"], rel=1e-5)
        assert stage["valid"]["valid_char_level_ppl"] == pytest.approx(run["valid"]["valid_char_level_ppl"], rel=1e-5)

"""SFT and the global-batch loss normalisation: the shared set-up, the TRL reference and the per-rank functions of
tests/distributed/test_sft.py (module level: spawned ranks import them).

Set-up (the user's path): a tiny random Llama saved by transformers with a ChatML-style template on the bundled
neox-20b tokenizer -> tools/convert_hf_to_neox.py's import (model.yml + consolidated weights) -> eight chats through
tools/preprocess_data_with_chat_template.py -> a run config (AdamW, constant LR, no clipping, fp32, dropout 0). One
rank: the Trainer of `deepy train` on it. Other layouts: the shards through datasets_from_config and the resumable
loader, stepping TrainEngine / ParallelTrainEngine with the objective `train_impl: normal` + label datasets selects
(SFT). TRL's SFTTrainer trains the very HF model on the very same samples, in the same order, with completion-only
loss.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from neox.config import load_config
from neox.model import GPTNeoX, causal_lm_loss

ROOT = Path(__file__).resolve().parents[2]
SEQ = 64
STEPS = 5
GLOBAL = 4
LR = 1e-3
HF_VOCAB = 50304  # the padded size: both softmaxes then run over the same rows
TOKENIZER_VOCAB = 50277
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHATS = [
    [("user", "What is two plus two?"), ("assistant", "Four.")],
    [("system", "Answer briefly."), ("user", "Name a colour."), ("assistant", "Blue."), ("user", "Another one?"),
     ("assistant", "Red, as in the morning sky.")],
    [("user", "Who begat Enos?"), ("assistant", "Seth begat Enos, after he lived an hundred and five years.")],
    [("user", "Translate 'light' into French."), ("assistant", "Lumière.")],
    [("user", "In the beginning God created what?"), ("assistant", "The heaven and the earth."),
     ("user", "And the earth was?"), ("assistant", "Without form, and void.")],
    [("system", "You count."), ("user", "Count to five."), ("assistant", "One, two, three, four, five.")],
    [("user", "Say yes."), ("assistant", "Yes.")],
    [("user", "What did God call the light?"), ("assistant", "Day; and the darkness he called Night.")],
]
RUN = {"pack_impl": "unpacked", "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
       "train_iters": STEPS, "optimizer": {"type": "Adam", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1.0e-8}},
       "weight_decay": 0.1, "lr_decay_style": "constant", "warmup": 0.0, "gradient_clipping": 0.0,
       "hidden_dropout": 0.0, "attention_dropout": 0.0, "num_workers": 0, "seed": 1234, "eval_iters": 0}
# Normalisation: clipping far above the norm, so the engines measure the gradient norm and leave the gradients be.
NORM_RUN = {"gradient_clipping": 1.0e9}
TRAINED_PER_ROW = (5, 60, 1, 30)  # unmasked tokens of the 4 sequences of the normalisation batch


def write_chat_tokenizer(directory: Path) -> Path:
    """A Hugging Face tokenizer directory: the bundled neox-20b tokenizer with CHAT_TEMPLATE (EOS <|endoftext|>)."""
    directory.mkdir(parents=True)
    shutil.copy(ROOT / "data" / "tokenizers" / "neox-20b" / "tokenizer.json", directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}))
    return directory


def prepare(work: Path) -> dict[str, str]:
    """The HF model and tokenizer, its neox import, the chat shards and the run config; paths by name."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from neox.checkpoint.hf_import import convert_hf_to_neox
    from tools import preprocess_data_with_chat_template as chat_tool

    hf = write_chat_tokenizer(work / "hf")
    config = LlamaConfig(vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=64, max_position_embeddings=SEQ,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=None,
                         eos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(hf)
    neox_dir = convert_hf_to_neox(hf, work / "neox", progress=False)
    chats = work / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in chat]}) + "\n"
                             for chat in CHATS))
    prefix = work / "data" / "chat"
    assert chat_tool.main(["--input", str(chats), "--jsonl-keys", "messages", "--tokenizer-path", str(hf),
                           "--output-prefix", str(prefix)]) == 0
    run = work / "run.yml"
    run.write_text(yaml.safe_dump({**RUN, "train_data_paths": [f"{prefix}_messages_document"],
                                   "train_label_data_paths": [f"{prefix}_messages_label_document"],
                                   "data_cache_dir": str(work / "cache")}))
    return {"work": str(work), "hf": str(hf), "model": str(neox_dir / "model.yml"), "neox": str(neox_dir),
            "run": str(run)}


def _config(paths: dict[str, str], name: str, extra: dict):
    layout = Path(paths["work"]) / f"{name}.yml"
    if not dist.is_initialized() or dist.get_rank() == 0:
        layout.write_text(yaml.safe_dump(extra))
    if dist.is_initialized():
        dist.barrier()
    return load_config([paths["model"], paths["run"], layout], vocab_size=TOKENIZER_VOCAB)


def train_dataset(paths: dict[str, str], cfg=None):
    from neox.data.build import datasets_from_config

    cfg = cfg if cfg is not None else load_config([paths["model"], paths["run"]], vocab_size=TOKENIZER_VOCAB)
    train, _, _ = datasets_from_config(cfg.data, seq_length=cfg.model.seq_length, seed=cfg.train.seed,
                                       num_samples=(STEPS * GLOBAL, 0, 0))
    return train


def trl_losses(paths: dict[str, str]) -> dict:
    """TRL's SFTTrainer, completion-only loss, on our samples in our order: each step's loss (the sum of its
    micro-batches' losses, each normalised by TRL's num_items_in_batch), and that count."""
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    ours = train_dataset(paths)
    rows = []
    for i in range(STEPS * GLOBAL):
        sample, text = ours[i], ours.text_tokens(i)
        rows.append({"input_ids": text.tolist(), "completion_mask": (sample["label"][: len(text)] >= 0).astype(int)
                     .tolist()})
    micro_losses: list[tuple[float, float]] = []

    class Recording(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            micro_losses.append((float(loss.detach()), float(num_items_in_batch)))
            return loss

    args = SFTConfig(output_dir=str(Path(paths["work"]) / "trl"), per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant",
                     warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.1,
                     max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[], completion_only_loss=True,
                     train_sampling_strategy="sequential", use_cpu=True, dataloader_num_workers=0, seed=0,
                     max_length=SEQ + 1, disable_tqdm=True)
    trainer = Recording(model=LlamaForCausalLM.from_pretrained(paths["hf"], dtype=torch.float32), args=args,
                        train_dataset=Dataset.from_list(rows),
                        processing_class=AutoTokenizer.from_pretrained(paths["hf"]))
    trainer.train()
    steps = [micro_losses[2 * s][0] + micro_losses[2 * s + 1][0] for s in range(STEPS)]
    return {"losses": steps, "num_items": [micro_losses[2 * s][1] for s in range(STEPS)],
            "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                              else trainer.optimizer).__name__}


def _engine(cfg, paths: dict[str, str], objective=None):
    from neox.checkpoint.consolidated import read_consolidated
    from neox.parallel.topology import topology_for
    from neox.train.engine import build_train_engine
    from neox.train.objectives import build_objective

    topo = topology_for(cfg.parallel)
    model = GPTNeoX(cfg.model)
    model.load_state_dict(read_consolidated(paths["neox"])[1])
    objective = objective if objective is not None else build_objective(cfg)
    return build_train_engine(cfg, model, torch.device("cpu"), topo, objective), topo


def sft_run(paths: dict[str, str], name: str, layout: dict) -> dict:
    """Our SFT steps at a layout: per-step global loss and mean_token_accuracy, read through the real loader."""
    from neox.data.loader import build_loader
    from neox.parallel.runtime import all_reduce_mean

    cfg = _config(paths, name, layout)
    engine, topo = _engine(cfg, paths)
    train = cfg.train
    loader = build_loader(train_dataset(paths, cfg), consumed_samples=0,
                          micro_batch_size=train.train_micro_batch_size_per_gpu, global_batch_size=GLOBAL,
                          dp_rank=topo.dp_rank, dp_size=topo.dp_size, eod_token=0)
    losses, accuracy = [], []
    for _ in range(STEPS):
        loss, _ = engine.step(loader, train.gradient_accumulation_steps, LR)
        losses.append(float(all_reduce_mean(loss)))
        accuracy.append(engine.last_metrics["mean_token_accuracy"])
    return {"objective": type(engine.objective).__name__, "losses": losses, "accuracy": accuracy}


def uneven_batch() -> dict[str, torch.Tensor]:
    """The normalisation batch: 4 sequences whose unmasked token counts differ (TRAINED_PER_ROW)."""
    gen = torch.Generator().manual_seed(7)
    text = torch.randint(0, TOKENIZER_VOCAB, (GLOBAL, SEQ + 1), generator=gen)
    mask = torch.zeros(GLOBAL, SEQ)
    for row, trained in enumerate(TRAINED_PER_ROW):
        mask[row, SEQ - trained:] = 1.0
    return {"tokens": text[:, :-1], "labels": text[:, 1:], "loss_mask": mask,
            "position_ids": torch.arange(SEQ).expand(GLOBAL, SEQ).contiguous()}


def _mine(batch: dict[str, torch.Tensor], micro: int, accum: int, dp_rank: int, dp_size: int) -> list[dict]:
    """This dp rank's micro-batches of the global batch, as MicroBatchSampler orders the samples."""
    rows = [[step * micro * dp_size + dp_rank * micro + k for k in range(micro)] for step in range(accum)]
    return [{key: value[r] for key, value in batch.items()} for r in rows]


def _gradients_at_step(engine) -> dict[str, torch.Tensor]:
    """Filled with every parameter's gradient as the optimizer step sees it (after the dp reduction)."""
    grads: dict[str, torch.Tensor] = {}
    take_model_step = engine._take_model_step

    def snapshot_then_step(*args, **kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in engine.module.named_parameters() if p.grad is not None})
        return take_model_step(*args, **kwargs)

    engine._take_model_step = snapshot_then_step
    return grads


def normalisation_run(paths: dict[str, str], name: str, layout: dict) -> dict:
    """One step on the uneven batch: the global loss, the gradient norm and (one module: no tp/pp) the gradients."""
    from neox.parallel.runtime import all_reduce_mean
    from neox.train.objectives import SFTObjective

    cfg = _config(paths, name, {**NORM_RUN, **layout})
    engine, topo = _engine(cfg, paths, SFTObjective())
    grads = _gradients_at_step(engine.engine)
    micro, accum = cfg.train.train_micro_batch_size_per_gpu, cfg.train.gradient_accumulation_steps
    loss, norm = engine.step(iter(_mine(uneven_batch(), micro, accum, topo.dp_rank, topo.dp_size)), accum, LR)
    out = {"loss": float(all_reduce_mean(loss)), "grad_norm": norm}
    if not cfg.parallel.is_model_parallel:
        out["gradient"] = grads
    return out


def per_micro_mean_reference(paths: dict[str, str], micro: int) -> dict:
    """What a mean of per-micro-batch means (the normalisation before this change, gpt-neox's) gives for the uneven
    batch cut into micro-batches of `micro` rows, and what the global token mean gives, in plain torch."""
    from neox.checkpoint.consolidated import read_consolidated

    cfg, weights = read_consolidated(paths["neox"])
    batch = uneven_batch()
    out = {}
    for name, rows in (("global_mean", [list(range(GLOBAL))]),
                       ("mean_of_micro_means", [list(range(i, i + micro)) for i in range(0, GLOBAL, micro)])):
        model = GPTNeoX(cfg.model)
        model.load_state_dict(weights)
        losses = [causal_lm_loss(model(batch["tokens"][r], position_ids=batch["position_ids"][r]), batch["labels"][r],
                                 batch["loss_mask"][r]) for r in rows]
        loss = torch.stack(losses).mean()
        loss.backward()
        out[name] = {"loss": loss.item(), "gradient": {n: p.grad.clone() for n, p in model.named_parameters()}}
    return out


def trainer_run(paths: dict[str, str]) -> list[dict]:
    """The user's run, the one-rank reference: the Trainer of `deepy train` on the imported model.yml + the run config
    (the objective chosen from train_label_data_paths), one metrics.jsonl record per step."""
    from neox.parallel.runtime import Runtime
    from neox.train.run import Trainer

    logs = Path(paths["work"]) / "trainer-logs"
    cfg = _config(paths, "trainer", {"num_gpus": 1, "log_interval": 1, "log_dir": str(logs)})
    trainer = Trainer(cfg, Path(paths["run"]), Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    try:
        trainer.run()
    finally:
        trainer.close()
    return [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]


def one_rank(paths: dict[str, str]) -> dict:
    records = [r for r in trainer_run(paths) if "lm_loss" in r]
    return {"sft": {"losses": [r["lm_loss"] for r in records], "accuracy": [r["mean_token_accuracy"] for r in records],
                    "iterations": [r["iteration"] for r in records], "record_keys": sorted(records[0])},
            "norm": normalisation_run(paths, "norm-micro4", {"num_gpus": 1, "train_micro_batch_size_per_gpu": 4,
                                                             "gradient_accumulation_steps": 1}),
            "unmasked": unmasked_parity(paths)}


SFT_LAYOUTS = {
    "dp2-zero2": {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 1},
    "tp2": {"model_parallel_size": 2},
    "pp2": {"pipe_parallel_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4},
}
NORM_LAYOUTS = {
    "micro1-accum2-dp2": {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2},
    "micro2-accum1-dp2": {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1},
    "pp2-micro1-accum4": {"pipe_parallel_size": 2, "train_micro_batch_size_per_gpu": 1,
                          "gradient_accumulation_steps": 4},
    "tp2-micro2-accum2": {"model_parallel_size": 2, "train_micro_batch_size_per_gpu": 2,
                          "gradient_accumulation_steps": 2},
}


def _model_parallel(layout: dict) -> bool:
    return layout.get("model_parallel_size", 1) > 1 or layout.get("pipe_parallel_size", 0) > 0


def two_ranks(paths: dict[str, str]) -> dict:
    out: dict[str, dict] = {"sft": {}, "norm": {}}
    # Data-parallel-only engines first: a tp/pp engine leaves DeepSpeed's global mpu behind, which a later engine
    # without one would pick up.
    for model_parallel in (False, True):
        for kind, layouts, run in (("sft", SFT_LAYOUTS, sft_run), ("norm", NORM_LAYOUTS, normalisation_run)):
            for name, extra in layouts.items():
                if _model_parallel(extra) == model_parallel:
                    out[kind][name] = run(paths, name, {"num_gpus": 2, **extra})
    return out if dist.get_rank() == 0 else {}


def unmasked_parity(paths: dict[str, str]) -> dict:
    """Pre-training batches (no masks): the engine's loss and update against causal_lm_loss's mean, bit for bit."""
    from neox.checkpoint.consolidated import read_consolidated
    from neox.train.objectives import LanguageModelObjective

    cfg = _config(paths, "unmasked", {**NORM_RUN, "num_gpus": 1, "train_micro_batch_size_per_gpu": 2,
                                      "gradient_accumulation_steps": 2})
    engine, _ = _engine(cfg, paths, LanguageModelObjective())
    grads = _gradients_at_step(engine.engine)
    batch = {**uneven_batch(), "loss_mask": torch.ones(GLOBAL, SEQ)}
    micro = _mine(batch, 2, 2, 0, 1)
    loss, _ = engine.step(iter(micro), 2, LR)
    model = GPTNeoX(cfg.model)
    model.load_state_dict(read_consolidated(paths["neox"])[1])
    # Today's arithmetic: each micro-batch's own mean, DeepSpeed's 1/grad_accum in backward, the mean for the log.
    reference = [causal_lm_loss(model(b["tokens"], position_ids=b["position_ids"]), b["labels"], b["loss_mask"])
                 for b in micro]
    for r in reference:
        (r / 2).backward()
    expected = torch.stack([r.detach() for r in reference]).mean()
    reference_grads = dict(model.named_parameters())
    return {"loss": float(loss), "expected": float(expected), "bitwise_loss": bool(torch.equal(loss, expected)),
            "bitwise_gradients": all(torch.equal(g, reference_grads[n].grad) for n, g in grads.items()),
            "max_gradient_error": max(float((g - reference_grads[n].grad).abs().max()) for n, g in grads.items())}

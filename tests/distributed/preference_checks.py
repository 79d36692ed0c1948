"""DPO, KTO and reward-model runs of neox and of TRL on the same tiny model, data and batch order (module level: the
spawned ranks and the TRL process of tests/distributed/test_preference.py import it).

TRL's settings, each chosen to be the run neox does (and why):
- fp32 (bf16=False, fp16=False: transformers 5 otherwise autocasts to bf16 on CPUs that have it), dropout 0;
- AdamW fused (optim adamw_torch_fused: neox's torch AdamW(fused=True) on CPU), lr 1e-3 constant
  (lr_scheduler_type constant, warmup 0), betas (0.9, 0.95), weight decay 0.1 (both decay exactly the matrices: HF
  skips biases and norms, neox every 1-D parameter), no clipping (max_grad_norm 0 / gradient_clipping 0); eps 1e-5,
  not 1e-8: a Bradley-Terry loss has exactly zero gradient along a shift of every score (the final norm's bias), and
  Adam divides that direction's rounding noise by its own size, so with eps 1e-8 both runs' mean reward drifts by
  noise (2e-5 in 5 steps) while loss and margin agree to 1e-6; eps 1e-5 keeps the drift at 1e-6;
- per_device_train_batch_size 2, gradient_accumulation_steps 2 (neox: micro-batch 2 x accumulation 2), 5 steps,
  train_sampling_strategy sequential (neox's batches are built in the same order), seed 0;
- DPO / KTO: an explicit ref_model (a copy of the initial model), precompute_ref_log_probs False, loss_type sigmoid /
  kto, beta 0.1, weights 1.0; KTO's data alternates desirable / undesirable so each micro-batch holds one of each
  (TRL's per-step rewards/* are means of per-micro-batch means, neox's global-batch means: equal then);
- reward model: num_labels 1, pad token [PAD] (not end-of-text: Hugging Face scores the last non-pad token),
  center_rewards_coefficient None (neox z_loss 0).
TRL adds the end-of-text token to each completion; neox's rows are the same token ids with labels on the completion
(for the reward model: gpt-neox's --for-rm layout, end-of-text twice and only the last one trained).
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch
import yaml

VOCAB = 64
SEQ = 24
STEPS = 5
MICRO = 2
ACCUM = 2
LR = 1e-3
EOS, PAD = 1, 0
MODEL = {"padded_vocab_size": VOCAB, "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": SEQ,
         "max_position_embeddings": SEQ, "pos_emb": "rotary", "rotary_pct": 0.25, "norm": "layernorm",
         "gpt_j_residual": True, "activation": "gelu", "hidden_dropout": 0.0, "attention_dropout": 0.0,
         "no_weight_tying": True, "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM,
         "optimizer": {"type": "Adam", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1.0e-5}},
         "weight_decay": 0.1, "gradient_clipping": 0.0, "lr_decay_style": "constant", "train_iters": STEPS,
         "precision": "fp32", "pack_impl": "unpacked", "tokenizer_type": "CharLevelTokenizer"}
PAIRWISE = {"dataset_impl": "pairwise", "pos_train_data_paths": ["chosen"], "neg_train_data_paths": ["rejected"]}
OBJECTIVES = {
    "dpo": {"train_impl": "dpo", "dpo_beta": 0.1, **PAIRWISE},
    "kto": {"train_impl": "kto", "kto_beta": 0.1, "train_data_paths": ["kto"], "train_reward_data_paths": ["reward"]},
    "rm": {"train_impl": "rm", **PAIRWISE},
}
# TRL's log keys -> ours, per objective.
TRL_NAMES = {
    "dpo": {"loss": "loss", "rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
            "rewards/accuracies": "rewards_accuracy", "rewards/margins": "rewards_margin",
            "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected"},
    "kto": {"loss": "loss", "rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
            "rewards/margins": "rewards_margin", "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected",
            "kl": "kl"},
    "rm": {"loss": "loss", "accuracy": "rewards_accuracy", "margin": "rewards_margin"},
}


def config(objective: str, extra: dict | None = None, ranks: int = 1):
    from neox.config import load_config

    path = Path(tempfile.mkdtemp(prefix=f"{objective}-")) / "run.yml"
    path.write_text(yaml.safe_dump({**MODEL, **OBJECTIVES[objective], "num_gpus": ranks, **(extra or {})}))
    return load_config([path], vocab_size=VOCAB)


def initial_weights(objective: str) -> dict[str, torch.Tensor]:
    from neox.model import GPTNeoX

    cfg = config(objective)
    torch.manual_seed(0)
    return GPTNeoX(cfg.model, value_head=objective == "rm").state_dict()


# --------------------------------------------------------------------------------------------- data

def _words(generator: torch.Generator, n: int) -> str:
    return " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 2, (n,), generator=generator))


def rows(objective: str) -> list[dict]:
    """TRL's dataset rows: STEPS x MICRO x ACCUM examples, in training order."""
    g = torch.Generator().manual_seed(3)
    n = STEPS * MICRO * ACCUM
    if objective == "kto":
        return [{"prompt": _words(g, 3 + i % 3), "completion": " " + _words(g, 2 + i % 3), "label": i % 2 == 0}
                for i in range(n)]
    pairs = [{"prompt": _words(g, 3 + i % 3), "chosen": " " + _words(g, 2 + i % 2),
              "rejected": " " + _words(g, 1 + i % 4)} for i in range(n)]
    if objective == "rm":  # RewardTrainer scores whole texts
        return [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in pairs]
    return pairs


def _word_level(eos: str):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", eos] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_word_level("<eos>"), eos_token="<eos>", pad_token="[PAD]")


def word_level_tokenizer(path: Path) -> None:
    """The same ids as a tokenizer.json neox's HFTokenizer reads (end of document: gpt-neox's <|endoftext|>)."""
    _word_level("<|endoftext|>").save(str(path))


def _ids(text: str) -> list[int]:
    return [int(w[1:]) + 2 for w in text.split()]


def sequences(objective: str) -> list[tuple[list[int], int]]:
    """(token ids, index of the first trained token) of each row in neox's batch order: pairwise objectives give the
    chosen row then the rejected row of each pair (split into micro-batches later)."""
    out = []
    for row in rows(objective):
        if objective == "kto":
            prompt = _ids(row["prompt"])
            out.append((prompt + _ids(row["completion"]) + [EOS], len(prompt)))
        elif objective == "dpo":
            prompt = _ids(row["prompt"])
            out.append((prompt + _ids(row["chosen"]) + [EOS], len(prompt)))
            out.append((prompt + _ids(row["rejected"]) + [EOS], len(prompt)))
        else:  # --for-rm: the text, end-of-text twice, only the last one trained
            for side in ("chosen", "rejected"):
                ids = _ids(row[side]) + [EOS, EOS]
                out.append((ids, len(ids) - 1))
    return out


def _rows_batch(seqs: list[tuple[list[int], int]], rewards: list[float] | None = None) -> dict[str, torch.Tensor]:
    n = len(seqs)
    tokens, labels = torch.zeros(n, SEQ, dtype=torch.long), torch.zeros(n, SEQ, dtype=torch.long)
    mask = torch.zeros(n, SEQ)
    for r, (ids, first) in enumerate(seqs):
        s = torch.tensor(ids)
        tokens[r, :len(s) - 1], labels[r, :len(s) - 1] = s[:-1], s[1:]
        mask[r, first - 1:len(s) - 1] = 1
    batch = {"tokens": tokens, "labels": labels, "loss_mask": mask,
             "position_ids": torch.arange(SEQ).expand(n, SEQ).contiguous()}
    if rewards is not None:
        batch["reward"] = torch.tensor(rewards)[:, None].expand(n, SEQ).contiguous()
    return batch


def global_batches(objective: str) -> list[list[dict[str, torch.Tensor]]]:
    """Per step, the global batch as MICRO x ACCUM-sized micro-batches (neox's loader layout)."""
    seqs = sequences(objective)
    per_row = 1 if objective == "kto" else 2
    rewards = [1.0 if r["label"] else -1.0 for r in rows("kto")] if objective == "kto" else None
    steps = []
    for step in range(STEPS):
        micro = []
        for k in range(ACCUM):
            first = (step * ACCUM + k) * MICRO
            if per_row == 1:
                micro.append(_rows_batch(seqs[first:first + MICRO], rewards[first:first + MICRO]))
            else:  # chosen rows, then their rejected rows
                pairs = seqs[2 * first: 2 * (first + MICRO)]
                micro.append(_rows_batch(pairs[0::2] + pairs[1::2]))
        steps.append(micro)
    return steps


# --------------------------------------------------------------------------------------------- neox

def train_steps(train_engine, objective: str, dp_rank: int = 0, dp_size: int = 1) -> list[dict]:
    """STEPS steps; this dp rank takes its share of each global batch's micro-batches. Every rank returns the step's
    global loss and metrics."""
    from neox.parallel.runtime import all_reduce_mean

    records = []
    for micro in global_batches(objective):
        share = len(micro) // dp_size
        mine = micro[dp_rank * share:(dp_rank + 1) * share]
        loss, _ = train_engine.step(iter(mine), share, LR)
        records.append({"loss": float(all_reduce_mean(loss)), **train_engine.last_metrics})
    return records


def neox_run(objective: str, extra: dict | None = None, ranks: int = 1) -> list[dict]:
    """The objective's STEPS steps at this process's layout (extra: the layout keys), from initial_weights."""
    from neox.model import GPTNeoX
    from neox.parallel.topology import topology_for
    from neox.train.engine import build_train_engine
    from neox.train.objectives import build_objective

    cfg = config(objective, extra, ranks)
    model = GPTNeoX(cfg.model, value_head=objective == "rm")
    model.load_state_dict(initial_weights(objective))
    topo = topology_for(cfg.parallel)
    engine = build_train_engine(cfg, model, torch.device("cpu"), topo, build_objective(cfg))
    return train_steps(engine, objective, topo.dp_rank, topo.dp_size)


def _model_parallel(layout: dict) -> bool:
    return layout.get("model_parallel_size", 1) > 1 or layout.get("pipe_parallel_size", 0) > 0


def one_rank(objectives: list[str]) -> dict[str, list[dict]]:
    """Every objective's run on one rank (the reference of the layouts)."""
    return {o: neox_run(o) for o in objectives}


# Each multi-rank layout keeps the global batch (4 rows, or 4 pairs) and the micro-batch of 2 (KTO's KL estimate pairs
# the rows of a micro-batch): dp2 splits the accumulation over the ranks.
LAYOUTS = {
    "dp2-zero2": {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 1},
    # The threshold keeps the biases and norms (32 values) gathered between steps and partitions the matrices: the
    # reference swaps both kinds.
    "dp2-zero3": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100},
                  "gradient_accumulation_steps": 1},
    "tp2": {"model_parallel_size": 2},
    "pp2": {"pipe_parallel_size": 2},
}


# Layouts run for some objectives only: ZeRO-3 is there for the frozen reference (the reward model has none).
LAYOUT_OBJECTIVES = {"dp2-zero3": ("dpo", "kto")}


def layout_runs(objectives: list[str]) -> list[tuple[str, str]]:
    """Every (objective, layout) the 2-rank launch runs."""
    return [(o, name) for name in LAYOUTS for o in objectives if o in LAYOUT_OBJECTIVES.get(name, objectives)]


def layouts_on_two_ranks(layouts: dict[str, dict], objectives: list[str]) -> dict[str, list[dict]]:
    """Every (objective, layout) run in one 2-rank launch; rank 0 returns them by 'objective/layout'. Data-parallel
    layouts first: a tp/pp engine leaves DeepSpeed's global mpu behind, which a later engine without one picks up."""
    ordered = sorted(layouts.items(), key=lambda item: _model_parallel(item[1]))
    out = {f"{o}/{name}": neox_run(o, extra, ranks=2) for name, extra in ordered for o in objectives
           if o in LAYOUT_OBJECTIVES.get(name, objectives)}
    return out if torch.distributed.get_rank() == 0 else {}


# --------------------------------------------------------------------------------------------- the training loop

LOOP_STEPS = 2


def data_keys(objective: str, root: Path) -> dict:
    """The data keys of the shards write_data wrote to root."""
    if objective == "kto":
        return {"train_data_paths": [str(root / "kto")], "train_label_data_paths": [str(root / "kto_label")],
                "train_reward_data_paths": [str(root / "kto_reward")]}
    return {f"{side}_train{label}_data_paths": [str(root / f"{side}{label}")] for side in ("pos", "neg")
            for label in ("", "_label")}


def write_data(objective: str, root: Path) -> dict:
    """The first global batch's examples as the shards tools/preprocess_data_with_chat_template.py writes (int32
    tokens, labels -100 where not trained, one int32 reward per document); returns the data keys of the run config.
    One global batch of data: every step of the loop trains on all of it, so its first step's loss and metrics (means
    over the global batch, the policy still the reference) do not depend on the order the loader draws it in."""
    import numpy as np

    from neox.data.indexed import IndexedDatasetWriter

    def shard(name: str, documents: list[list[int]]) -> str:
        with IndexedDatasetWriter(root / name, np.int32) as writer:
            for doc in documents:
                writer.add_document(doc)
        return str(root / name)

    examples = MICRO * ACCUM
    seqs = sequences(objective)[:examples * (1 if objective == "kto" else 2)]
    labels = [[-100] * first + ids[first:] for ids, first in seqs]
    if objective == "kto":
        rewards = [[1 if r["label"] else -1] for r in rows("kto")[:examples]]
        return {"train_data_paths": [shard("kto", [ids for ids, _ in seqs])],
                "train_label_data_paths": [shard("kto_label", labels)],
                "train_reward_data_paths": [shard("kto_reward", rewards)]}
    keys = {}
    for side, offset in (("pos", 0), ("neg", 1)):  # sequences() alternates chosen, rejected
        keys[f"{side}_train_data_paths"] = [shard(side, [ids for ids, _ in seqs[offset::2]])]
        keys[f"{side}_train_label_data_paths"] = [shard(f"{side}_label", labels[offset::2])]
    return keys


def loop_run(objective: str, root: Path | None = None, extra: dict | None = None) -> list[dict]:
    """LOOP_STEPS steps of neox's training loop (neox.train.run.Trainer) on the objective's data shards (written to
    root, a new directory if None; extra: more config keys): its metrics.jsonl step records."""
    import json

    from neox.config import load_config
    from neox.parallel.runtime import Runtime
    from neox.train.run import Trainer

    if root is None:
        root = Path(tempfile.mkdtemp(prefix=f"{objective}-loop-"))
        write_data(objective, root)
    keys = {**MODEL, **OBJECTIVES[objective], **data_keys(objective, root), **(extra or {}), "train_iters": LOOP_STEPS,
            "log_interval": 1, "eval_iters": 0, "num_workers": 0, "log_dir": str(root / "logs"), "seed": 1234,
            "peak_flops": 1.0e12}  # no MFU probe
    (root / "run.yml").write_text(yaml.safe_dump(keys))
    cfg = load_config([root / "run.yml"], vocab_size=VOCAB, local_gpus=1)
    trainer = Trainer(cfg, root / "run.yml", Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    # The engines' starting weights (in place: the optimizer holds these very tensors; the reference is frozen at the
    # first step).
    trainer.train_engine.engine.module.load_state_dict(initial_weights(objective))
    try:
        trainer.run()
    finally:
        trainer.close()
    records = [json.loads(line) for line in (root / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


# --------------------------------------------------------------------------------------------- TRL

def _trl_args(cls, **extra):
    return cls(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
               max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
               weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-5, optim="adamw_torch_fused",
               logging_steps=1, report_to=[], train_sampling_strategy="sequential", use_cpu=True,
               save_strategy="no", dataloader_num_workers=0, seed=0, bf16=False, fp16=False, **extra)


def _hf_causal_lm(weights: dict[str, torch.Tensor]):
    from transformers import GPTNeoXForCausalLM

    from neox.model.hf import model_cfg_to_hf_config, to_hf_state_dict

    cfg = config("dpo").model
    model = GPTNeoXForCausalLM(model_cfg_to_hf_config(cfg, "gpt_neox"))
    model.load_state_dict(to_hf_state_dict(cfg, weights, "gpt_neox"))
    return model


def hf_reward_model(weights: dict[str, torch.Tensor]):
    """Our reward model as GPTNeoXForSequenceClassification, through the export's own mapping."""
    from transformers import GPTNeoXForSequenceClassification

    from neox.checkpoint.hf_reward import reward_hf_config, to_hf_reward_state_dict

    cfg = config("rm").model
    model = GPTNeoXForSequenceClassification(reward_hf_config(cfg, "gpt_neox", VOCAB, PAD))
    model.load_state_dict(to_hf_reward_state_dict(cfg, weights, "gpt_neox", VOCAB))
    return model


def trl_run(objective: str) -> list[dict]:
    """TRL's per-step logs of the same run."""
    from datasets import Dataset

    os.environ.setdefault("WANDB_DISABLED", "true")
    data = Dataset.from_list(rows(objective))
    weights = initial_weights(objective)
    if objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        model = _hf_causal_lm(weights)
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), processing_class=tokenizer(),
                             train_dataset=data, args=_trl_args(DPOConfig, beta=0.1, loss_type=["sigmoid"]))
    elif objective == "kto":
        from trl import KTOConfig, KTOTrainer

        model = _hf_causal_lm(weights)
        trainer = KTOTrainer(model=model, ref_model=copy.deepcopy(model), processing_class=tokenizer(),
                             train_dataset=data, args=_trl_args(KTOConfig, beta=0.1, loss_type="kto",
                                                                desirable_weight=1.0, undesirable_weight=1.0))
    else:
        from trl import RewardConfig, RewardTrainer

        trainer = RewardTrainer(model=hf_reward_model(weights), processing_class=tokenizer(), train_dataset=data,
                                args=_trl_args(RewardConfig, center_rewards_coefficient=None))
    trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r]


PRECOMPUTE_NAME = "ref"


def precomputed_dpo_loop() -> dict:
    """DPO's training loop reading reference log-probs that `deepy generate` (text_gen_type precompute, 2 ranks
    sharing out the documents in rounds of 3 each) wrote from a checkpoint of the starting weights: its step records,
    and the document counts of the data and of the files."""
    import subprocess
    import sys

    from neox.checkpoint.consolidated import save_consolidated
    from neox.data.formats import open_indexed
    from tests.e2e.train_helpers import CPU_LAUNCH_CONFIG, DEEPY, LAUNCH_TIMEOUT_S, REPO_ROOT, free_port

    root = Path(tempfile.mkdtemp(prefix="dpo-precompute-"))
    keys = write_data("dpo", root)
    # The launcher checks the vocabulary against the tokenizer's: a word-level one of exactly VOCAB entries.
    word_level_tokenizer(root / "tokenizer.json")
    vocab = {"tokenizer_type": "HFTokenizer", "vocab_file": str(root / "tokenizer.json"), "log_dir": str(root / "logs"),
             "sample_output_file": str(root / "samples.jsonl")}
    checkpoint = save_consolidated(root / "reference", config("dpo", vocab), initial_weights("dpo"),
                                   [root / "tokenizer.json"])
    run_yml = root / "generate.yml"
    run_yml.write_text(yaml.safe_dump({**MODEL, **OBJECTIVES["dpo"], **keys, **vocab, "text_gen_type": "precompute",
                                       "precompute_model_name": PRECOMPUTE_NAME, "generate_batch_size": 3}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    done = subprocess.run([sys.executable, str(DEEPY), "generate", str(run_yml), str(CPU_LAUNCH_CONFIG), "--load",
                           str(checkpoint), "--num_gpus", "2", "--master_port", str(free_port())], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)
    if done.returncode != 0:
        raise RuntimeError((done.stdout + done.stderr)[-5000:])
    counts = {side: (len(open_indexed(root / side)), len(open_indexed(root / f"{side}_{PRECOMPUTE_NAME}")))
              for side in ("pos", "neg")}
    records = loop_run("dpo", root, {"precompute_model_name": PRECOMPUTE_NAME})
    return {"records": records, "counts": counts}


def trl_runs(objectives: list[str]) -> dict[str, list[dict]]:
    """TRL's logs of every objective (one process: the imports are paid once)."""
    return {o: trl_run(o) for o in objectives}


def one_rank_and_trl(objectives: list[str]) -> dict[str, dict[str, list[dict]]]:
    """Our one-rank runs and training-loop runs, then TRL's, in one process (a spawned rank: TRL's and accelerate's
    global state end with it)."""
    return {"one": one_rank(objectives), "loop": {o: loop_run(o) for o in objectives},
            "precomputed": precomputed_dpo_loop(), "trl": trl_runs(objectives)}

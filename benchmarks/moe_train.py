"""Benchmark: training tokens/s of our mixture-of-experts model vs transformers' MixtralForCausalLM on the same weights.

One process, one rank, fp32 on the CPU, torch's default thread count. Both sides train the same 8-expert top-2
Mixtral-shaped model (4 layers, hidden 256, 8 heads / 2 key-value heads, rotary, RMSNorm, SwiGLU experts of width
512, untied head, vocab 4096) on the same random tokens, micro-batch 4 x seq 256, gradient clipping 1.0, AdamW,
the router's load-balancing loss at weight 0.01 on both sides:
  - ours: GPTNeoX with MoE blocks (neox/model/moe.py: tokens sorted by expert, one matmul per expert over its
    slice) in neox.train.engine.TrainEngine, the DeepSpeed engine and step neox/train/run.py trains with;
  - HF: transformers' MixtralForCausalLM holding our initial weights (mixtral_state_dict maps them; the logits of
    the two models are compared before timing), output_router_logits on, loss.backward(), clip_grad_norm_, a second
    instance of our optimizer (same class and settings), zero_grad. transformers 5 runs its experts through an
    "experts implementation": measured both ways, `grouped_mm` (its default: torch's grouped matmul kernel, which on
    the CPU is much slower than a loop) and `eager` (a Python loop over the experts a batch hits). The ratio that
    counts is against the faster of the two.
The sides alternate in rounds (the order rotates each round) so a shared machine's load drifts onto all of them
alike; every figure is the median over the timed steps with its spread (quartiles, min, max), and the ratios are
given in wall time and in CPU time per step (the second is less sensitive to other jobs on a shared machine). JSON
goes to --output (default stdout); --quick runs a smaller model for 2 rounds of 1 step (unless --rounds / --steps say
otherwise), to check that the benchmark works.

    python benchmarks/moe_train.py --output benchmarks/results/moe_train.json
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from spread import summary, write_json
from train_throughput import StepTime, describe_optimizer, same_optimizer, timed_train_step

SHAPE = {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 8, "num_kv_heads": 2, "expert_width": 512,
         "experts": 8, "top_k": 2, "vocab": 4096, "seq_length": 256, "micro_batch": 4}
QUICK_SHAPE = {**SHAPE, "num_layers": 2, "hidden_size": 128, "expert_width": 256, "seq_length": 128,
               "micro_batch": 2}
LR, BETAS, EPS, WEIGHT_DECAY, CLIP, AUX = 6.0e-4, (0.9, 0.95), 1.0e-8, 0.1, 1.0, 0.01
RMS_EPS, ROPE_BASE = 1.0e-5, 10000.0
RATIO_TARGET = 1.5


def our_config(tmp_dir: Path, shape: dict):
    from neox.config import load_config

    values = {
        "num_layers": shape["num_layers"], "hidden_size": shape["hidden_size"],
        "num_attention_heads": shape["num_attention_heads"], "num_kv_heads": shape["num_kv_heads"],
        "seq_length": shape["seq_length"], "max_position_embeddings": shape["seq_length"], "pos_emb": "rotary",
        "rotary_pct": 1.0, "rotary_emb_base": ROPE_BASE, "norm": "rmsnorm", "rms_norm_epsilon": RMS_EPS,
        "use_bias_in_norms": False, "use_bias_in_attn_linear": False, "use_bias_in_mlp": False,
        "activation": "swiglu", "no_weight_tying": True, "gpt_j_residual": False,
        "moe_num_experts": shape["experts"], "moe_top_k": shape["top_k"], "moe_router_type": "topk",
        "moe_norm_topk_prob": True, "moe_intermediate_size": shape["expert_width"], "moe_aux_loss_coeff": AUX,
        "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "optimizer": {"type": "Adam", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS}},
        "weight_decay": WEIGHT_DECAY, "gradient_clipping": CLIP, "lr_decay_style": "constant",
        "train_micro_batch_size_per_gpu": shape["micro_batch"], "gradient_accumulation_steps": 1,
        "num_gpus": 1, "train_iters": 1000, "zero_optimization": {"stage": 0}, "precision": "fp32",
    }
    path = tmp_dir / "bench_moe.yml"
    path.write_text(yaml.safe_dump(values))
    return load_config([path], vocab_size=shape["vocab"])


def mixtral_config(shape: dict, experts_implementation: str):
    from transformers import MixtralConfig

    config = MixtralConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden_size"], intermediate_size=shape["expert_width"],
        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_kv_heads"], max_position_embeddings=shape["seq_length"],
        rms_norm_eps=RMS_EPS, rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE},
        num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"], output_router_logits=True,
        router_aux_loss_coef=AUX, router_jitter_noise=0.0, attention_dropout=0.0, tie_word_embeddings=False,
        sliding_window=None, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config._experts_implementation = experts_implementation
    return config


def mixtral_state_dict(model) -> dict[str, torch.Tensor]:
    """Our MoE GPTNeoX's weights under transformers' MixtralForCausalLM names (until tools/convert_neox_to_hf.py
    has Mixtral): attention, norms, embedding and head as our Llama export writes them (neox/model/hf.py, on a
    dense twin config), the experts as transformers 5 holds them (neox/model/moe.py's docstring)."""
    from neox.model.hf import to_hf_state_dict

    cfg = model.cfg
    dense = dataclasses.replace(cfg, moe_num_experts=1, moe_intermediate_size=None)
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    for i in range(cfg.num_layers):  # placeholders for the dense MLP the Llama export expects
        for name, shape in (("linear1", (dense.mlp_inner_size, cfg.hidden_size)),
                            ("gate", (dense.mlp_inner_size, cfg.hidden_size)),
                            ("linear2", (cfg.hidden_size, dense.mlp_inner_size))):
            state[f"blocks.{i}.mlp.{name}.weight"] = torch.zeros(shape)
    out = {k: v for k, v in to_hf_state_dict(dense, state, "llama").items() if ".mlp." not in k}
    for i, block in enumerate(model.blocks):
        moe, prefix = block.mlp, f"model.layers.{i}.mlp."
        out[prefix + "gate.weight"] = moe.router.weight.detach().clone()
        out[prefix + "experts.gate_up_proj"] = torch.cat([moe.experts.gate.weight, moe.experts.linear1.weight],
                                                         dim=1).detach().clone()
        out[prefix + "experts.down_proj"] = moe.experts.linear2.weight.detach().transpose(1, 2).contiguous()
    return out


def build_ours(tmp_dir: Path, shape: dict):
    from neox.model import GPTNeoX
    from neox.parallel.runtime import init_runtime
    from neox.train.engine import TrainEngine

    cfg = our_config(tmp_dir, shape)
    init_runtime("gloo")  # a world of one
    torch.manual_seed(0)
    model = GPTNeoX(cfg.model)
    initial = mixtral_state_dict(model)
    train_engine = TrainEngine(cfg, model, torch.device("cpu"))
    return timed_train_step(train_engine, LR), model, train_engine.engine.optimizer, initial


def build_hf(shape: dict, initial: dict[str, torch.Tensor], ours_optimizer, experts_implementation: str):
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM(mixtral_config(shape, experts_implementation))
    model.load_state_dict(initial, strict=True)
    model.train()
    optimizer = same_optimizer(ours_optimizer, model)

    def step(batch: dict[str, torch.Tensor]) -> StepTime:
        wall, cpu = time.perf_counter(), time.process_time()
        # shift_labels: the next tokens as given (ours), so both sides score every position
        out = model(input_ids=batch["tokens"], labels=batch["labels"], shift_labels=batch["labels"])
        out.loss.backward()
        lm_loss = float(out.loss.detach() - AUX * out.aux_loss.detach())
        optimizer_start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        return StepTime(end - wall, end - optimizer_start, time.process_time() - cpu, lm_loss)

    return step, model, optimizer


def same_function(ours, hf, batch: dict[str, torch.Tensor]) -> float:
    """Largest |logit difference| of the two models on a batch, before any training (evaluation mode)."""
    ours.eval(), hf.eval()
    with torch.no_grad():
        diff = (ours(batch["tokens"]) - hf(input_ids=batch["tokens"]).logits).abs().max()
    ours.train(), hf.train()
    return float(diff)


def random_batches(count: int, shape: dict, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    b, s = shape["micro_batch"], shape["seq_length"]
    batches = []
    for _ in range(count):
        text = torch.randint(0, shape["vocab"], (b, s + 1), generator=gen)
        batches.append({"tokens": text[:, :-1].contiguous(), "labels": text[:, 1:].contiguous(),
                        "loss_mask": torch.ones(b, s), "position_ids": torch.arange(s).expand(b, s)})
    return batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="write the JSON here (default: stdout)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; --quick: 2)")
    parser.add_argument("--steps", type=int, help="timed steps per side per round (default 2; --quick: 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side first (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller model (2 layers, hidden 128, seq 128), by default 2 rounds of 1 step: checks "
                             "it runs")
    args = parser.parse_args(argv)
    shape = QUICK_SHAPE if args.quick else SHAPE
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.steps is None:
        args.steps = 1 if args.quick else 2
    if min(args.rounds, args.steps) < 1 or args.warmup < 0:
        parser.error("--rounds and --steps must be >= 1, --warmup >= 0")

    with tempfile.TemporaryDirectory() as tmp:
        ours_step, ours_model, ours_optimizer, initial = build_ours(Path(tmp), shape)
    batches = random_batches(4, shape)
    sides = {"ours": ours_step}
    hf_models = {}
    for implementation in ("grouped_mm", "eager"):
        step, model, hf_optimizer = build_hf(shape, initial, ours_optimizer, implementation)
        sides[f"hf_{implementation}"] = step
        hf_models[implementation] = model
    logit_diff = {name: same_function(ours_model, model, batches[0]) for name, model in hf_models.items()}
    params = sum(p.numel() for p in ours_model.parameters())
    hf_params = sum(p.numel() for p in hf_models["eager"].parameters())
    if params != hf_params:
        raise RuntimeError(f"the models differ in size: ours {params} vs HF {hf_params} parameters")

    timings: dict[str, list[StepTime]] = {name: [] for name in sides}
    for name, step in sides.items():
        for i in range(args.warmup):
            timings[name].append(step(batches[i % len(batches)]))  # the first step's losses: the same model
    first_losses = {name: t[0].loss for name, t in timings.items()} if args.warmup else {}
    timings = {name: [] for name in sides}
    names = list(sides)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            for i in range(args.steps):
                timings[name].append(sides[name](batches[(r * args.steps + i) % len(batches)]))
            recent = summary([t.total for t in timings[name][-args.steps:]])["median"]
            print(f"round {r + 1}/{args.rounds} {name}: {recent:.3f} s/step", file=sys.stderr, flush=True)

    tokens_per_step = shape["micro_batch"] * shape["seq_length"]
    result: dict = {
        "benchmark": "moe_train",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "load_avg_1m": os.getloadavg()[0]},
        "model": {**shape, "parameters": params, "precision": "fp32", "aux_loss_coeff": AUX},
        "same_weights": {"max_abs_logit_diff_before_training": logit_diff,
                         "first_step_lm_loss": first_losses},
        "optimizer": describe_optimizer(ours_optimizer),
        "method": {"rounds": args.rounds, "steps_per_round": args.steps, "warmup": args.warmup, "quick": args.quick,
                   "order": "rotated each round", "statistic": "median over the timed steps, with quartiles, min and "
                                                             "max; tokens/s and the ratios from the medians"},
    }
    for name in sides:
        steps = timings[name]
        total = summary([t.total for t in steps])
        result[name] = {"step_s": total, "forward_backward_s": summary([t.total - t.optimizer for t in steps]),
                        "optimizer_step_s": summary([t.optimizer for t in steps]),
                        "step_cpu_s": summary([t.cpu for t in steps]),
                        "tokens_per_sec": tokens_per_step / total["median"]}
    ours_tps = result["ours"]["tokens_per_sec"]
    ratios = {name: ours_tps / result[name]["tokens_per_sec"] for name in sides if name != "ours"}
    best_hf = min(ratios, key=ratios.get)
    # CPU seconds per step: on a machine other jobs load, wall time also counts the waits for a core; CPU time
    # counts only the work (and any spinning of torch's threads), a second reading of the same comparison.
    cpu_ratios = {name: result[name]["step_cpu_s"]["median"] / result["ours"]["step_cpu_s"]["median"]
                  for name in ratios}
    result["ours_vs_hf"] = {
        "ratio_by_implementation": ratios,
        "cpu_time_ratio_by_implementation": cpu_ratios,
        "ratio": ratios[best_hf], "against": best_hf, "target": RATIO_TARGET,
        "met": None if args.quick else ratios[best_hf] >= RATIO_TARGET,
        "reading": "tokens/s ours / HF's: above 1 means ours is faster; 'ratio' is against HF's faster side",
    }
    write_json(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

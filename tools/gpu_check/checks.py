"""The seven checks of tools/gpu_check.sh, each through the product's own paths (deepy launches, the HF exporter,
neox.checkpoint.load_model), with its time limit on one GPU. The limits add up to BUDGET_S (7 min 35 s), so with
Python's start-up the whole command ends within 8 minutes.

| check             | limit | what passes                                                                          |
| train_bf16        | 120 s | configs/125M.yml in bf16 with ZeRO-1, 20 steps: all logged, loss falls, checkpoint   |
|                   |       | written; MFU = the run's TFLOP/s over the GPU's datasheet peak                       |
|                   |       | (neox/train/accelerators.py), and the run's own MFU agrees (same denominator)        |
| fp16              |  75 s | 125M.yml as shipped (fp16, dynamic loss scaling), 10 steps: finite losses that fall  |
| two_ranks_refused |  20 s | deepy train --num_gpus 2 on this one GPU exits 2 naming num_gpus, launching no rank  |
| flash_sdpa        |  30 s | the model's attention at 125M's shapes in bf16 runs with only SDPA's flash backend   |
|                   |       | allowed, and the profiler shows torch picking flash forward and backward by itself   |
| export_logits     |  60 s | tools/convert_neox_to_hf.py on the checkpoint; transformers' logits on the GPU equal |
|                   |       | neox's within 1e-3 (fp32) with the same argmax everywhere                            |
| generate          |  75 s | deepy generate (KV cache, greedy, fp32) writes transformers' tokens on the export    |
|                   |       | (>= 90% leading agreement); neox's decoding (generate's SampleMaker) makes at least  |
|                   |       | 0.9x transformers' tokens/s, the two taking turns in one process                     |
| eval_piqa         |  75 s | deepy eval on 50 PIQA items vs lm_eval's `hf` model on the export: acc and acc_norm  |
|                   |       | equal to 4 decimals                                                                  |

torch, transformers and lm_eval are imported inside the checks, so that --help, --list and the GPU gate stay quick.
On --device cpu (the test's plumbing mode) the same functions run tiny stand-ins; fp16 and the two-rank refusal
need a GPU and are skipped there.
"""
from __future__ import annotations

import functools
import gc
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tools.gpu_check.report import Figure
from tools.gpu_check.runner import Check, Context, Result, Skip
from tools.gpu_check.workspace import REPO, read_metrics

TRAIN_STEPS = 20
FP16_STEPS = 10
WARMUP_STEPS = 5  # not in the throughput figures: allocator, cuBLAS and kernel selection settle first
MFU_AGREEMENT = 0.01  # the run's MFU vs ours, both over the datasheet peak
LOGITS_ATOL = 1e-3  # fp32, 12 layers: kernel-order differences stay near 1e-5 relative
PROMPTS, PROMPT_TOKENS, NEW_TOKENS, SPEED_ROUNDS = 8, 24, 128, 3  # one batch of prompts, decoded 1 + 3 times a side
MIN_LEADING_AGREEMENT = 0.9
MIN_SPEED_RATIO = 0.9
PIQA_ITEMS = 50
EVAL_BATCH = 16


def _torch_device(ctx: Context):
    import torch

    return torch.device(ctx.device)


def _in_process(check: Callable[[Context], Result]) -> Callable[[Context], Result]:
    """A check that runs models in this process: once it returns, the GPU memory they held goes back to the driver
    (torch's allocator would keep it cached), for the launches that follow."""
    @functools.wraps(check)
    def run(ctx: Context) -> Result:
        try:
            return check(ctx)
        finally:
            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return run


def _train_records(log_dir: Path) -> list[dict]:
    return [r for r in read_metrics(log_dir) if "lm_loss" in r]


def _warm(records: list[dict]) -> list[dict]:
    return [r for r in records if r["iteration"] > WARMUP_STEPS] or records


def _training_problems(records: list[dict], steps: int) -> list[str]:
    losses = [r["lm_loss"] for r in records]
    problems = []
    if [r["iteration"] for r in records] != list(range(1, steps + 1)):
        problems.append(f"metrics.jsonl logs iterations {[r['iteration'] for r in records]}, not 1..{steps}")
    if not all(math.isfinite(x) for x in losses):
        problems.append(f"non-finite loss: {losses}")
    elif losses and losses[-1] >= losses[0]:
        problems.append(f"the loss did not fall: {losses[0]:.3f} at step 1, {losses[-1]:.3f} at step {steps}")
    return problems


def _throughput_figures(records: list[dict]) -> list[Figure]:
    rates = [r["tokens_per_sec"] for r in _warm(records)]
    return [Figure("tokens/s", statistics.median(rates)), Figure("spread", f"{min(rates):,.0f}-{max(rates):,.0f}")]


def datasheet_peak(device_name: str, precision: str, peak_tflops: float | None = None) -> tuple[float | None, str]:
    """The GPU's dense peak FLOP/s for `precision` and where it comes from, or None and what to do about it."""
    from neox.train.accelerators import accelerator_of_device

    if peak_tflops:
        return peak_tflops * 1e12, "--peak-tflops"
    accelerator = accelerator_of_device(device_name)
    if accelerator is None:
        return None, (f"no datasheet peak for {device_name!r} in neox/train/accelerators.py: add the device there "
                      "or pass --peak-tflops with its dense bf16 TFLOP/s")
    peak = accelerator.peak_flops.get(precision)
    if peak is None:
        return None, f"{accelerator.name} has no {precision} peak ({accelerator.source})"
    return peak, f"{accelerator.name} {precision} datasheet"


def mfu_verdict(tflops: float, run_mfu: float, run_source: str | None, peak: float | None, where: str
                ) -> tuple[list[Figure], list[str]]:
    """MFU = the run's TFLOP/s over the datasheet peak, and whether the run's own MFU used that denominator."""
    if peak is None:
        return [], [where]
    mfu = tflops * 1e12 / peak
    problems = []
    if not 0 < mfu <= 1:
        problems.append(f"MFU {mfu:.1%} is not a fraction of the peak")
    if run_source is None or not run_source.startswith(("datasheet", "config")):
        problems.append(f"the run's own MFU divides by {run_source or 'an unrecorded peak'}, not the datasheet's")
    elif abs(run_mfu / mfu - 1) > MFU_AGREEMENT:
        problems.append(f"the run logs MFU {run_mfu:.2%} but its TFLOP/s give {mfu:.2%} ({run_source})")
    return [Figure(f"MFU of {peak / 1e12:g} TFLOP/s ({where})", mfu, "%")], problems


def train_bf16(ctx: Context) -> Result:
    work = ctx.work
    run = work.dir("train_bf16")
    overrides = {"train_iters": TRAIN_STEPS, "lr_decay_iters": TRAIN_STEPS, "save": run / "ckpt",
                 "save_interval": TRAIN_STEPS, "log_dir": run / "logs"}
    if ctx.options.get("peak_tflops"):
        overrides["peak_flops"] = ctx.options["peak_tflops"] * 1e12  # the run divides by the same figure
    launch = work.deepy("train", work.config_files(ctx, "bf16"), overrides, ctx, "train_bf16")
    if launch.code != 0:
        return Result(False, detail=f"deepy train exited {launch.code}: {launch.tail()}")
    everything = read_metrics(run / "logs")
    records = [r for r in everything if "lm_loss" in r]
    problems = _training_problems(records, TRAIN_STEPS)
    if not records:
        return Result(False, detail="; ".join(problems))

    from neox.checkpoint import find_checkpoint

    checkpoint = find_checkpoint(run / "ckpt")
    if checkpoint.name != f"global_step{TRAIN_STEPS}":
        problems.append(f"the latest checkpoint is {checkpoint.name}, not global_step{TRAIN_STEPS}")
    ctx.artifacts["checkpoint"] = run / "ckpt"

    tflops = statistics.median(r["tflops_per_rank"] for r in _warm(records))
    run_mfu = statistics.median(r["mfu"] for r in _warm(records))
    source = next((r["mfu_peak_source"] for r in everything if "mfu_peak_source" in r), None)
    figures = _throughput_figures(records) + [Figure("TFLOP/s", tflops)]
    if ctx.standin:
        figures.append(Figure("MFU vs measured CPU peak", run_mfu, "%"))
    else:
        import torch

        peak, where = datasheet_peak(torch.cuda.get_device_name(0), "bfloat16", ctx.options.get("peak_tflops"))
        mfu_figures, mfu_problems = mfu_verdict(tflops, run_mfu, source, peak, where)
        figures += mfu_figures
        problems += mfu_problems
    losses = f"loss {records[0]['lm_loss']:.2f} -> {records[-1]['lm_loss']:.2f}"
    return Result(not problems, figures, "; ".join(problems + [losses] + ([f"run's peak: {source}"] if source else [])))


_OVERFLOW = re.compile(r"OVERFLOW! Rank \d+ Skipping step")
_SCALE = re.compile(r"Attempted loss scale: (\d+), reducing to (\d+)")


def fp16_dynamic_loss_scale(ctx: Context) -> Result:
    if ctx.standin:
        raise Skip("fp16 needs CUDA: DeepSpeed's fp16 optimizer and loss scaler do not run on the CPU")
    work = ctx.work
    run = work.dir("fp16")
    launch = work.deepy("train", work.config_files(ctx, "fp16"),
                        {"train_iters": FP16_STEPS, "lr_decay_iters": FP16_STEPS, "log_dir": run / "logs"}, ctx, "fp16")
    if launch.code != 0:
        return Result(False, detail=f"deepy train exited {launch.code}: {launch.tail()}")
    from neox.config import load_resolved

    optim = load_resolved(run / "logs" / "resolved_config.yml").optim
    records = _train_records(run / "logs")
    problems = _training_problems(records, FP16_STEPS)
    if not records:
        return Result(False, detail="; ".join(problems))
    if optim.precision != "fp16" or (optim.fp16 or {}).get("loss_scale") != 0:
        problems.append(f"the run trained in {optim.precision} with fp16 section {optim.fp16}, not fp16 with "
                        "dynamic loss scaling (loss_scale 0)")
    skipped = len(_OVERFLOW.findall(launch.output))
    scales = _SCALE.findall(launch.output)
    figures = _throughput_figures(records) + [Figure("overflow steps skipped", skipped)]
    if scales:
        figures.append(Figure("loss scale", int(scales[-1][1])))
    if skipped >= FP16_STEPS:
        problems.append("every step overflowed: the loss scale never settled")
    losses = f"loss {records[0]['lm_loss']:.2f} -> {records[-1]['lm_loss']:.2f}"
    return Result(not problems, figures, "; ".join(problems + [losses]))


def two_ranks_refused(ctx: Context) -> Result:
    if ctx.standin:
        raise Skip("needs a GPU: on the CPU every rank is a process, and two of them are allowed")
    work = ctx.work
    run = work.dir("two_ranks")
    launch = work.deepy("train", work.config_files(ctx, "bf16"),
                        {"num_gpus": 2, "train_iters": 1, "log_dir": run / "logs"}, ctx, "two_ranks")
    said = [ln for ln in launch.stderr.splitlines() if "num_gpus" in ln]
    problems = []
    if launch.code != 2:
        problems.append(f"exit code {launch.code}, not 2")
    if not any("'num_gpus' is 2" in ln and "1 GPU" in ln for ln in said):
        problems.append("no message naming 'num_gpus' and this machine's 1 GPU")
    if "Traceback" in launch.output or (run / "logs" / "ranks").exists():
        problems.append("a rank was started or a traceback was printed")
    detail = "; ".join(problems + ([said[0].strip()] if said else [launch.tail()]))
    return Result(not problems, [Figure("exit code", launch.code), Figure("seconds", launch.seconds)], detail)


@_in_process
def flash_sdpa(ctx: Context) -> Result:
    """Flash is possible for these shapes (the forced run) and chosen by torch unprompted (the profiled run)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from neox.model import GPTNeoX

    cfg = ctx.work.model_config(ctx, "bf16")
    model_cfg, device = cfg.model, _torch_device(ctx)
    torch.manual_seed(0)
    model = GPTNeoX(model_cfg).to(device=device, dtype=torch.bfloat16).train()
    micro = cfg.train.train_micro_batch_size_per_gpu
    tokens = torch.randint(0, model_cfg.padded_vocab_size, (micro, model_cfg.seq_length), device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(tokens).mean().backward()  # a backward through every attention layer is all this needs

    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            step()
    except RuntimeError as err:
        return Result(False, detail=f"SDPA's flash backend refuses these shapes: {str(err).splitlines()[0]}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = {event.key for event in prof.key_averages()}
    kernels = sorted(op for op in ops if op.startswith("aten::_scaled_dot_product_"))
    forward = [op for op in kernels if "flash" in op and not op.endswith("_backward")]
    backward = [op for op in kernels if "flash" in op and op.endswith("_backward")]
    others = [op for op in kernels if "flash" not in op]
    shape = f"q [{micro}, {model_cfg.num_attention_heads}, {model_cfg.seq_length}, {model_cfg.head_dim}] bf16"
    ok = bool(forward and backward) and not others
    detail = f"{shape}; SDPA kernels: {', '.join(kernels) or 'none'}"
    return Result(ok, [Figure("kernel", forward[0] if forward else "not flash")], detail)


def _hf_model(ctx: Context, hf_dir: Path):
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    return model.to(_torch_device(ctx)).eval()


@_in_process
def export_logits(ctx: Context) -> Result:
    import torch

    from neox.checkpoint import load_model

    work = ctx.work
    hf_dir = work.root / "hf"
    launch = work.run([sys.executable, str(REPO / "tools" / "convert_neox_to_hf.py"), "--checkpoint",
                       str(ctx.artifacts["checkpoint"]), "--output", str(hf_dir), "--quiet"], ctx, "export")
    if launch.code != 0:
        return Result(False, detail=f"convert_neox_to_hf exited {launch.code}: {launch.tail()}")
    ctx.artifacts["hf_dir"] = hf_dir
    device = _torch_device(ctx)
    ours, cfg, _ = load_model(ctx.artifacts["checkpoint"], device=device, dtype=torch.float32)
    theirs = _hf_model(ctx, hf_dir)
    length = min(512, cfg.model.seq_length)
    tokens = torch.tensor(work.held_out_tokens(ctx, 2 * length), device=device).view(2, length)
    with torch.no_grad():
        reference = theirs(tokens).logits.float()
        got = ours(tokens)[..., : reference.shape[-1]].float()
    diff = (got - reference).abs().max().item()
    same_argmax = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
    architecture = json.loads((hf_dir / "config.json").read_text())["architectures"][0]
    ok = diff < LOGITS_ATOL and same_argmax == 1.0
    figures = [Figure("max |logit diff|", diff), Figure("same argmax", same_argmax, "%"),
               Figure("export s", launch.seconds)]
    return Result(ok, figures, f"{architecture} fp32, 2 x {length} held-out tokens, tolerance {LOGITS_ATOL:g}")


def _equal_length_prompts(ctx: Context, tokenizer) -> list[tuple[str, list[int]]]:
    """Held-out text windows that encode back to exactly PROMPT_TOKENS tokens: both sides decode the same ids, and
    one batch needs no padding."""
    tokens = ctx.work.held_out_tokens(ctx, 40 * PROMPTS * PROMPT_TOKENS)
    chosen = []
    for start in range(0, len(tokens) - PROMPT_TOKENS, PROMPT_TOKENS):
        window = tokens[start : start + PROMPT_TOKENS]
        text = tokenizer.decode(window)
        if text == text.strip() and tokenizer.encode(text) == window:
            chosen.append((text, window))
            if len(chosen) == PROMPTS:
                return chosen
    raise RuntimeError(f"found only {len(chosen)} held-out windows that re-encode to {PROMPT_TOKENS} tokens")


def _until_eod(row: list[int], eod: int) -> list[int]:
    return row[: row.index(eod)] if eod in row else row


def _leading_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    shares = []
    for x, y in zip(a, b):
        same = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        shares.append(same / max(len(x), len(y), 1))
    return sum(shares) / len(shares)


@_in_process
def generate_vs_transformers(ctx: Context) -> Result:
    """The tokens come from a `deepy generate` launch; the speed from neox.generate's SampleMaker (what each rank of
    that launch runs) and transformers' generate taking turns in this process, so both see the same GPU state."""
    import dataclasses

    import torch

    from neox.checkpoint import load_model
    from neox.generate.parallel_model import ParallelDecoder
    from neox.generate.run import SampleMaker

    work = ctx.work
    run = work.dir("generate")
    tokenizer = work.tokenizer()
    prompts = _equal_length_prompts(ctx, tokenizer)
    texts, ids = [text for text, _ in prompts], [window for _, window in prompts]
    prompt_file = run / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in texts))
    samples_file = run / "samples.jsonl"
    cfg = work.model_config(ctx, "bf16")
    new_tokens = min(NEW_TOKENS, cfg.model.max_positions - PROMPT_TOKENS)
    launch = work.deepy("generate", work.config_files(ctx, "bf16"), {
        "load": ctx.artifacts["checkpoint"], "text_gen_type": "input-file", "sample_input_file": prompt_file,
        "sample_output_file": samples_file, "maximum_tokens": new_tokens, "temperature": 0.0,
        "generate_batch_size": PROMPTS, "decode_precision": "fp32", "recompute": False,
        "log_dir": run / "logs"}, ctx, "generate")
    if launch.code != 0:
        return Result(False, detail=f"deepy generate exited {launch.code}: {launch.tail()}")
    launched = [json.loads(line)["tokens"] for line in samples_file.read_text().splitlines()]

    device = _torch_device(ctx)
    model, _, _ = load_model(ctx.artifacts["checkpoint"], device=device, dtype=torch.float32)
    settings = dataclasses.replace(cfg.generate, maximum_tokens=new_tokens, temperature=0.0, top_k=0, top_p=0.0,
                                   generate_batch_size=PROMPTS, recompute=False, stop_strings=None)
    ours = SampleMaker(model=ParallelDecoder(model), tokenizer=tokenizer, settings=settings, seed=cfg.train.seed,
                       max_positions=cfg.model.max_positions, device=device)
    hf = _hf_model(ctx, ctx.artifacts["hf_dir"])
    batch = torch.tensor(ids, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def hf_generate() -> tuple[list[list[int]], float]:
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=new_tokens,
                              do_sample=False, use_cache=True, eos_token_id=tokenizer.eod, pad_token_id=tokenizer.eod)
        sync()
        seconds = time.perf_counter() - start
        return [_until_eod(row, tokenizer.eod) for row in out[:, PROMPT_TOKENS:].tolist()], seconds

    ours_rates, hf_rates, theirs = [], [], []
    for round_ in range(SPEED_ROUNDS + 1):  # round 0 warms both up (CUDA start-up, allocator, kernel choice)
        samples = ours.make(texts, ids, 0)
        theirs, hf_seconds = hf_generate()
        if round_:
            ours_rates.append(sum(s.tokens_generated for s in samples) / samples[0].seconds)
            hf_rates.append(sum(map(len, theirs)) / hf_seconds)
    ours_rate, hf_rate = statistics.median(ours_rates), statistics.median(hf_rates)
    agreement = _leading_agreement(launched, theirs)
    problems = []
    if len(launched) != PROMPTS:
        problems.append(f"deepy generate wrote {len(launched)} samples for {PROMPTS} prompts")
    if agreement < MIN_LEADING_AGREEMENT:
        problems.append(f"deepy generate's greedy tokens agree with transformers' for {agreement:.0%} of the way, "
                        f"below {MIN_LEADING_AGREEMENT:.0%}")
    if ours_rate < MIN_SPEED_RATIO * hf_rate:
        problems.append(f"{ours_rate / hf_rate:.2f}x transformers' tokens/s, below {MIN_SPEED_RATIO}x")
    figures = [Figure("tokens/s", ours_rate), Figure("transformers", hf_rate), Figure("ratio", ours_rate / hf_rate),
               Figure("same tokens", agreement, "%")]
    detail = (f"fp32 greedy, {PROMPTS} x {PROMPT_TOKENS}-token prompts, up to {new_tokens} new tokens, KV cache on "
              f"both sides; median of {SPEED_ROUNDS} alternating rounds (ours {min(ours_rates):,.0f}-"
              f"{max(ours_rates):,.0f}, transformers {min(hf_rates):,.0f}-{max(hf_rates):,.0f})")
    return Result(not problems, figures, "; ".join(problems + [detail]))


@_in_process
def eval_piqa_vs_lm_eval(ctx: Context) -> Result:
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    from neox.eval.task_index import task_manager

    work = ctx.work
    run = work.dir("eval")
    launch = work.deepy("eval", work.config_files(ctx, "bf16"), {
        "load": ctx.artifacts["checkpoint"], "eval_tasks": "piqa", "eval_limit": PIQA_ITEMS,
        "eval_batch_size": EVAL_BATCH, "log_dir": run}, ctx, "eval")
    if launch.code != 0:
        return Result(False, detail=f"deepy eval exited {launch.code}: {launch.tail()}")
    (results_file,) = run.glob("eval_results_*.json")
    document = json.loads(results_file.read_text())
    ours = document["results"]["piqa"]
    lm = HFLM(pretrained=str(ctx.artifacts["hf_dir"]), device=ctx.device, batch_size=EVAL_BATCH,
              max_length=work.model_config(ctx, "bf16").model.seq_length, dtype="float32")
    theirs = evaluator.simple_evaluate(model=lm, tasks=["piqa"], limit=PIQA_ITEMS,
                                       task_manager=task_manager(None, ["piqa"]), bootstrap_iters=0)["results"]["piqa"]
    problems = [f"{metric}: ours {ours[metric]:.4f}, lm_eval hf {theirs[metric]:.4f}"
                for metric in ("acc,none", "acc_norm,none") if round(ours[metric], 4) != round(theirs[metric], 4)]
    items = document.get("n-samples", {}).get("piqa", {}).get("effective")
    if items != PIQA_ITEMS:
        problems.append(f"{items} PIQA items evaluated, not {PIQA_ITEMS}")
    figures = [Figure("acc", ours["acc,none"]), Figure("hf acc", theirs["acc,none"]),
               Figure("acc_norm", ours["acc_norm,none"]), Figure("hf acc_norm", theirs["acc_norm,none"])]
    return Result(not problems, figures, "; ".join(problems + [f"{PIQA_ITEMS} PIQA items, fp32 on both sides"]))


CHECKS: tuple[Check, ...] = (
    Check("train_bf16", "125M bf16 ZeRO-1, 20 steps", 120, train_bf16),
    Check("fp16", "125M fp16 dynamic loss scale, 10 steps", 75, fp16_dynamic_loss_scale),
    Check("two_ranks_refused", "2 ranks on 1 GPU refused", 20, two_ranks_refused),
    Check("flash_sdpa", "flash SDPA chosen (bf16)", 30, flash_sdpa),
    Check("export_logits", "HF export logits vs transformers", 60, export_logits, needs=("train_bf16",)),
    Check("generate", "generate (KV cache) vs transformers", 75, generate_vs_transformers,
          needs=("train_bf16", "export_logits")),
    Check("eval_piqa", "eval 50 PIQA vs lm_eval hf", 75, eval_piqa_vs_lm_eval, needs=("train_bf16", "export_logits")),
)
BUDGET_S = sum(c.limit_s for c in CHECKS)

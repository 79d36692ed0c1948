"""Every key of gpt-neox's configuration, and what it does here.

gpt-neox documents its keys in configs/neox_arguments.md (megatron/neox_arguments/neox_args.py is a little newer).
A gpt-neox user's YAML must load unchanged, so each of those keys has exactly one of three behaviours:

- implemented: a key of one of our config groups under the same name (most of them), or a gpt-neox spelling that
  writes one of ours (`gas` -> gradient_accumulation_steps, `lr` -> optimizer.params.lr, ...), or a value gpt-neox
  itself sets at launch (`rank`, `world_size`, ...), which is checked or dropped as gpt-neox drops it;
- kernel: a switch that only picks a CUDA kernel (`*_fusion`, ...): accepted and listed in one summary line,
  because neox gets fused kernels from the device and the numbers do not change;
- missing: a feature this project does not have (Transformer Engine, DeepSpeed sparse attention, Mamba, ...): a
  value other than gpt-neox's default stops the run with one paragraph naming the feature and the key.

Only the keys that are not a field of our config are listed here; a field with gpt-neox's name is "implemented"
by being one (tests/unit/test_gpt_neox_keys.py walks gpt-neox's whole list against this module).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Behaviour = Literal["implemented", "kernel", "missing"]


@dataclass(frozen=True)
class Alias:
    """A gpt-neox key whose value is written into one of ours (a dotted path into a dict key for sections)."""

    key: str
    target: str
    hint: Any
    default: Any
    note: str
    scale: float | None = None  # value x scale is written (peak_theoretical_tflops -> peak_flops)


@dataclass(frozen=True)
class RuntimeKey:
    """A value gpt-neox's launcher or training loop sets itself; a config file may still carry it."""

    key: str
    hint: Any
    default: Any
    note: str
    # "drop": accepted and not used (gpt-neox overwrites it too); "derived": must agree with the value we derive.
    action: Literal["drop", "derived", "true_only"]


@dataclass(frozen=True)
class KernelKey:
    key: str
    hint: Any
    default: Any


@dataclass(frozen=True)
class MissingKey:
    key: str
    hint: Any
    default: Any
    feature: str


@dataclass(frozen=True)
class MissingValue:
    """A value of an implemented key that asks for a feature we do not have (norm: te_rmsnorm, ...)."""

    key: str
    values: tuple[str, ...]
    feature: str


# --- implemented through one of our keys ----------------------------------------------------------------------

ALIASES: dict[str, Alias] = {a.key: a for a in [
    Alias("gas", "gradient_accumulation_steps", int | None, None,
          "gpt-neox's older name of gradient_accumulation_steps (Pythia's configs use it)"),
    Alias("batch_size", "train_micro_batch_size_per_gpu", int | None, None,
          "gpt-neox's mirror of train_micro_batch_size_per_gpu"),
    Alias("clip_grad", "gradient_clipping", float, 1.0, "gpt-neox's mirror of gradient_clipping"),
    Alias("lr", "optimizer.params.lr", float | None, None, "the peak learning rate, optimizer.params.lr"),
    Alias("optimizer_type", "optimizer.type", str, "adam", ""),
    Alias("zero_stage", "zero_optimization.stage", int | None, None, ""),
    Alias("zero_reduce_scatter", "zero_optimization.reduce_scatter", bool | None, None, ""),
    Alias("zero_contiguous_gradients", "zero_optimization.contiguous_gradients", bool | None, None, ""),
    Alias("zero_reduce_bucket_size", "zero_optimization.reduce_bucket_size", int | None, None, ""),
    Alias("zero_allgather_bucket_size", "zero_optimization.allgather_bucket_size", int | None, None, ""),
    Alias("loss_scale", "fp16.loss_scale", float | None, None,
          "fp16.loss_scale: a static loss scale; unset (None) = dynamic loss scaling"),
    Alias("hysteresis", "fp16.hysteresis", int, 2, "fp16.hysteresis of dynamic loss scaling"),
    Alias("loss_scale_window", "fp16.loss_scale_window", float, 1000.0, ""),
    Alias("min_scale", "fp16.min_loss_scale", float, 1.0, ""),
    Alias("peak_theoretical_tflops", "peak_flops", float | None, None,
          "peak_flops in TFLOP/s (x 1e12) for MFU", scale=1.0e12),
]}

# Keys of EleutherAI forks that gpt-neox's own configs/llemma files still use, and gpt-neox switches named as kernel
# choices that change the function computed (so they are implemented, not ignored).
LEGACY_KEYS: dict[str, str] = {
    "bias_gelu_fusion": "true with activation gelu: the MLP uses tanh-approximated gelu (activation gelu_tanh), the "
                        "function gpt-neox's fused bias+gelu kernel computes (Pythia trained with it)",
    "attention_type": "llemma configs: 'multihead', 'groupedquery' or 'multiquery', checked against num_kv_heads",
    "decay_lr_to": "llemma configs: min_lr = decay_lr_to x the peak learning rate",
    "warmup_iters": "llemma configs: warmup = warmup_iters / lr_decay_iters (our warmup is a fraction)",
}

RUNTIME_KEYS: dict[str, RuntimeKey] = {r.key: r for r in [
    RuntimeKey("local_rank", int | None, None, "set per rank by the launcher (LOCAL_RANK); a config value is "
               "ignored, as gpt-neox overwrites it", "drop"),
    RuntimeKey("rank", int | None, None, "set per rank by the launcher (RANK); a config value is ignored, as "
               "gpt-neox overwrites it", "drop"),
    RuntimeKey("world_size", int | None, None, "derived from num_gpus x nodes (hostfile); a config value must "
               "equal it", "derived"),
    RuntimeKey("is_pipe_parallel", bool, False, "derived: pipe_parallel_size >= 1; a config value must agree",
               "derived"),
    RuntimeKey("user_script", str | None, None, "set by gpt-neox's deepy to the script it launches; here the "
               "command (train/eval/generate) picks the program, so a config value is ignored", "drop"),
    RuntimeKey("deepscale", bool, False, "deprecated in gpt-neox, where it has no effect: accepted, ignored",
               "drop"),
    RuntimeKey("deepscale_config", str | None, None, "deprecated in gpt-neox, where it has no effect: accepted, "
               "ignored", "drop"),
    RuntimeKey("activation_checkpointing", dict | None, None, "no effect, as in gpt-neox: it goes into DeepSpeed's "
               "config there, but activation checkpointing is configured from checkpoint_activations, "
               "checkpoint_num_layers, partition_activations, contiguous_checkpointing, checkpoint_in_cpu and "
               "synchronize_each_layer (here too)", "drop"),
    RuntimeKey("onnx_safe", bool, False, "no effect: in gpt-neox it only computes gelu through erf, which is the "
               "gelu neox computes anyway (onnx_safe with bias_gelu_fusion is refused, as gpt-neox refuses it)",
               "drop"),
    RuntimeKey("deepspeed", bool, True, "always true: every run trains through DeepSpeed (false is refused, as "
               "gpt-neox refuses it)", "true_only"),
    RuntimeKey("dynamic_loss_scale", bool | None, None, "derived in gpt-neox as 'loss_scale is unset': true keeps "
               "dynamic fp16 loss scaling, false needs a static loss_scale", "derived"),
]}

# --- GPU kernel switches -----------------------------------------------------------------------------------

KERNEL_KEYS: dict[str, KernelKey] = {k.key: k for k in [
    KernelKey("scaled_upper_triang_masked_softmax_fusion", bool, False),
    KernelKey("scaled_masked_softmax_fusion", bool, False),
    KernelKey("bias_dropout_fusion", bool, False),
    KernelKey("rope_fusion", bool, False),
    KernelKey("layernorm_fusion", bool, False),
    KernelKey("rmsnorm_fusion", bool, False),
    KernelKey("use_flashattn_swiglu", bool, False),
    KernelKey("fused_kernels_build_path", str | None, None),
    KernelKey("mamba_selective_scan_fusion", bool, False),
    KernelKey("mamba_causal_conv_fusion", bool, False),
    KernelKey("mamba_inner_func_fusion", bool, False),
    # DeepSpeed's sparse all-reduce of embedding gradients: the same sums (and gone from DeepSpeed 0.19).
    KernelKey("sparse_gradients", bool, False),
]}

# --- features this project does not have ----------------------------------------------------------------------

TRANSFORMER_ENGINE = "NVIDIA Transformer Engine layers and FP8 training (te_*)"
SPARSE_ATTENTION = "DeepSpeed block-sparse attention (sparse_fixed, sparse_variable, bigbird, bslongformer)"
MAMBA = "Mamba state-space layers"
RWKV = "RWKV layers"
GMLP = "gMLP / aMLP blocks"
ONLINE_RL = "online reinforcement learning (REINFORCE with a generation server)"
AUTOTUNING = "DeepSpeed autotuning"
ADLR = "NVIDIA ADLR cluster auto-resume (use preemption instead: SIGTERM/SIGUSR1 checkpoint and exit 75)"
LAZY_MPU = "lazy model-parallel initialisation for an external DDP manager"
SOFT_PROMPT = ("soft prompt tuning (gpt-neox's own SoftEmbedding cannot be constructed either: its initialiser is "
               "called with an argument it does not take)")

MISSING_KEYS: dict[str, MissingKey] = {m.key: m for m in [
    MissingKey("te_columnparallel", bool, False, TRANSFORMER_ENGINE),
    MissingKey("te_rowparallel", bool, False, TRANSFORMER_ENGINE),
    MissingKey("te_layernorm_mlp", bool, False, TRANSFORMER_ENGINE),
    MissingKey("te_mha", bool, False, TRANSFORMER_ENGINE),
    MissingKey("te_fp8_format", Literal["e4m3", "hybrid"], "hybrid", TRANSFORMER_ENGINE),
    MissingKey("te_fp8_wgrad", bool, True, TRANSFORMER_ENGINE),
    MissingKey("te_fp8_amax_history_len", int, 1, TRANSFORMER_ENGINE),
    MissingKey("te_fp8_amax_compute_algo", str, "most_recent", TRANSFORMER_ENGINE),
    MissingKey("te_fp8_margin", int, 0, TRANSFORMER_ENGINE),
    MissingKey("te_fp8_mha", bool, False, TRANSFORMER_ENGINE),
    MissingKey("sparse_attention", dict | None, None, SPARSE_ATTENTION),
    MissingKey("mamba_selective_fp32_params", bool, True, MAMBA),
    MissingKey("mamba_use_bias_in_conv", bool, True, MAMBA),
    MissingKey("mamba_use_bias_in_linears", bool, False, MAMBA),
    MissingKey("dim_att", int | None, None, RWKV),
    MissingKey("head_size", int | None, None, RWKV),
    MissingKey("ffn_dim", int | None, None, RWKV),
    MissingKey("gmlp_attn_dim", int, 64, GMLP),
    MissingKey("fp32_reinforce", bool, True, ONLINE_RL),
    MissingKey("kl_impl", Literal["abs", "mse", "kl", "full"], "mse", ONLINE_RL),
    MissingKey("kl_div_beta", float, 0.1, ONLINE_RL),
    MissingKey("reinforce_leave_one_out", bool, False, ONLINE_RL),
    MissingKey("online_dataserver_ips", str | list[str], "localhost", ONLINE_RL),
    MissingKey("online_dataserver_ports", int | list[int], 10000, ONLINE_RL),
    MissingKey("serve_model_weights", bool, False, ONLINE_RL),
    MissingKey("weight_server_port", int | list[int], 6000, ONLINE_RL),
    MissingKey("autotuning", dict | None, None, AUTOTUNING),
    MissingKey("autotuning_run", str | None, None, AUTOTUNING),
    MissingKey("adlr_autoresume", bool, False, ADLR),
    MissingKey("adlr_autoresume_interval", int, 1000, ADLR),
    MissingKey("amp", dict | None, None, "NVIDIA Apex AMP through DeepSpeed (gone from DeepSpeed 0.19; use precision, "
               "fp16 or bf16)"),
    MissingKey("elasticity", dict | None, None, "DeepSpeed elastic training (gone from DeepSpeed 0.19; set the batch "
               "keys directly)"),
    MissingKey("compression_training", dict | None, None, "DeepSpeed compression training (gone from DeepSpeed 0.19)"),
    MissingKey("data_efficiency", dict | None, None, "DeepSpeed data efficiency (curriculum sampling inside "
               "DeepSpeed's data loader, random-LTD); neox, like gpt-neox, feeds its own loader, and "
               "curriculum_learning gives the sequence-length warm-up"),
    MissingKey("scheduler", dict | None, None, "a DeepSpeed LR scheduler: the learning rate follows lr_decay_style, "
               "warmup and min_lr (gpt-neox replaces a configured one too; its only use, 1-bit Adam, is gone from "
               "DeepSpeed 0.19)"),
    MissingKey("lazy_mpu_init", bool, False, LAZY_MPU),
    MissingKey("soft_prompt_tuning", dict | None, None, SOFT_PROMPT),
]}

MISSING_VALUES: tuple[MissingValue, ...] = (
    MissingValue("norm", ("te_rmsnorm", "te_layernorm"), TRANSFORMER_ENGINE),
    MissingValue("dataset_impl", ("online",), ONLINE_RL),
    MissingValue("train_impl", ("reinforce",), ONLINE_RL),
)

# attention_config layer types and the feature each needs; global, flash and local are implemented.
ATTENTION_TYPE_FEATURES: dict[str, str] = {
    "sparse_fixed": SPARSE_ATTENTION,
    "sparse_variable": SPARSE_ATTENTION,
    "bigbird": SPARSE_ATTENTION,
    "bslongformer": SPARSE_ATTENTION,
    "gmlp": GMLP,
    "amlp": GMLP,
    "mamba": MAMBA,
    "rwkv": RWKV,
}


# Our keys that gpt-neox does not have (every other field of our config is a gpt-neox key of the same name).
NEOX_ONLY_KEYS = frozenset({
    "checkpoint_async", "checkpoint_layout_free", "data_cache_dir", "decode_precision", "distributed_timeout_minutes",
    "eval_batch_size", "eval_iteration", "eval_limit", "eval_perplexity_files", "eval_perplexity_splits",
    "eval_tasks_path", "generate_batch_size", "label_data_paths", "launcher_args", "lora", "no_ssh", "node_rank",
    "num_fewshot", "peak_flops", "preempt_exit_code", "save_interval", "ssh_args", "stop_strings",
    # mixture of experts beyond gpt-neox's six moe_* keys (issue 15)
    "moe_aux_loss_coeff", "moe_capacity_factor", "moe_expert_parallel_size", "moe_intermediate_size", "moe_layers",
    "moe_norm_topk_prob",
    "moe_num_shared_experts", "moe_shared_expert_gate", "moe_shared_expert_intermediate_size", "moe_z_loss_coeff",
})


def non_field_keys() -> set[str]:
    """Every gpt-neox key this module accounts for (those that are not a field of our config)."""
    return set(ALIASES) | set(LEGACY_KEYS) | set(RUNTIME_KEYS) | set(KERNEL_KEYS) | set(MISSING_KEYS)


def behaviour_of(key: str, config_keys: set[str] | frozenset[str]) -> Behaviour | None:
    """The behaviour of a gpt-neox key here; None if neither our config nor this table knows it."""
    if key in KERNEL_KEYS:
        return "kernel"
    if key in MISSING_KEYS:
        return "missing"
    if key in config_keys or key in ALIASES or key in LEGACY_KEYS or key in RUNTIME_KEYS:
        return "implemented"
    return None


__all__ = [
    "ALIASES",
    "ATTENTION_TYPE_FEATURES",
    "Alias",
    "Behaviour",
    "KERNEL_KEYS",
    "KernelKey",
    "LEGACY_KEYS",
    "MISSING_KEYS",
    "MISSING_VALUES",
    "MissingKey",
    "MissingValue",
    "NEOX_ONLY_KEYS",
    "RUNTIME_KEYS",
    "RuntimeKey",
    "behaviour_of",
    "non_field_keys",
]

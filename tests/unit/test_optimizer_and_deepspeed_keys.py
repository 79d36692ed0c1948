"""gpt-neox's optimizer types, precision spellings and DeepSpeed pass-through keys, at the config level:
what each YAML spelling loads as and what goes into the DeepSpeed JSON (no engine here; see
test_deepspeed_engine_keys.py for the read-back from a real engine)."""
from pathlib import Path

import pytest

from neox.config import ConfigError, deepspeed_config, load_config
from neox.config.deepspeed import check_device_support
from neox.config.optimizer_params import check_optimizer

MODEL = """\
num_layers: 2
hidden_size: 64
num_attention_heads: 4
seq_length: 32
train_micro_batch_size_per_gpu: 2
"""


def load(tmp_path: Path, text: str, overrides=()):
    path = tmp_path / "c.yml"
    path.write_text(MODEL + text)
    return load_config([path], overrides, local_gpus=0)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value)


# ---------------------------------------------------------------- optimizer types and their params

@pytest.mark.parametrize("kind,params", [
    ("Adam", "{lr: 0.001, betas: [0.9, 0.95], eps: 1.0e-8, bias_correction: false, adam_w_mode: false}"),
    ("CPU_Adam", "{lr: 0.001, betas: [0.9, 0.95], adamw_mode: true, fp32_optimizer_states: true}"),
    ("cpu_torch_adam", "{lr: 0.001, amsgrad: true}"),
])
def test_adam_types_load_from_yaml_with_their_params(tmp_path, kind, params):
    cfg = load(tmp_path, f"optimizer: {{type: {kind}, params: {params}}}\n")
    assert cfg.optim.optimizer["type"] == kind


@pytest.mark.parametrize("kind,params", [
    ("Lion", {"lr": 1e-4, "betas": [0.9, 0.99]}),
    ("SM3", {"lr": 0.1, "momentum": 0.5, "beta": 0.9, "eps": "1.0e-30"}),
    ("madgrad_wd", {"lr": 0.01, "momentum": 0.9, "eps": 1e-6}),
    ("sgd", {"lr": 0.01, "momentum": 0.9, "nesterov": True}),
])
def test_other_types_take_their_own_params(kind, params):
    section = {"type": kind, "params": dict(params)}
    check_optimizer(section)
    assert all(isinstance(v, (float, bool, list)) for v in section["params"].values())  # '1.0e-30' parsed


@pytest.mark.parametrize("section,expected", [
    ({"type": "Lion", "params": {"lr": 0.001, "eps": 1e-8}},
     "unknown key 'optimizer.params.eps' for optimizer type lion (it takes lr, betas)"),
    ({"type": "SM3", "params": {"lr": 0.1, "betas": [0.9, 0.9]}},
     "unknown key 'optimizer.params.betas' for optimizer type sm3"),
    ({"type": "madgrad_wd", "params": {"lr": 0.01, "momentum": 1.5}}, "'optimizer.params.momentum' must be in [0, 1)"),
    ({"type": "sgd", "params": {"lr": 0.01, "nesterov": True}}, "'optimizer.params.nesterov' needs momentum > 0"),
])
def test_other_types_refuse_params_they_do_not_take(section, expected):
    with pytest.raises(ConfigError) as info:
        check_optimizer(section)
    assert expected in str(info.value)


@pytest.mark.parametrize("text,expected", [
    ("optimizer: {type: Adam, params: {lr: 0.001, weight_decay: 0.1}}\n",
     "weight decay is the top-level 'weight_decay'"),
    ("optimizer: {type: Adam, params: {lr: 0.001, max_grad_norm: 1.0}}\n",
     "gradient clipping is the top-level 'gradient_clipping'"),
    ("optimizer: {type: cpu_adam, params: {lr: 0.001, amsgrad: true}}\n",
     "unknown key 'optimizer.params.amsgrad' for optimizer type cpu_adam"),
    ("optimizer: {type: OneBitAdam, params: {lr: 0.001, freeze_step: 2}}\n",
     "'optimizer.type' onebitadam is DeepSpeed's 1-bit Adam, which DeepSpeed removed"),
    ("optimizer: {type: Adafactor, params: {lr: 0.001}}\n", "choose one of adam, adamw, cpu_adam"),
    ("optimizer: {type: cpu_torch_adam, params: {lr: 0.001}}\nuse_bnb_optimizer: true\n",
     "'use_bnb_optimizer' swaps in bitsandbytes' 8-bit Adam, so it needs optimizer type adam"),
    ("optimizer: {type: Adam, params: {lr: 0.001}}\nzero_optimization: {stage: 2, offload_optimizer: {device: cpu}}\n",
     "set optimizer type cpu_adam or cpu_torch_adam (got adam)"),
])
def test_optimizer_mistakes_name_the_key(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_bnb_optimizer_and_cpu_state_optimizers_check_the_machine(tmp_path):
    bnb = load(tmp_path, "use_bnb_optimizer: true\n")
    with pytest.raises(ConfigError, match="'use_bnb_optimizer': bitsandbytes' 8-bit Adam runs on CUDA only"):
        check_device_support(bnb, cuda_available=False)
    check_device_support(bnb, cuda_available=True)
    cpu_adam = load(tmp_path, "optimizer: {type: cpu_adam, params: {lr: 0.001}}\n")
    check_device_support(cpu_adam, cuda_available=False)  # the states are on the CPU already
    with pytest.raises(ConfigError, match="cpu_adam keeps its state on the CPU, so with GPUs it needs ZeRO-Offload"):
        check_device_support(cpu_adam, cuda_available=True)
    offloaded = load(tmp_path, "optimizer: {type: cpu_torch_adam, params: {lr: 0.001}}\n"
                               "zero_optimization: {stage: 2, offload_optimizer: {device: cpu}}\n")
    check_device_support(offloaded, cuda_available=True)
    ds = deepspeed_config(offloaded, cuda_available=True)
    assert ds["zero_force_ds_cpu_optimizer"] is False  # torch Adam on the offloaded states, not DeepSpeedCPUAdam


def test_untested_zero_optimizers_are_allowed_only_under_zero(tmp_path):
    # UncorrectedAdam (bias_correction: false) stands for the optimizers DeepSpeed has not tested under ZeRO
    uncorrected = "optimizer: {type: adam, params: {lr: 0.001, bias_correction: false}}\n"
    assert "zero_allow_untested_optimizer" not in deepspeed_config(load(tmp_path, uncorrected), cuda_available=False)
    zero1 = load(tmp_path, uncorrected + "zero_optimization: {stage: 1}\n")
    assert deepspeed_config(zero1, cuda_available=False)["zero_allow_untested_optimizer"] is True
    adam1 = load(tmp_path, "zero_optimization: {stage: 1}\n")
    assert "zero_allow_untested_optimizer" not in deepspeed_config(adam1, cuda_available=False)


# ---------------------------------------------------------------- precision spellings

@pytest.mark.parametrize("text,precision,section", [
    # pythia/19M, llama: fp16.fp16 has no effect, enabled decides
    ("fp16: {fp16: true, enabled: true, loss_scale: 0, loss_scale_window: 1000, initial_scale_power: 12, "
     "hysteresis: 2, min_loss_scale: 1}\n", "fp16", "fp16"),
    ("fp16: {fp16: true, enabled: false}\n", "fp32", None),
    # pythia/1B: DeeperSpeed's fp16.type bfloat16 is bf16 training
    ("fp16: {enabled: true, type: bfloat16, auto_cast: true, loss_scale: 0, loss_scale_window: 1000, "
     "hysteresis: 2, min_loss_scale: 1}\n", "bfloat16", "bf16"),
    ("bf16: {bf16: true, enabled: true}\n", "bfloat16", "bf16"),
    ("precision: bfloat16\n", "bfloat16", "bf16"),  # bf16_125M: precision alone turns bf16 on
    ("precision: fp16\n", "fp16", "fp16"),
    ("precision: fp32\n", "fp32", None),
])
def test_precision_spellings_mean_what_gpt_neox_makes_them_mean(tmp_path, text, precision, section):
    cfg = load(tmp_path, text)
    assert cfg.optim.precision == precision
    ds = deepspeed_config(cfg, cuda_available=True)
    assert {"fp16", "bf16"} & set(ds) == ({section} if section else set())
    if section:
        assert ds[section]["enabled"] is True
        # DeepSpeed refuses keys it does not know: gpt-neox's spellings stay on our side
        assert not {"fp16", "bf16", "type", "min_scale", "dynamic_loss_scale"} & set(ds[section])


def test_fp16_type_bfloat16_all_reduces_in_fp32_as_deeperspeed(tmp_path):
    cfg = load(tmp_path, "fp16: {enabled: true, type: bfloat16}\n")
    ds = deepspeed_config(cfg, cuda_available=False)
    assert ds["bf16"] == {"enabled": True} and ds["communication_data_type"] == "fp32"
    assert "communication_data_type" not in deepspeed_config(load(tmp_path, "bf16: {enabled: true}\n"),
                                                             cuda_available=False)


def test_precision_conflicts_are_errors(tmp_path):
    message = error_of(tmp_path, "precision: fp16\nfp16: {enabled: true, type: bfloat16}\n")
    assert "'precision' is fp16 but 'fp16.enabled' is true (with fp16.type bfloat16: bf16 training" in message
    assert "enable one" in error_of(tmp_path, "fp16: {enabled: true}\nbf16: {enabled: true}\n")


def test_gpt_neox_loss_scale_keys_reach_the_fp16_section(tmp_path):
    cfg = load(tmp_path, "fp16: {enabled: true, loss_scale: null, loss_scale_window: 500.0, hysteresis: 3, "
                         "min_scale: 4.0, dynamic_loss_scale: true}\n")
    fp16 = deepspeed_config(cfg, cuda_available=True)["fp16"]
    assert fp16["loss_scale"] == 0 and fp16["loss_scale_window"] == 500 and fp16["hysteresis"] == 3
    assert fp16["min_loss_scale"] == 4.0
    static = load(tmp_path, "fp16: {enabled: true, loss_scale: 128, dynamic_loss_scale: false}\n")
    assert deepspeed_config(static, cuda_available=True)["fp16"]["loss_scale"] == 128
    assert "needs a static 'loss_scale' > 0" in error_of(tmp_path, "fp16: {enabled: true, dynamic_loss_scale: false}\n")


# ---------------------------------------------------------------- DeepSpeed pass-through keys

def test_deepspeed_keys_reach_the_json_under_deepspeeds_names(tmp_path):
    cfg = load(tmp_path, """\
fp32_allreduce: true
prescale_gradients: true
gradient_predivide_factor: 2.0
zero_optimization: {stage: 1}
bf16: {enabled: true}
data_types: {grad_accum_dtype: fp32}
dump_state: true
flops_profiler: {enabled: true, profile_step: 2, module_depth: -1, top_modules: 1, detailed: false}
comms_logger: {enabled: true, verbose: false, prof_all: true, debug: false}
csv_monitor: {enabled: true, output_path: csv/, job_name: run}
tensorboard: {enabled: false, output_path: tb/, job_name: run}
wandb: {enabled: false, project: p}
checkpoint: {tag_validation: Fail, load_universal: false}
""")
    ds = deepspeed_config(cfg, cuda_available=False)
    assert "fp32_allreduce" not in ds and ds["communication_data_type"] == "fp32"
    assert ds["prescale_gradients"] is True and ds["gradient_predivide_factor"] == 2.0
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["dump_state"] is True
    assert ds["flops_profiler"]["profile_step"] == 2 and ds["comms_logger"]["prof_all"] is True
    assert ds["csv_monitor"]["output_path"] == "csv/" and ds["wandb"] == {"enabled": False, "project": "p"}
    assert ds["checkpoint"] == {"tag_validation": "Fail", "load_universal": False}
    plain = deepspeed_config(load(tmp_path, ""), cuda_available=False)
    assert not {"communication_data_type", "prescale_gradients", "gradient_predivide_factor", "dump_state",
                "flops_profiler", "csv_monitor", "checkpoint", "data_types"} & set(plain)


@pytest.mark.parametrize("text,expected", [
    ("csv_monitor: {enabled: true, path: x}\n",
     "unknown key 'csv_monitor.path' (DeepSpeed takes enabled, output_path, job_name)"),
    ("checkpoint: {tag_validation: sometimes}\n", "'checkpoint.tag_validation' must be one of"),
    ("fp32_allreduce: true\ncommunication_data_type: fp16\n", "'fp32_allreduce' asks for fp32 gradient all-reduces"),
    ("bf16: {enabled: true}\ndata_types: {grad_accum_dtype: fp32}\n",
     "accumulates gradients in another dtype than the model's only with ZeRO"),
    ("gradient_predivide_factor: 0\n", "'gradient_predivide_factor' must be > 0"),
    ("bf16: {enabled: true, check_overflow: true}\n", "did you mean 'bf16.check_grad_overflow'"),
])
def test_deepspeed_key_mistakes_name_the_key(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)

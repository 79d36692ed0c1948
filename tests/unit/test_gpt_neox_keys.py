"""Every key of gpt-neox's configs/neox_arguments.md has one of three behaviours here, with gpt-neox's default.

implemented (a key of ours, or written into one), kernel switch (accepted, one summary line) or missing feature
(exit 2 naming the feature and the key). The document is gpt-neox's own (tests/data/gpt_neox, Apache-2.0).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from neox.config import ConfigError, load_config
from neox.config.fields import field_default, group_fields
from neox.config.gpt_neox_keys import (
    ALIASES,
    KERNEL_KEYS,
    LEGACY_KEYS,
    MISSING_KEYS,
    NEOX_ONLY_KEYS,
    RUNTIME_KEYS,
    behaviour_of,
    non_field_keys,
)
from neox.config.neox_config import DERIVED_KEYS, GROUPS, KEY_GROUP

DOC = Path(__file__).resolve().parents[1] / "data" / "gpt_neox" / "configs" / "neox_arguments.md"
# Keys of gpt-neox's neox_args.py that its neox_arguments.md does not list yet (the code is newer than the doc).
NEWER_KEYS = (
    "comet_experiment", "fp32_reinforce", "kl_div_beta", "kl_impl", "online_dataserver_ips",
    "online_dataserver_ports", "peak_theoretical_tflops", "reinforce_leave_one_out", "serve_model_weights",
    "te_columnparallel", "te_fp8_amax_compute_algo", "te_fp8_amax_history_len", "te_fp8_format", "te_fp8_margin",
    "te_fp8_mha", "te_fp8_wgrad", "te_layernorm_mlp", "te_mha", "te_rowparallel", "wandb_run_name",
    "weight_server_port", "z_loss",
)
MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32}

# Where our default is not gpt-neox's literal default, and why the behaviour is still gpt-neox's.
DEFAULT_EXCEPTIONS = {
    # gpt-neox leaves these None and fills them in later (Adam with lr 6e-4 / ZeRO stage 0); ours show that value.
    "optimizer": "filled in at load in gpt-neox too",
    "zero_optimization": "filled in at load in gpt-neox too",
    # gpt-neox's default 1 is overwritten by its own batch arithmetic; ours is derived the same way.
    "gradient_accumulation_steps": "derived from the other batch keys",
    # gpt-neox's default is its own commit.
    "git_hash": "this checkout's commit",
    # gpt-neox's md prints '\n' as an empty default.
    "prompt_end": "newline in both",
}


def parse_doc() -> list[tuple[str, str, str]]:
    """(key, type text, default text) for every key of neox_arguments.md."""
    text = DOC.read_text(encoding="utf-8")
    entries = []
    for block in re.split(r"\n(?=- \*\*)", text):
        match = re.match(r"- \*\*(\w+)\*\*: (.*)", block)
        if match:
            default = re.search(r"Default = (.*)", block)
            entries.append((match.group(1), match.group(2).strip(), default.group(1).strip() if default else ""))
    return entries


DOC_KEYS = parse_doc()


def doc_default(type_text: str, text: str) -> Any:
    if text == "None":
        return None
    if type_text == "bool":
        return text == "True"
    if type_text == "int":
        return int(text)
    if type_text == "float":
        return float(text)
    if type_text.startswith(("list", "dict")):
        return yaml.safe_load(text)
    try:
        return yaml.safe_load(text) if type_text.startswith("typing.Union") else text
    except yaml.YAMLError:
        return text


def load(tmp_path: Path, extra: dict[str, Any]) -> Any:
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({**MODEL, **extra}))
    return load_config([path], local_gpus=0)


def test_the_document_lists_297_keys_and_every_one_has_a_behaviour():
    keys = [key for key, _, _ in DOC_KEYS]
    assert len(keys) == 297 and len(set(keys)) == 297
    config_keys = set(KEY_GROUP) | DERIVED_KEYS
    unknown = [key for key in [*keys, *NEWER_KEYS] if behaviour_of(key, config_keys) is None]
    assert unknown == []


def test_the_registry_and_the_config_fields_do_not_overlap_and_cover_exactly_gpt_neox_and_our_own_keys():
    fields = set(KEY_GROUP)
    upstream = {key for key, _, _ in DOC_KEYS} | set(NEWER_KEYS)
    assert fields & non_field_keys() == set()
    # A non-field key listed in the registry must be a gpt-neox key (or a legacy key of its configs).
    # ('gas' left gpt-neox in 2024 but is still in the configs Pythia was published with.)
    assert non_field_keys() - upstream - set(LEGACY_KEYS) == {"gas"}
    # Every field is a gpt-neox key of the same name unless it is declared neox-only.
    assert fields - upstream == set(NEOX_ONLY_KEYS)


@pytest.mark.parametrize(("key", "type_text", "default_text"),
                         [entry for entry in DOC_KEYS if entry[0] in KEY_GROUP])
def test_our_key_has_gpt_neox_default_and_loads_at_it(tmp_path, key, type_text, default_text):
    field, _ = group_fields(GROUPS[KEY_GROUP[key]])[key]
    ours = field_default(field)
    if key not in DEFAULT_EXCEPTIONS:
        theirs = doc_default(type_text, default_text)
        assert ours == theirs, f"{key}: ours {ours!r}, gpt-neox {theirs!r}"
    if ours is not None and key not in MODEL:
        cfg = load(tmp_path, {key: ours})
        assert cfg.get(key) == ours and cfg.origin(key).startswith(str(tmp_path))


@pytest.mark.parametrize("key", sorted(ALIASES))
def test_alias_writes_our_key(tmp_path, key):
    alias = ALIASES[key]
    value = {bool: True, int: 3, float: 0.25, str: "AdamW"}.get(_base(alias.hint), 3)
    if key == "zero_stage":
        value = 1
    if key == "optimizer_type":
        value = "AdamW"
    if key == "loss_scale_window":
        value = 500.0
    cfg = load(tmp_path, {key: value, "train_micro_batch_size_per_gpu": 3} if key != "batch_size" else {key: value})
    node: Any = cfg.get(alias.target.split(".")[0])
    for part in alias.target.split(".")[1:]:
        node = node[part]
    expected = value * alias.scale if alias.scale else value
    assert node == expected
    assert f"(as '{key}')" in cfg.origin(alias.target)


def test_alias_and_its_target_disagreeing_in_one_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"'gas' \(2\) and 'gradient_accumulation_steps' \(4\)"):
        load(tmp_path, {"gas": 2, "gradient_accumulation_steps": 4, "train_micro_batch_size_per_gpu": 1})


def test_a_later_file_alias_overrides_an_earlier_target(tmp_path):
    first = tmp_path / "a.yml"
    first.write_text(yaml.safe_dump({**MODEL, "gradient_accumulation_steps": 4, "train_micro_batch_size_per_gpu": 1}))
    second = tmp_path / "b.yml"
    second.write_text("gas: 2\n")
    cfg = load_config([first, second], local_gpus=0)
    assert cfg.train.gradient_accumulation_steps == 2 and cfg.origin("gradient_accumulation_steps").endswith(
        "b.yml:1 (as 'gas')")


@pytest.mark.parametrize("key", sorted(KERNEL_KEYS))
def test_kernel_switch_is_accepted_and_summarised_once(tmp_path, caplog, key):
    from neox.config import gpt_neox_translate

    gpt_neox_translate._summarised.clear()
    value = True if KERNEL_KEYS[key].hint is bool else "/tmp/kernels"
    with caplog.at_level(logging.WARNING, logger="neox.config"):
        load(tmp_path, {key: value, "bias_dropout_fusion": True})
        load(tmp_path, {key: value, "bias_dropout_fusion": True})
    lines = [r.getMessage() for r in caplog.records if "kernel switches" in r.getMessage()]
    assert len(lines) == 1 and key in lines[0] and "bias_dropout_fusion" in lines[0]


@pytest.mark.parametrize("key", sorted(MISSING_KEYS))
def test_missing_feature_key_at_its_default_loads_and_otherwise_names_feature_and_key(tmp_path, key):
    spec = MISSING_KEYS[key]
    if spec.default is not None:
        load(tmp_path, {key: spec.default})
    with pytest.raises(ConfigError) as err:
        load(tmp_path, {key: _other_value(spec.hint, spec.default)})
    message = str(err.value)
    assert f"'{key}" in message and spec.feature in message and "neox does not have" in message
    assert "unknown" not in message


@pytest.mark.parametrize(("extra", "feature"), [
    ({"norm": "te_rmsnorm"}, "Transformer Engine"),
    ({"attention_config": [[["mamba"], 2]]}, "Mamba"),
    ({"attention_config": [[["global", "bigbird"], 1]]}, "block-sparse"),
    ({"train_impl": "reinforce"}, "online reinforcement learning"),
])
def test_missing_feature_values_name_the_feature(tmp_path, extra, feature):
    with pytest.raises(ConfigError, match=feature):
        load(tmp_path, extra)


def test_a_switched_off_section_of_a_missing_feature_loads(tmp_path):
    load(tmp_path, {"soft_prompt_tuning": {"enabled": False, "n_tokens": 4}})
    with pytest.raises(ConfigError, match="soft prompt tuning"):
        load(tmp_path, {"soft_prompt_tuning": {"enabled": True, "n_tokens": 4}})


def test_runtime_keys(tmp_path):
    cfg = load(tmp_path, {"rank": 3, "local_rank": 1, "user_script": "train.py", "deepscale": True,
                          "world_size": 1, "is_pipe_parallel": False, "deepspeed": True})
    assert cfg.derived.world_size == 1
    with pytest.raises(ConfigError, match="'world_size' is 4 but this launch has 1 ranks"):
        load(tmp_path, {"world_size": 4})
    with pytest.raises(ConfigError, match="'is_pipe_parallel' is True but 'pipe_parallel_size' is 0"):
        load(tmp_path, {"is_pipe_parallel": True})
    with pytest.raises(ConfigError, match="every neox run trains through DeepSpeed"):
        load(tmp_path, {"deepspeed": False})
    with pytest.raises(ConfigError, match="'dynamic_loss_scale' is false but no static 'loss_scale'"):
        load(tmp_path, {"dynamic_loss_scale": False})
    assert load(tmp_path, {"dynamic_loss_scale": False, "loss_scale": 128}).optim.fp16["loss_scale"] == 128


def test_legacy_llemma_keys(tmp_path):
    cfg = load(tmp_path, {"decay_lr_to": 0.1, "warmup_iters": 50, "train_iters": 1000,
                          "optimizer": {"type": "Adam", "params": {"lr": 3.0e-4}}})
    assert cfg.optim.min_lr == pytest.approx(3.0e-5) and cfg.optim.warmup == pytest.approx(0.05)
    assert "as 'decay_lr_to'" in cfg.origin("min_lr") and "as 'warmup_iters'" in cfg.origin("warmup")
    load(tmp_path, {"attention_type": "groupedquery", "num_kv_heads": 2})
    with pytest.raises(ConfigError, match="'attention_type' 'groupedquery' does not match 'num_kv_heads' = 4"):
        load(tmp_path, {"attention_type": "groupedquery"})


def test_bias_gelu_fusion_is_gpt_neox_tanh_gelu(tmp_path):
    assert load(tmp_path, {"bias_gelu_fusion": True}).model.activation == "gelu_tanh"
    assert load(tmp_path, {"bias_gelu_fusion": True, "activation": "swiglu"}).model.activation == "swiglu"
    assert load(tmp_path, {"bias_gelu_fusion": False}).model.activation == "gelu"
    with pytest.raises(ConfigError, match="'bias_gelu_fusion' and 'onnx_safe' cannot both be true"):
        load(tmp_path, {"bias_gelu_fusion": True, "onnx_safe": True})
    assert load(tmp_path, {"onnx_safe": True}).model.activation == "gelu"


def test_runtime_and_legacy_tables_are_consistent():
    for table in (ALIASES, RUNTIME_KEYS, KERNEL_KEYS, MISSING_KEYS):
        for key, spec in table.items():
            assert spec.key == key


def _base(hint: Any) -> Any:
    args = getattr(hint, "__args__", None)
    return next((a for a in args if a is not type(None)), hint) if args else hint


def _other_value(hint: Any, default: Any) -> Any:
    from typing import Literal, get_args, get_origin

    base = _base(hint)
    if get_origin(hint) is Literal:
        return next(v for v in get_args(hint) if v != default)
    if base is bool:
        return not default
    if base is int:
        return (default or 0) + 2
    if base is float:
        return (default or 0.0) + 0.5
    if base is str:
        return "something-else"
    if get_origin(base) is list or base is list:
        return ["x"]
    if base is dict or get_origin(base) is dict:
        return {"enabled": True}
    raise AssertionError(f"no test value for {hint!r}")

"""The config system: merging, provenance, typing, every error message, derived values, round trip."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from neox.config import ConfigError, deepspeed_config, load_config, load_resolved, save_resolved
from neox.config.derive import batch_sizes, padded_vocab_size
from neox.config.neox_config import GROUPS, KEY_GROUP
from neox.config.reference import render_reference
from neox.config.show import config_rows
from launcher.deepy import runner_argv, split_argv
from conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
MODEL = """\
num_layers: 2
hidden_size: 64
num_attention_heads: 4
seq_length: 32
train_micro_batch_size_per_gpu: 2
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, *texts: str, overrides=(), local_gpus: int = 0, vocab_size=None):
    files = [write(tmp_path, f"c{i}.yml", text) for i, text in enumerate(texts)]
    return load_config(files, overrides, local_gpus=local_gpus, vocab_size=vocab_size)


def error_of(tmp_path: Path, *texts: str, overrides=(), local_gpus: int = 0) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, *texts, overrides=overrides, local_gpus=local_gpus)
    return str(info.value)


# ---------------------------------------------------------------- merging and provenance

def test_later_file_wins_and_nested_dicts_merge(tmp_path):
    cfg = load(
        tmp_path,
        MODEL + "optimizer: {type: Adam, params: {lr: 1.0e-3, betas: [0.8, 0.9], eps: 1.0e-8}}\nseed: 1\n",
        "seed: 2\noptimizer:\n  params:\n    lr: 5.0e-4\n",
    )
    assert cfg.train.seed == 2
    assert cfg.optim.optimizer == {"type": "Adam", "params": {"lr": 5.0e-4, "betas": [0.8, 0.9], "eps": 1.0e-8}}
    assert cfg.provenance["optimizer.params.lr"] == f"{tmp_path / 'c1.yml'}:4"
    assert cfg.provenance["optimizer.params.betas"] == f"{tmp_path / 'c0.yml'}:6"
    assert cfg.provenance["seed"] == f"{tmp_path / 'c1.yml'}:1"


def test_dash_and_underscore_are_the_same_key(tmp_path):
    cfg = load(tmp_path, MODEL + "train-iters: 7\nzero-optimization: {stage: 1, overlap-comm: true}\n",
               "train_iters: 9\n")
    assert cfg.train.train_iters == 9
    assert cfg.optim.zero_optimization == {"stage": 1, "overlap_comm": True}
    message = error_of(tmp_path, MODEL + "seq-length: 16\n")
    assert "c0.yml:6" in message and "set twice" in message and "also at line 4" in message


def test_command_line_overrides_win_and_are_typed_by_yaml(tmp_path):
    cfg = load(
        tmp_path,
        MODEL + "train_iters: 100\nno_weight_tying: false\n",
        overrides=["--train_iters", "20", "--optimizer.params.lr", "1e-3", "--no-weight-tying", "true",
                   "--train_data_paths", "[a, b]", "--seed=7", "--log_dir", "logs"],
    )
    assert cfg.train.train_iters == 20 and isinstance(cfg.train.train_iters, int)
    assert cfg.optim.optimizer["params"]["lr"] == pytest.approx(1e-3)  # YAML reads 1e-3 as text; float field parses it
    assert cfg.optim.optimizer["params"]["betas"] == [0.9, 0.95]  # nested override keeps the default's siblings
    assert cfg.model.no_weight_tying is True
    assert cfg.data.train_data_paths == ["a", "b"]
    assert cfg.train.seed == 7 and cfg.log.log_dir == "logs"
    for key in ("train_iters", "optimizer.params.lr", "no_weight_tying", "seed"):
        assert cfg.provenance[key] == "command line"


def test_every_value_has_a_provenance(tmp_path):
    cfg = load(tmp_path, MODEL, overrides=["--train_iters", "10"], vocab_size=1000)
    assert cfg.provenance["num_layers"] == f"{tmp_path / 'c0.yml'}:1"
    assert cfg.provenance["seq_length"] == f"{tmp_path / 'c0.yml'}:4"
    assert cfg.provenance["weight_decay"] == "default"
    assert cfg.provenance["train_batch_size"].startswith("derived:")
    assert cfg.provenance["lr_decay_iters"].startswith("derived: = train_iters")
    assert (cfg.get("num_layers"), cfg.get("world_size"), cfg.get("lr_decay_iters")) == (2, 1, 10)
    assert cfg.origin("optimizer") == "default" and cfg.origin("num_layers").endswith("c0.yml:1")
    rows = config_rows(cfg)
    keys = {row[1] for row in rows}
    assert set(KEY_GROUP) - {"optimizer", "zero_optimization"} <= keys
    assert all(row[3] for row in rows)


# ---------------------------------------------------------------- error messages

def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    message = error_of(tmp_path, MODEL + "num_layer: 3\n")
    assert f"{tmp_path / 'c0.yml'}:6" in message
    assert "unknown config key 'num_layer'" in message and "did you mean 'num_layers'" in message
    message = error_of(tmp_path, MODEL, overrides=["--hiden_size", "3"])
    assert "command line" in message and "did you mean 'hidden_size'" in message


def test_unknown_nested_key_is_suggested_with_origin(tmp_path):
    message = error_of(tmp_path, MODEL + "optimizer: {type: Adam, params: {lr: 0.001, beta: [0.9, 0.9]}}\n")
    assert "unknown key 'optimizer.params.beta'" in message and "'optimizer.params.betas'" in message
    assert "c0.yml:6" in message


def test_wrong_types_name_key_and_file(tmp_path):
    message = error_of(tmp_path, MODEL + "train_iters: ten\n")
    assert f"{tmp_path / 'c0.yml'}:6: 'train_iters' must be int | None, got str 'ten'" in message
    message = error_of(tmp_path, MODEL + "finetune: 1\n")
    assert "'finetune' must be bool" in message
    message = error_of(tmp_path, MODEL + "lr_decay_style: cosin\n")
    assert "'lr_decay_style' must be one of 'constant', 'linear', 'cosine'" in message and "c0.yml:6" in message
    message = error_of(tmp_path, MODEL + "train_data_paths: [a, 3]\n")
    assert "'train_data_paths' must be list[str] | None" in message
    message = error_of(tmp_path, MODEL + "zero_optimization: 2\n")
    assert "'zero_optimization' must be dict" in message


def test_heads_not_dividing_hidden_names_both_files(tmp_path):
    message = error_of(tmp_path, MODEL, "hidden_size: 66\n")
    assert "'num_attention_heads' (4) must divide 'hidden_size' (66)" in message
    assert f"num_attention_heads = {tmp_path / 'c0.yml'}:3" in message
    assert f"hidden_size = {tmp_path / 'c1.yml'}:1" in message


def test_inconsistent_batch_arithmetic(tmp_path):
    message = error_of(tmp_path, MODEL + "gradient_accumulation_steps: 2\n", "train_batch_size: 10\nnum_gpus: 2\n")
    assert ("'train_batch_size' (10) != 'train_micro_batch_size_per_gpu' (2) x "
            "'gradient_accumulation_steps' (2)") in message
    assert "data_parallel_size (2) = 8" in message
    assert f"train_batch_size = {tmp_path / 'c1.yml'}:1" in message
    assert f"gradient_accumulation_steps = {tmp_path / 'c0.yml'}:6" in message
    no_micro = MODEL.replace("train_micro_batch_size_per_gpu: 2\n", "")
    message = error_of(tmp_path, no_micro + "train_batch_size: 7\nnum_gpus: 2\n")
    assert "not a multiple" in message and "train_batch_size" in message


def test_world_size_not_divisible_by_parallel_sizes(tmp_path):
    message = error_of(tmp_path, MODEL + "num_gpus: 3\nmodel_parallel_size: 2\n")
    assert "world size 3" in message and "model_parallel_size" in message
    assert f"num_gpus = {tmp_path / 'c0.yml'}:6" in message


def test_zero_2_and_3_rejected_with_pipeline(tmp_path):
    for stage in (2, 3):
        text = MODEL + f"pipe_parallel_size: 2\nnum_gpus: 2\nzero_optimization: {{stage: {stage}}}\n"
        message = error_of(tmp_path, text)
        assert f"'zero_optimization.stage' {stage} cannot be used with 'pipe_parallel_size' 2" in message
        assert "refuses ZeRO-2 and ZeRO-3" in message and "Use zero_optimization.stage 1" in message
        assert "c0.yml:8" in message and "c0.yml:6" in message
    # pipe_parallel_size 1 still runs DeepSpeed's pipeline engine, which asserts the same
    message = error_of(tmp_path, MODEL + "pipe_parallel_size: 1\nzero_optimization: {stage: 2}\n")
    assert "cannot be used with 'pipe_parallel_size' 1" in message
    cfg = load(tmp_path, MODEL + "pipe_parallel_size: 2\nnum_gpus: 2\nzero_optimization: {stage: 1}\n")
    assert cfg.derived.data_parallel_size == 1
    cfg = load(tmp_path, MODEL + "pipe_parallel_size: 0\nnum_gpus: 2\nzero_optimization: {stage: 3}\n")
    assert cfg.optim.zero_stage == 3 and cfg.derived.data_parallel_size == 2


def test_broken_yaml_names_file_and_line(tmp_path):
    message = error_of(tmp_path, MODEL + "optimizer: {type: Adam\nseed: 3\n")
    assert f"{tmp_path / 'c0.yml'}:7" in message and "invalid YAML" in message
    message = error_of(tmp_path, "- just\n- a list\n")
    assert "must be a mapping" in message


def test_derived_keys_cannot_be_set(tmp_path):
    message = error_of(tmp_path, MODEL + "data_parallel_size: 8\n")
    assert "'data_parallel_size' is derived" in message and "num_gpus" in message
    # gpt-neox's world_size may sit in a config, and must then agree with the derived one
    message = error_of(tmp_path, MODEL + "world_size: 8\n")
    assert "'world_size' is 8 but this launch has 1 ranks" in message and "it is derived" in message


def test_fp16_without_cuda_suggests_bf16(tmp_path):
    cfg = load(tmp_path, MODEL + "fp16: {enabled: true}\n")
    assert cfg.optim.precision == "fp16"
    with pytest.raises(ConfigError, match="needs CUDA.*bfloat16.*fp32"):
        deepspeed_config(cfg, cuda_available=False)
    assert "fp16" in deepspeed_config(cfg, cuda_available=True)
    message = error_of(tmp_path, MODEL + "precision: fp32\nbf16: {enabled: true}\n")
    assert "'precision' is fp32 but 'bf16.enabled' is true" in message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yml not found in config folder"):
        load_config(["nope.yml"], config_dir=tmp_path, local_gpus=0)


# ---------------------------------------------------------------- derived values

def test_batch_sizes_any_two_give_the_third():
    assert batch_sizes(4, 8, None, 3) == (4, 8, 96)
    assert batch_sizes(4, None, 96, 3) == (4, 8, 96)
    assert batch_sizes(None, 8, 96, 3) == (4, 8, 96)
    assert batch_sizes(None, None, 96, 3) == (32, 1, 96)
    assert batch_sizes(4, None, None, 3) == (4, 1, 12)
    assert batch_sizes(4, 8, 96, 3) == (4, 8, 96)


def test_padded_vocab():
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50257, 128, 2) == 50432  # GPT-NeoX-20B's embedding rows
    assert padded_vocab_size(50304, 128, 1) == 50304


def test_world_from_gpus_and_hostfile(tmp_path):
    cfg = load(tmp_path, MODEL, local_gpus=0)
    assert (cfg.derived.world_size, cfg.derived.data_parallel_size, cfg.train.train_batch_size) == (1, 1, 2)
    cfg = load(tmp_path, MODEL, local_gpus=4)
    assert cfg.derived.world_size == 4 and cfg.train.train_batch_size == 8
    hosts = write(tmp_path, "hosts", "# cluster\nworker-0 slots=8\nworker-1 slots=8\nworker-2 slots=4\n")
    cfg = load(tmp_path, MODEL + f"hostfile: {hosts}\nmodel_parallel_size: 2\n")
    assert (cfg.derived.world_size, cfg.derived.node_count, cfg.derived.data_parallel_size) == (20, 3, 10)
    cfg = load(tmp_path, MODEL + f"hostfile: {hosts}\nnum_nodes: 2\nnum_gpus: 2\n")
    assert (cfg.derived.world_size, cfg.derived.node_count) == (4, 2)
    cfg = load(tmp_path, MODEL + f"hostfile: {hosts}\ninclude: 'worker-0:0,1@worker-2'\n")
    assert cfg.derived.world_size == 6
    cfg = load(tmp_path, MODEL + f"hostfile: {hosts}\nexclude: 'worker-1@worker-0:7'\n")
    assert cfg.derived.world_size == 11
    message = error_of(tmp_path, MODEL + f"hostfile: {hosts}\ninclude: worker-9\n")
    assert "'include' names host 'worker-9'" in message
    message = error_of(tmp_path, MODEL + "num_nodes: 2\n")
    assert "needs a 'hostfile'" in message


def test_lr_decay_iters_and_precision_defaults(tmp_path):
    cfg = load(tmp_path, MODEL + "train_iters: 50\nbf16: {enabled: true}\n")
    assert cfg.optim.lr_decay_iters == 50 and cfg.optim.precision == "bfloat16"
    cfg = load(tmp_path, MODEL + "train_iters: 50\nlr_decay_iters: 40\n")
    assert cfg.optim.lr_decay_iters == 40 and cfg.optim.precision == "fp32"


# ---------------------------------------------------------------- resolved file, DeepSpeed JSON, reference

def test_resolved_config_round_trip(tmp_path):
    cfg = load(tmp_path, MODEL + "fp16: {enabled: true, initial_scale_power: 12}\ntrain_iters: 5\n",
               overrides=["--optimizer.params.lr", "2e-4"], vocab_size=50257)
    path = save_resolved(cfg, tmp_path / "run" / "resolved_config.yml")
    assert sorted(p.name for p in path.parent.iterdir()) == ["resolved_config.yml"]  # no temporary left behind
    again = load_resolved(path)
    assert again == cfg
    assert again.provenance["optimizer.params.lr"] == "command line"
    assert again.model.padded_vocab_size == 50304
    raw = yaml.safe_load(path.read_text())
    assert raw["config"]["derived"]["world_size"] == 1
    write(tmp_path, "plain.yml", MODEL)
    with pytest.raises(ConfigError, match="not a resolved config"):
        load_resolved(tmp_path / "plain.yml")


def test_deepspeed_json(tmp_path):
    cfg = load(tmp_path, MODEL + "num_gpus: 2\ngradient_accumulation_steps: 3\n"
               "zero_optimization: {stage: 2, overlap_comm: true}\n"
               "fp16: {enabled: true, initial_scale_power: 12}\ngradient_clipping: 0.5\n")
    ds = deepspeed_config(cfg, cuda_available=True)
    assert ds["train_batch_size"] == 12 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}
    assert "optimizer" not in ds and "scheduler" not in ds and "bf16" not in ds
    assert ds["wall_clock_breakdown"] is False
    cfg = load(tmp_path, MODEL + "bf16: {enabled: true}\ndeepspeed_extra_args: {comms_logger: {enabled: true}}\n")
    ds = deepspeed_config(cfg, cuda_available=False)
    assert ds["bf16"] == {"enabled": True} and ds["comms_logger"] == {"enabled": True}
    cfg = load(tmp_path, MODEL + "deepspeed_extra_args: {train_batch_size: 3}\n")
    with pytest.raises(ConfigError, match="deepspeed_extra_args"):
        deepspeed_config(cfg, cuda_available=False)


def test_reference_lists_every_key():
    text = render_reference()
    for group in GROUPS:
        assert f"## {group}" in text
    for key in KEY_GROUP:
        assert f"| `{key}` |" in text
    assert "| `lr_decay_style` | one of 'constant', 'linear', 'cosine', 'exponential' | `'linear'` |" in text
    for key in ("gas", "te_mha", "bias_gelu_fusion", "rank"):  # gpt-neox keys that are not keys of ours
        assert f"| `{key}` |" in text


# ---------------------------------------------------------------- shipped configs

SIZES = {  # name: (layers, hidden, heads, lr) from gpt-neox's configs
    "125M": (12, 768, 12, 6.0e-4),
    "350M": (24, 1024, 16, 3.0e-4),
    "1-3B": (24, 2048, 16, 2.0e-4),
    "2-7B": (32, 2560, 32, 1.6e-4),
    "6-7B": (32, 4096, 32, 1.2e-4),
    "13B": (40, 5120, 40, 1.0e-4),
    "llama-7B-style": (32, 4096, 32, 3.0e-4),
}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_size_configs_load_with_local_setup(name):
    cfg = load_config([f"{name}.yml", "local_setup.yml"], config_dir=CONFIGS, vocab_size=50257, local_gpus=8)
    layers, hidden, heads, lr = SIZES[name]
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (layers, hidden, heads)
    assert cfg.optim.lr == pytest.approx(lr)
    assert cfg.derived.world_size == 8 and cfg.train.train_batch_size == 32
    assert cfg.data.vocab_file == "runs/data/demo-tokenizer.json"
    expected_vocab = 50257 if name.startswith("llama") else 50304
    assert cfg.model.padded_vocab_size == expected_vocab
    assert cfg.optim.lr_decay_iters == cfg.train.train_iters


def test_20b_config_on_its_cluster(tmp_path):
    hosts = write(tmp_path, "hosts", "".join(f"node-{i} slots=8\n" for i in range(12)))
    cfg = load_config(["20B.yml"], [f"--hostfile={hosts}"], config_dir=CONFIGS, vocab_size=50277, local_gpus=0)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (44, 6144, 64)
    assert cfg.model.rotary_pct == 0.25 and cfg.model.gpt_j_residual
    assert (cfg.derived.world_size, cfg.derived.data_parallel_size) == (96, 12)
    assert cfg.train.train_batch_size == 4 * 32 * 12
    assert cfg.model.padded_vocab_size == 50432
    assert cfg.data.split == "995,4,1" and cfg.optim.zero_stage == 1


def test_tiny_cpu_local_setup_and_finetune():
    cfg = load_config(["tiny.yml", "cpu.yml", "local_setup.yml"], config_dir=CONFIGS,
                      vocab_size=4096, local_gpus=0)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (4, 128, 4)
    assert cfg.model.pos_emb == "rotary" and cfg.model.gpt_j_residual
    assert cfg.launch.distributed_backend == "gloo" and cfg.optim.precision == "fp32" and cfg.optim.zero_stage == 2
    assert (cfg.derived.world_size, cfg.derived.data_parallel_size, cfg.train.train_batch_size) == (2, 2, 8)
    assert cfg.model.padded_vocab_size == 4096
    assert cfg.data.tokenizer_type == "HFTokenizer" and cfg.data.vocab_file == "runs/data/demo-tokenizer.json"
    assert cfg.data.merge_file is None and cfg.train.train_iters == 300
    cfg = load_config(["tiny.yml", "cpu.yml", "local_setup.yml", "finetune-example.yml"], config_dir=CONFIGS,
                      local_gpus=0)
    assert cfg.train.finetune and cfg.train.load == "runs/demo/checkpoints"
    assert cfg.optim.lr == pytest.approx(2e-4) and cfg.optim.optimizer["params"]["betas"] == [0.9, 0.95]


def test_70m_config_has_pythia_70m_shape():
    cfg = load_config(["70M.yml", "cpu.yml"], config_dir=CONFIGS, vocab_size=50277, local_gpus=0)
    model = cfg.model
    assert (model.num_layers, model.hidden_size, model.num_attention_heads) == (6, 512, 8)
    assert model.rotary_pct == 0.25 and model.gpt_j_residual and model.no_weight_tying
    assert model.padded_vocab_size == 50304 and cfg.optim.lr == pytest.approx(1.0e-3)


def test_every_shipped_config_is_covered():
    covered = set(SIZES) | {"70M", "20B", "tiny", "cpu", "local_setup", "finetune-example", "cpu-3d", "3d-13B-64gpu"}
    assert {p.stem for p in CONFIGS.glob("*.yml")} == covered


# ---------------------------------------------------------------- launcher argv (the launch itself is in e2e)

def test_split_argv_and_runner_argv(tmp_path):
    assert split_argv(["train", "-d", "configs", "a.yml", "b.yml", "--seed", "3"]) == (
        ["train", "-d", "configs", "a.yml", "b.yml"], ["--seed", "3"])
    cfg = load(tmp_path, MODEL + "num_gpus: 2\nmaster_port: 31000\n")
    argv = runner_argv(cfg, Path("/run/resolved_config.yml"), local_gpus=0)
    assert argv == ["--num_gpus", "2", "--master_port", "31000", "--launcher", "pdsh", "--no_local_rank",
                    "--module", "neox.train", "--config", "/run/resolved_config.yml"]
    cfg = load(tmp_path, MODEL)  # no GPU, num_gpus unset: pin the single CPU rank
    assert runner_argv(cfg, Path("r.yml"), local_gpus=0)[:2] == ["--num_gpus", "1"]
    assert "--num_gpus" not in runner_argv(load(tmp_path, MODEL, local_gpus=4), Path("r.yml"), local_gpus=4)
    hosts = write(tmp_path, "hosts", "a slots=2\nb slots=2\n")
    cfg = load(tmp_path, MODEL + f"hostfile: {hosts}\nlauncher: slurm\nno_ssh: true\nnode_rank: 1\n"
               "master_addr: 10.0.0.1\nlauncher_args: '--account x'\n")
    argv = runner_argv(cfg, Path("r.yml"), entry="probe.py")
    assert argv == ["--hostfile", str(hosts), "--master_addr", "10.0.0.1", "--master_port", "29500",
                    "--launcher", "slurm", "--launcher_args=--account x", "--no_ssh", "--node_rank", "1",
                    "--no_local_rank", "probe.py", "--config", "r.yml"]


# ---------------------------------------------------------------- wandb switch, gpt-neox kernel-choice keys

@pytest.mark.parametrize("extra,env,project", [
    ("", {}, None),                                                   # no credentials: off, as in gpt-neox
    ("wandb_project: my-runs\n", {"WANDB_API_KEY": "k"}, "my-runs"),
    ("wandb_project: my-runs\nuse_wandb: false\n", {"WANDB_API_KEY": "k"}, None),  # an explicit off wins
    ("use_wandb: true\n", {}, None),                                  # asked for, no credentials: off (one line)
    ("use_wandb: true\n", {"WANDB_MODE": "offline"}, "neox"),         # gpt-neox's default project
])
def test_wandb_follows_gpt_neox_rule(tmp_path, extra, env, project):
    assert load(tmp_path, MODEL + extra).log.active_wandb_project({"HOME": str(tmp_path), **env}) == project


def test_kernel_fusion_keys_are_accepted_with_one_summary_line(tmp_path, caplog):
    from neox.config import gpt_neox_translate

    gpt_neox_translate._summarised.clear()
    text = MODEL + "scaled_upper_triang_masked_softmax_fusion: true\nlayernorm-fusion: true\nrope_fusion: false\n"
    with caplog.at_level("WARNING", logger="neox.config"):
        cfg = load(tmp_path, text, overrides=["--bias_dropout_fusion", "true"])
        load(tmp_path, text, overrides=["--bias_dropout_fusion", "true"])  # deepy resolves twice: nothing new
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["gpt-neox kernel switches accepted, no effect here (neox gets fused kernels from the device; "
                     "the numbers are the same): bias_dropout_fusion, layernorm_fusion, rope_fusion, "
                     "scaled_upper_triang_masked_softmax_fusion"]
    assert cfg.model == load(tmp_path, MODEL).model  # nothing of the model changed
    assert "rope_fusion" not in yaml.safe_dump(cfg.provenance)
    assert "'rope_fusion' must be bool" in error_of(tmp_path, MODEL + "rope_fusion: 3\n")

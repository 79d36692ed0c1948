"""gpt-neox's command-line forms and launch keys, as deepy parses and resolves them (no launch)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from launcher import deepy
from neox.config import ConfigError, load_config

MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32}


@pytest.mark.parametrize(("script", "command"), [
    ("train.py", "train"), ("eval.py", "eval"), ("evaluate.py", "eval"), ("generate.py", "generate"),
    ("/opt/gpt-neox/train.py", "train"), ("train", "train"), ("show-config", "show-config"),
])
def test_gpt_neox_script_names_are_commands(script, command):
    args = deepy.build_parser().parse_args([script, "-d", "configs", "125M.yml", "local_setup.yml"])
    assert args.command == command and args.configs == ["125M.yml", "local_setup.yml"]


def test_an_unknown_script_is_refused():
    with pytest.raises(SystemExit):
        deepy.build_parser().parse_args(["pretrain_gpt2.py", "125M.yml"])


def test_short_hostfile_option_and_config_names_without_suffix(tmp_path, capsys):
    (tmp_path / "125M.yml").write_text(yaml.safe_dump({**MODEL, "train_micro_batch_size_per_gpu": 1}))
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=3\n")
    code = deepy.main(["show-config", "-d", str(tmp_path), "125M", "-H", str(hostfile)])
    out = capsys.readouterr().out
    assert code == 0
    assert any(line.split()[:3] == ["launch", "hostfile", str(hostfile)] for line in out.splitlines())
    assert any(line.split()[:3] == ["derived", "world_size", "3"] for line in out.splitlines())


def _load(tmp_path: Path, extra: dict, local_gpus: int = 0):
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({**MODEL, **extra}))
    return load_config([path], local_gpus=local_gpus)


def test_a_missing_hostfile_means_this_machine_unless_more_nodes_are_asked_for(tmp_path, caplog):
    absent = str(tmp_path / "no-such-hostfile")
    with caplog.at_level(logging.WARNING, logger="neox.config"):
        cfg = _load(tmp_path, {"hostfile": absent, "num_gpus": 2})
    assert cfg.launch.hostfile is None and cfg.derived.world_size == 2 and cfg.derived.node_count == 1
    assert any("not found: running on this machine only" in r.getMessage() for r in caplog.records)
    assert cfg.origin("hostfile").startswith("derived:")
    with pytest.raises(ConfigError, match="does not exist and 'num_nodes' asks for 2 nodes"):
        _load(tmp_path, {"hostfile": absent, "num_nodes": 2})


def test_global_num_gpus_sizes_a_job_without_a_hostfile(tmp_path):
    cfg = _load(tmp_path, {"global_num_gpus": 16, "model_parallel_size": 2, "pipe_parallel_size": 2,
                           "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8})
    assert cfg.derived.world_size == 16 and cfg.derived.data_parallel_size == 4
    assert cfg.train.train_batch_size == 4 * 8 * 4
    with pytest.raises(ConfigError, match="'global_num_gpus' is 16 but 'num_gpus'"):
        _load(tmp_path, {"global_num_gpus": 16, "num_gpus": 2})
    with pytest.raises(ConfigError, match="this machine has 8 GPU"):
        deepy.check_launch_size(_load(tmp_path, {"global_num_gpus": 16}, local_gpus=8), local_gpus=8)


def test_deepspeed_slurm_and_mpi_pick_the_launcher_and_pass_comment_and_account(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    cfg = _load(tmp_path, {"deepspeed_slurm": True, "hostfile": str(hostfile), "comment": "neox run",
                           "account": "proj-1", "launcher_args": "--partition gpu"})
    assert cfg.launch.launcher == "slurm" and cfg.launch.force_multi
    argv = deepy.runner_argv(cfg, Path("r.yml"), entry="probe.py")
    assert "--launcher_args=--partition gpu '--comment=neox run' --account=proj-1" in argv
    assert _load(tmp_path, {"deepspeed_mpi": True}).launch.launcher == "openmpi"
    with pytest.raises(ConfigError, match="'deepspeed_slurm' starts ranks with srun"):
        _load(tmp_path, {"deepspeed_slurm": True, "launcher": "openmpi"})
    # without slurm, gpt-neox ignores comment/account too
    assert not any("comment" in a for a in deepy.runner_argv(_load(tmp_path, {"comment": "x"}), Path("r.yml"),
                                                              entry="probe.py"))


def test_nccl_is_gpt_neox_default_backend(tmp_path):
    assert _load(tmp_path, {}).launch.distributed_backend == "nccl"

"""deepy as a user runs it: show-config and error paths as subprocesses, and real 2-rank DeepSpeed launches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.deepy import LaunchError, run_deepspeed
from neox.config import load_config, save_resolved
from conftest import REPO_ROOT
from tests.e2e.train_helpers import free_port

DEEPY = REPO_ROOT / "launcher" / "deepy.py"
CONFIGS = REPO_ROOT / "configs"
PROBE = Path(__file__).with_name("probe_rank.py")

GPT2_TOKENIZER = ("--tokenizer_type", "HFGPT2Tokenizer", "--vocab_file", "data/tokenizers/gpt2/vocab.json",
                  "--merge_file", "data/tokenizers/gpt2/merges.txt")


def deepy(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEEPY), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_show_config_prints_every_value_with_its_origin():
    # GPT-2 files from the repo: local_setup.yml's demo tokenizer exists only after `make demo`
    result = deepy("show-config", "-d", "configs", "tiny.yml", "cpu.yml", "local_setup.yml",
                   "--train_iters", "20", "--optimizer.params.lr", "3e-4", *GPT2_TOKENIZER)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[1]: line for line in result.stdout.splitlines()[2:]}
    assert rows["num_layers"].split()[2] == "4" and rows["num_layers"].endswith("configs/tiny.yml:9")
    assert rows["train_iters"].split()[2] == "20" and rows["train_iters"].endswith("command line")
    assert rows["optimizer.params.lr"].split()[2] == "0.0003" and rows["optimizer.params.lr"].endswith("command line")
    stage = rows["zero_optimization.stage"]
    assert stage.split()[2] == "2" and stage.endswith("configs/cpu.yml:7")
    assert rows["eval_limit"].endswith("default")
    assert rows["world_size"].split()[2] == "2"
    # HFGPT2Tokenizer adds a padding token: 50258 ids, padded to 50304
    padded = rows["padded_vocab_size"]
    assert padded.split()[2] == "50304" and "derived: tokenizer vocab 50258" in padded


def test_reference_is_generated_by_a_module_command():
    result = subprocess.run([sys.executable, "-m", "neox.config.reference"], capture_output=True, text=True,
                            timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# Configuration reference")
    assert "| `train_micro_batch_size_per_gpu` | int | None | `None` |" in result.stdout.replace("\\|", "|")


def test_bad_config_is_one_paragraph_and_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nseq_length: 8\nlerning_rate: 3\n")
    result = deepy("train", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("deepy: error: ") and result.stderr.count("\n") == 1
    assert f"{bad}:5: unknown config key 'lerning_rate'" in result.stderr


def test_train_refuses_fp16_on_cpu_before_launching(tmp_path):
    result = deepy("train", "-d", "configs", "tiny.yml", "local_setup.yml", "--fp16.enabled", "true",
                   "--save", str(tmp_path / "run"), *GPT2_TOKENIZER)
    assert result.returncode == 2
    assert "needs CUDA" in result.stderr and "bfloat16" in result.stderr
    assert not (tmp_path / "run").exists()


def _probe_records(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "probe").glob("rank*.json"))]


def test_two_cpu_ranks_launched_by_deepspeed(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the launcher must supply 1 by itself
    port = free_port()
    cfg = load_config(["tiny.yml", "cpu.yml", "local_setup.yml"],
                      ["--save", str(tmp_path / "run"), "--master_port", str(port)], config_dir=CONFIGS)
    resolved = save_resolved(cfg, tmp_path / "run" / "resolved_config.yml")
    assert run_deepspeed(cfg, resolved, entry=str(PROBE)) == 0
    records = _probe_records(tmp_path / "run")
    assert [r["env"]["RANK"] for r in records] == ["0", "1"]
    for r in records:
        assert r["env"]["WORLD_SIZE"] == "2" and r["env"]["LOCAL_RANK"] == r["env"]["RANK"]
        assert r["env"]["OMP_NUM_THREADS"] == "1" and r["torch_threads"] == 1
        assert r["env"]["MASTER_PORT"] == str(port)
        assert r["config"] == str(resolved) and r["world_size_in_config"] == 2
        assert r["rank_sum"] == 1  # the two ranks really met in one gloo group
    assert (tmp_path / "run" / "deepspeed_env").read_text() == "OMP_NUM_THREADS=1\n"
    assert "OMP_NUM_THREADS" not in os.environ  # the launcher restored the caller's environment


def test_hostfile_no_ssh_launch_keeps_user_thread_count(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=2\n")
    cfg = load_config(["tiny.yml", "cpu.yml", "local_setup.yml"],
                      ["--save", str(tmp_path / "run"), "--master_port", str(free_port()), "--num_gpus", "null",
                       "--hostfile", str(hosts), "--no_ssh", "true", "--node_rank", "0",
                       "--master_addr", "127.0.0.1"], config_dir=CONFIGS, local_gpus=0)
    assert cfg.derived.world_size == 2
    resolved = save_resolved(cfg, tmp_path / "run" / "resolved_config.yml")
    assert run_deepspeed(cfg, resolved, entry=str(PROBE), local_gpus=0) == 0
    records = _probe_records(tmp_path / "run")
    assert [r["env"]["RANK"] for r in records] == ["0", "1"]
    assert all(r["env"]["OMP_NUM_THREADS"] == "2" and r["rank_sum"] == 1 for r in records)


def test_failing_rank_gives_its_exit_code(tmp_path):
    failing = tmp_path / "fail.py"
    failing.write_text("import sys\nsys.exit(3)\n")
    cfg = load_config(["tiny.yml", "cpu.yml", "local_setup.yml"],
                      ["--save", str(tmp_path / "run"), "--master_port", str(free_port())], config_dir=CONFIGS)
    resolved = save_resolved(cfg, tmp_path / "run" / "resolved_config.yml")
    assert run_deepspeed(cfg, resolved, entry=str(failing)) == 3


def _multi_node_cfg(tmp_path: Path, *extra: str):
    hosts = tmp_path / "hostfile"
    hosts.write_text("node-a slots=2\nnode-b slots=2\n")
    return load_config(["tiny.yml", "cpu.yml", "local_setup.yml"],
                       ["--save", str(tmp_path / "run"), "--num_gpus", "null", "--hostfile", str(hosts),
                        "--master_addr", "10.1.2.3", "--no_ssh_check", "true", *extra],
                       config_dir=CONFIGS, local_gpus=0)


def test_multi_node_pdsh_command_exports_rank_env(tmp_path, monkeypatch):
    # A stand-in pdsh records the command DeepSpeed's runner gives it: what every remote node would run.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "pdsh"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$PDSH_ARGS_OUT"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PDSH_ARGS_OUT", str(tmp_path / "pdsh_args"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = _multi_node_cfg(tmp_path)
    assert (cfg.derived.world_size, cfg.derived.node_count) == (4, 2)
    resolved = save_resolved(cfg, tmp_path / "run" / "resolved_config.yml")
    assert run_deepspeed(cfg, resolved, local_gpus=0) == 0
    args = (tmp_path / "pdsh_args").read_text().splitlines()
    assert args[args.index("-w") + 1] == "node-a,node-b"
    assert "export OMP_NUM_THREADS=1;" in args[args.index("-w") + 2]
    assert "--master_addr=10.1.2.3" in args and "--no_local_rank" in args and "--module" in args
    assert args[-3:] == ["neox.train", "--config", str(resolved)]


def test_launcher_refusal_is_a_launch_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no pdsh to be found
    cfg = _multi_node_cfg(tmp_path)
    resolved = save_resolved(cfg, tmp_path / "run" / "resolved_config.yml")
    with pytest.raises(LaunchError, match="launcher 'pdsh' not installed"):
        run_deepspeed(cfg, resolved, local_gpus=0)

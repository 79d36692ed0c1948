"""checkpoint_async (neox/checkpoint/async_save.py) on one process, with a stand-in for DeepSpeed's engine that
saves through DeepSpeed's checkpoint-engine interface as the real one does: the files hold the values of the step
they were saved at even though training changes the tensors meanwhile; complete.json and `latest` move only once
the background writes are done (and never after a failed one); a kill -9 while they run leaves no marker."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from neox.checkpoint import engine_state
from neox.checkpoint.async_save import BackgroundWriter, CheckpointSaver, CheckpointWriteError
from neox.checkpoint.layout_state import ShardWrite
from neox.checkpoint.shard_files import Entry
from tests.conftest import REPO_ROOT


class StandInEngine:
    """Saves its tensors as DeepSpeed does: one state dict per file through self.checkpoint_engine."""

    def __init__(self):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        self.module = torch.nn.Linear(2, 2)
        self.checkpoint_engine = TorchCheckpointEngine()
        self.weights = torch.arange(6, dtype=torch.float32)
        self.shard = torch.arange(6, dtype=torch.float32) * 10

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters=False):
        path = Path(save_dir) / tag
        self.checkpoint_engine.makedirs(str(path), exist_ok=True)
        self.checkpoint_engine.save({"module": {"w": self.weights}, **client_state},
                                    str(path / "mp_rank_00_model_states.pt"))

    def write_extra(self, ckpt_dir: Path, submit) -> None:
        """What save_layout_free_state does with a submit function: a host copy handed to the writer."""
        folder = ckpt_dir / "layout_free"
        folder.mkdir(exist_ok=True)
        write = ShardWrite(folder / "rank00000.safetensors", [Entry("weight/x@0,0", 2, 3, self.shard)], {})
        if submit is None:
            write.write()
        else:
            submit(write.snapshot())


@pytest.fixture
def run_files(tmp_path):
    config = tmp_path / "resolved.yml"
    config.write_text("train_iters: 3\n")
    return engine_state.RunFiles(config, ())


def _saver(asynchronous: bool, completed: list, delay: float = 0.0) -> CheckpointSaver:
    return CheckpointSaver(asynchronous, rank=0, barrier=lambda: None, device=torch.device("cpu"),
                           on_complete=lambda path, seconds: completed.append((path.name, seconds)),
                           write_delay_s=delay)


def test_async_checkpoint_holds_the_saved_step_and_completes_only_when_written(tmp_path, run_files):
    save_dir, engine, completed = tmp_path / "ckpt", StandInEngine(), []
    _saver(False, completed).save(engine, save_dir, 1, {"iteration": 1}, run_files, None, engine.write_extra)
    assert completed[0][0] == "global_step1" and engine_state.resolve_load_tag(save_dir) == "global_step1"

    saver = _saver(True, completed, delay=0.3)
    stall = saver.save(engine, save_dir, 2, {"iteration": 2}, run_files, None, engine.write_extra)
    with torch.no_grad():  # training goes on and changes the tensors in place
        engine.weights.add_(100.0)
        engine.shard.add_(100.0)
    ckpt = save_dir / "global_step2"
    assert stall < 0.3 and not saver.writer.idle()
    saver.poll()  # the writes are still in flight: nothing moves
    assert not engine_state.is_complete(save_dir, "global_step2")
    assert (save_dir / "latest").read_text().strip() == "global_step1" and len(completed) == 1
    while not saver.writer.idle():
        time.sleep(0.05)
    saver.poll()
    assert engine_state.is_complete(save_dir, "global_step2") and completed[-1][0] == "global_step2"
    assert (save_dir / "latest").read_text().strip() == "global_step2" and completed[-1][1] >= 0.6
    saved = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)
    assert torch.equal(saved["module"]["w"], torch.arange(6, dtype=torch.float32)) and saved["iteration"] == 2
    from safetensors.torch import load_file
    assert torch.equal(load_file(ckpt / "layout_free" / "rank00000.safetensors")["weight/x@0,0"],
                       torch.arange(6, dtype=torch.float32).reshape(2, 3) * 10)
    assert json.loads((ckpt / engine_state.COMPLETE_MARKER).read_text())["iteration"] == 2
    assert not list(ckpt.rglob("*.tmp-*")), "only complete files are left"
    saver.wait()  # nothing in flight: returns at once
    assert len(completed) == 2


def test_a_failed_background_write_is_an_error_and_leaves_no_marker(tmp_path, run_files):
    save_dir, engine, completed = tmp_path / "ckpt", StandInEngine(), []
    saver = _saver(True, completed)
    saver.save(engine, save_dir, 1, {"iteration": 1}, run_files, None, engine.write_extra)
    saver.wait()

    def disk_full(ckpt_dir, submit):
        def write():
            raise OSError(28, "No space left on device")
        submit(SimpleNamespace(write=write))  # a shard write that fails in the background

    saver.save(engine, save_dir, 2, {"iteration": 2}, run_files, None, disk_full)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*no resume picks it"):
        saver.wait()
    assert not engine_state.is_complete(save_dir, "global_step2")
    assert engine_state.resolve_load_tag(save_dir) == "global_step1" and [c[0] for c in completed] == ["global_step1"]


def test_writer_runs_jobs_in_order_and_reports_errors():
    writer, seen = BackgroundWriter(), []
    for i in range(5):
        writer.submit(lambda i=i: seen.append(i))
    writer.submit(lambda: 1 / 0)
    assert writer.wait() == ["ZeroDivisionError: division by zero"] and seen == list(range(5))
    assert writer.idle() and writer.wait() == []


_KILLED_MID_WRITE = """
import sys, time, torch
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.unit.test_async_checkpoint import StandInEngine, _saver
from neox.checkpoint.engine_state import RunFiles
save_dir, engine = Path({save!r}), StandInEngine()
files = RunFiles(Path({config!r}), ())
_saver(False, []).save(engine, save_dir, 1, {{"iteration": 1}}, files, None, engine.write_extra)
saver = _saver(True, [], delay=60.0)
saver.save(engine, save_dir, 2, {{"iteration": 2}}, files, None, engine.write_extra)
print("in flight", flush=True)
time.sleep(120)
"""


def test_kill_9_while_an_async_write_runs_leaves_the_previous_checkpoint(tmp_path, run_files):
    save_dir = tmp_path / "ckpt"
    script = _KILLED_MID_WRITE.format(root=str(REPO_ROOT), save=str(save_dir), config=str(run_files.resolved_config))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        lines = iter(proc.stdout.readline, "")
        assert any(line.strip() == "in flight" for line in lines)  # DeepSpeed logs a line or two first
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (save_dir / "global_step2" / "config.yml").is_file()  # the save had begun
    assert not engine_state.is_complete(save_dir, "global_step2")
    assert engine_state.resolve_load_tag(save_dir) == "global_step1"


def test_plan_shows_the_host_memory_a_save_and_a_resharding_load_add(tmp_path):
    """`deepy plan`: a synchronous save writes each rank's 1/dp shard of the fp32 weights + Adam moments from the
    engine's memory (one staging buffer from a GPU; nothing on a CPU); checkpoint_async holds a host copy of that
    shard and of DeepSpeed's state (bf16 weights, fp32 master and moments of the ZeRO partition)."""
    import yaml

    from neox.config import load_config
    from neox.plan.memory import save_host_bytes
    from neox.plan.plan import PlanOptions, build_plan
    from neox.plan.report import format_plan

    base = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "num_gpus": 4,
            "padded_vocab_size": 128, "save": str(tmp_path / "ckpt"), "zero_optimization": {"stage": 1},
            "precision": "bfloat16", "train_micro_batch_size_per_gpu": 2, "train_iters": 10}
    plans = {}
    for name, extra, options in (("gpu", {}, PlanOptions(accelerator="A100-40GB")),
                                 ("gpu-async", {"checkpoint_async": True}, PlanOptions(accelerator="A100-40GB"))):
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump({**base, **extra}))
        plans[name] = build_plan(load_config([path], local_gpus=0), options)
    p = plans["gpu"].params.total
    shard = -(-p // 4)
    assert plans["gpu"].ranks[0].save_host == 12 * shard  # under one staging buffer: the whole shard passes through it
    # On a CPU the state is written from and read into host memory where it lives (a CPU plan measures this
    # machine, too slow for a unit test: the function it calls).
    assert save_host_bytes(plans["gpu"].cfg, p, 4, 2 * p, on_gpu=False) == 0
    assert plans["gpu-async"].ranks[0].save_host == 12 * shard + 2 * p + 12 * shard
    text = format_plan(plans["gpu-async"])
    assert "checkpoint save: checkpoint_async: each rank copies its layout-free shard and DeepSpeed's state" in text
    assert "checkpoint resume at another layout: each rank reads only its own byte ranges of the layout-free " \
           "shards, into its tensors: 64 MiB of extra host RAM per rank at most" in text

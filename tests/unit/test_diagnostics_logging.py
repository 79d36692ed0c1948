"""gpt-neox's logging keys, one process: the gradient noise scale against a hand computation, per-parameter norms
against torch.linalg, the wandb and Comet sinks in their offline modes (re-reading what they wrote), the profiler
window, the CPU memory record, the git hash and the config checks. The multi-rank layouts are in
tests/distributed/test_diagnostics_layouts.py."""
from __future__ import annotations

import io
import json
import math
import struct
import subprocess
import time
import types
import zipfile
from pathlib import Path

import pytest
import torch

from neox.config.errors import ConfigError
from neox.config.log import LogConfig
from neox.train.metrics import ConsoleSink, WandbSink, shared_wandb_group, sinks_for_run
from neox.train.noise_scale import GradientNoiseScale
from neox.train.profiling import build_step_profiler
from tests.conftest import REPO_ROOT


# ---------------------------------------------------------------- gradient noise scale

def _run_noise_scale(grads: list[list[float]], split: int | None = None, **kwargs) -> list[float | None]:
    """Feed whole gradients (split=None), or each as two 'ranks' owning [:split] and [split:] whose partial sums
    are added as the all-reduce adds them."""
    estimators = [GradientNoiseScale(batch_size_small=4, n_batches=2, **kwargs) for _ in range(1 if split is None else 2)]
    seen = []
    for g in grads:
        g = torch.tensor(g)
        parts = [g] if split is None else [g[:split], g[split:]]
        terms = [est.local_terms(part) for est, part in zip(estimators, parts)]
        total = torch.stack(terms).sum(0)
        for est in estimators:
            est.commit(total)
        seen.append(estimators[0].noise_scale)
    return seen


def test_noise_scale_matches_a_hand_computation():
    # B_small 4, n_batches 2 -> B_big 8. Steps 1-2: G_small = (3,0) -> 9; G_big = mean((1,2),(3,0)) = (2,1) -> 5.
    #   |G|^2 = (8*5 - 4*9)/(8-4) = 1;  tr(S) = (9-5)/(1/4-1/8) = 32.  EMA (beta .99): both scaled alike -> 32.
    # Steps 3-4: G_small = (2,2) -> 8; G_big = mean((0,1),(2,2)) = (1,1.5) -> 3.25.
    #   |G|^2 = (26-32)/4 = -1.5;  tr(S) = (8-3.25)/0.125 = 38.
    #   ema_noise = .99*.01*1 + .01*-1.5 = -0.0051;  ema_scale = .99*.01*32 + .01*38 = 0.6968 -> -136.627...
    grads = [[1.0, 2.0], [3.0, 0.0], [0.0, 1.0], [2.0, 2.0]]
    seen = _run_noise_scale(grads)
    assert seen[0] is None
    assert seen[1:] == pytest.approx([32.0, 32.0, 0.6968 / -0.0051], rel=1e-12)
    # A step with a non-finite gradient is skipped entirely, as gpt-neox skips overflowed steps.
    with_overflow = grads[:1] + [[math.inf, 0.0]] + grads[1:]
    assert _run_noise_scale(with_overflow)[-1] == pytest.approx(0.6968 / -0.0051, rel=1e-12)
    # Ranks owning disjoint slices and adding their partial sums get the whole-vector numbers.
    assert _run_noise_scale(grads, split=1, cpu_offload=True)[1:] == pytest.approx(seen[1:], rel=1e-12)


def test_noise_scale_needs_two_batches():
    with pytest.raises(ConfigError, match="gradient_noise_scale_n_batches"):
        LogConfig(log_gradient_noise_scale=True, gradient_noise_scale_n_batches=1).validate()


# ---------------------------------------------------------------- per-parameter norms, one process

class _PlainEngine:
    """What the diagnostics use of a DeepSpeed engine (ZeRO 0, fp32): module, optimizer, _take_model_step."""

    def __init__(self, module, optimizer):
        self.module, self.optimizer = module, optimizer

    def _take_model_step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def test_per_parameter_norms_match_torch_linalg():
    from neox.model import GPTNeoX, causal_lm_loss
    from neox.train.diagnostics import build_diagnostics
    from neox.optim import param_groups
    from tests.distributed.diagnostics_checks import global_batches, model_cfg_for_unit

    torch.manual_seed(0)
    model = GPTNeoX(model_cfg_for_unit())
    optimizer = torch.optim.AdamW(param_groups(model.named_parameters(), 0.1), lr=1e-2)
    engine = _PlainEngine(model, optimizer)
    log = LogConfig(log_grad_norm=True, log_param_norm=True, log_grad_pct_zeros=True, log_optimizer_states=True)
    names = {id(p): n for n, p in model.named_parameters()}
    diagnostics = build_diagnostics(log, engine, types.SimpleNamespace(dp_rank=0, tp_rank=0), names, 4)
    for step, batch in enumerate(global_batches()[:2], start=1):
        causal_lm_loss(model(batch["tokens"], position_ids=batch["position_ids"]), batch["labels"],
                       batch["loss_mask"]).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        engine._take_model_step()  # the hook reads the gradients first
        record = diagnostics.after_step(step)
        assert record["iteration"] == step
        for name, param in model.named_parameters():
            g = grads[name]
            assert record[f"gradient_norms/{name}"] == pytest.approx(float(torch.linalg.vector_norm(g)), rel=1e-6)
            assert record[f"pct_grad_zeros/{name}"] == pytest.approx(100 * float((g == 0).sum()) / g.numel())
            assert record[f"parameter_norms/{name}"] == pytest.approx(float(torch.linalg.vector_norm(param.detach())), rel=1e-6)
            for key in ("exp_avg", "exp_avg_sq"):
                assert record[f"optimizer_state_norms/{name}_{key}"] == pytest.approx(
                    float(torch.linalg.vector_norm(optimizer.state[param][key])), rel=1e-6)
        assert len(record) == 1 + 5 * len(names)
    # Untied head, 64 tokens of 128: the rows of absent tokens have zero gradient.
    assert 0 < record["pct_grad_zeros/embedding.word_embeddings.weight"] < 100


# ---------------------------------------------------------------- sinks

def test_console_prints_training_lines_not_per_parameter_records():
    out = io.StringIO()
    console = ConsoleSink(out)
    console.write({"iteration": 3, "gradient_norms/head.weight": 0.5, "noise_scale": 7.0})
    console.write({"iteration": 3, "lm_loss": 2.0})
    assert out.getvalue() == "iteration 3 | lm_loss 2.0000\n"


def _run_file(sink: WandbSink) -> Path:
    # wandb keeps the directory of the first run a process starts (WANDB_DIR then): find the run by its own dir.
    (run_file,) = Path(sink.run.dir).parent.glob(f"run-{sink.run.id}.wandb")
    return run_file


def _wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline run's .wandb file (LevelDB-style log: 7-byte header, then chunks with
    crc32, length, type; a record is one FULL chunk or FIRST, MIDDLE..., LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, records, pending, pos, block = run_file.read_bytes(), [], b"", 7, 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):
            break  # a chunk still being written
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _finished_run_records(sink: WandbSink, timeout: float = 60.0) -> list:
    """The run's records once its exit record is written: wandb's service may still be writing the file after
    run.finish() returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(_run_file(sink))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"no exit record in {_run_file(sink)} after {timeout} s"
        time.sleep(0.1)


def test_wandb_offline_run_has_group_team_name_host_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = LogConfig(wandb_project="neox-test", wandb_group="ablations", wandb_team="my-team",
                    wandb_run_name="run-7", wandb_host="https://wandb.example.org", git_hash="abc1234")
    sinks = sinks_for_run(log, rank=0, run_name="unused", run_config={"hidden_size": 64}, iteration=0)
    (wandb_sink,) = [s for s in sinks._sinks if isinstance(s, WandbSink)]
    assert wandb_sink.run.settings.base_url == "https://wandb.example.org"
    sinks.write({"iteration": 1, "gradient_norms/head.weight": 0.25, "noise_scale": 12.5})
    sinks.close()
    records = _finished_run_records(wandb_sink)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.run_group, run.entity, run.display_name) == ("neox-test", "ablations", "my-team", "run-7")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["hidden_size"] == 64 and config["git_hash"] == "abc1234"
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    assert any(h.get("gradient_norms/head.weight") == 0.25 and h.get("noise_scale") == 12.5 and h["_step"] == 1
               for h in history)


def test_wandb_init_all_ranks_gives_other_ranks_a_run_in_the_shared_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert shared_wandb_group(LogConfig(wandb_group="mine", wandb_init_all_ranks=True)) == "mine"
    assert shared_wandb_group(LogConfig()) is None
    log = LogConfig(wandb_init_all_ranks=True, wandb_run_name="tiny")
    group = shared_wandb_group(log)  # one world: rank 0's draw, nothing to broadcast
    assert group.startswith("neox_")
    assert sinks_for_run(LogConfig(), rank=1, run_name="x", run_config={}, iteration=0) is None
    sinks = sinks_for_run(log, rank=1, run_name="x", run_config={"hidden_size": 64}, iteration=0, wandb_group=group)
    (wandb_sink,) = sinks._sinks
    sinks.write({"iteration": 1, "lm_loss": 2.0})  # rank 0's run gets the metrics, not this one
    sinks.close()
    records = _finished_run_records(wandb_sink)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_group, run.display_name) == (group, "tiny-rank1")
    assert json.loads({i.key: i.value_json for i in run.config.update}["rank"]) == 1
    history_keys = {i.key for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item}
    assert "lm_loss" not in history_keys


@pytest.mark.parametrize("use_wandb,environ,netrc_host,on", [
    (None, {}, None, False),                                   # gpt-neox: no credentials, no wandb
    (True, {}, None, False),                                   # even when asked for (one line says so)
    (None, {"WANDB_API_KEY": "k"}, None, True),                # a key turns it on by default
    (None, {"WANDB_MODE": "offline"}, None, True),             # offline runs need no key
    (None, {}, "api.wandb.ai", True),                          # `wandb login` wrote ~/.netrc
    (None, {}, "other.host", False),                           # ... for another host
    (False, {"WANDB_API_KEY": "k"}, None, False),              # false always wins
])
def test_wandb_is_on_as_gpt_neox_decides(tmp_path, use_wandb, environ, netrc_host, on):
    env = {"HOME": str(tmp_path), **environ}
    if netrc_host:
        (tmp_path / ".netrc").write_text(f"machine {netrc_host}\n  login user\n  password secret\n")
    log = LogConfig(use_wandb=use_wandb)
    assert log.active_wandb_project(env) == ("neox" if on else None)


def test_comet_offline_archive_has_metrics_name_tags_others(tmp_path, monkeypatch):
    monkeypatch.setenv("COMET_START_ONLINE", "false")
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(tmp_path / "comet"))
    for what in ("ENV_DETAILS", "GIT_METADATA", "GIT_PATCH", "CODE", "ENV_CPU", "ENV_HOST", "ENV_GPU", "DEPENDENCIES",
                 "OS_PACKAGES"):  # Comet's environment snapshot: seconds of archiving this test does not need
        monkeypatch.setenv(f"COMET_AUTO_LOG_{what}", "false")
    log = LogConfig(use_comet=True, use_wandb=False, comet_workspace="ws", comet_project="proj",
                    comet_experiment_name="exp-1", comet_tags=["pythia", "ablation"],
                    comet_others={"cluster": "cpu"}, log_dir=str(tmp_path / "logs"))
    sinks = sinks_for_run(log, rank=0, run_name="unused", run_config={"hidden_size": 64}, iteration=0)
    sinks.write({"iteration": 1, "lm_loss": 3.5, "parameter_norms/head.weight": 2.0})
    sinks.write({"iteration": 2, "lm_loss": 3.0})
    sinks.close()
    (archive,) = (tmp_path / "comet").glob("*.zip")
    with zipfile.ZipFile(archive) as z:
        experiment = json.loads(z.read("experiment.json"))
        messages = [json.loads(line) for line in z.read("messages.json").decode().splitlines()]
    assert (experiment["workspace"], experiment["project_name"]) == ("ws", "proj")
    assert sorted(experiment["tags"]) == ["ablation", "pythia"]
    others = {m["payload"]["key"]: m["payload"]["value"] for m in messages if m["type"] == "log_other"}
    git = subprocess.run(["git", "describe", "--always"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    assert others["Name"] == "exp-1" and others["cluster"] == "cpu" and others["git_hash"] == git
    metrics = {(m["payload"]["metric"]["metricName"], m["payload"]["metric"]["step"]): m["payload"]["metric"]["metricValue"]
               for m in messages if m["type"] == "metric_msg"}
    assert metrics[("lm_loss", 1)] == 3.5 and metrics[("lm_loss", 2)] == 3.0
    assert metrics[("parameter_norms/head.weight", 1)] == 2.0
    params = {m["payload"]["param"]["paramName"]: m["payload"]["param"]["paramValue"] for m in messages
              if m["type"] == "parameter_msg"}
    assert params["hidden_size"] == 64
    # The git hash also opens metrics.jsonl.
    first = json.loads((tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()[0])
    assert first == {"iteration": 0, "git_hash": git}


# ---------------------------------------------------------------- profiling

def _train_steps(profiler, steps: range) -> None:
    x = torch.randn(64, 64)
    for k in steps:
        with profiler.step(k):
            (x @ x).relu().sum()


def test_profile_trace_covers_exactly_the_window(tmp_path):
    log = LogConfig(profile=True, profile_step_start=2, profile_step_stop=4, memory_profiling=True,
                    log_dir=str(tmp_path))
    profiler = build_step_profiler(log, rank=3, device=torch.device("cpu"), run_dir=tmp_path / "unused")
    _train_steps(profiler, range(6))
    trace = json.loads((tmp_path / "profile" / "rank3.trace.json").read_text())
    steps = sorted(e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("train_step#"))
    assert steps == ["train_step#2", "train_step#3"]
    assert any(e.get("cat") == "cpu_op" for e in trace["traceEvents"])
    memory = json.loads((tmp_path / "memory" / "cpu_memory.rank3.json").read_text())
    assert memory["device"] == "cpu" and "no CUDA-style allocator history" in memory["recorded"]
    assert [s["step"] for s in memory["steps"]] == [2, 3]
    for s in memory["steps"]:
        assert s["rss_bytes_start"] > 0 and s["peak_rss_bytes"] > 0
        assert s["torch_cpu_allocated_peak_bytes"] >= 64 * 64 * 4  # the step's matmul output


def test_profile_window_cut_short_by_the_end_of_training(tmp_path):
    log = LogConfig(profile=True, profile_step_start=1, profile_step_stop=10, tensorboard_dir=str(tmp_path / "tb"))
    profiler = build_step_profiler(log, rank=0, device=torch.device("cpu"), run_dir=tmp_path)
    _train_steps(profiler, range(3))  # training ends at step 2: close() writes what ran
    assert profiler.close() == [f"profile: torch.profiler trace of steps 1..2 -> {tmp_path / 'tb/profile/rank0.trace.json'}"]
    trace = json.loads((tmp_path / "tb" / "profile" / "rank0.trace.json").read_text())
    assert sorted(e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("train_step#")) == \
        ["train_step#1", "train_step#2"]


def test_memory_profiling_alone_writes_no_trace(tmp_path):
    log = LogConfig(memory_profiling=True, profile_step_start=0, profile_step_stop=1,
                    memory_profiling_path=str(tmp_path / "mem"))
    profiler = build_step_profiler(log, rank=0, device=torch.device("cpu"), run_dir=tmp_path)
    _train_steps(profiler, range(2))
    assert [p.name for p in (tmp_path / "mem").iterdir()] == ["cpu_memory.rank0.json"]
    assert not (tmp_path / "profile").exists()


@pytest.mark.parametrize("keys,message", [
    ({"profile": True, "profile_step_start": 5, "profile_step_stop": 5}, "0 <= start < stop"),
    ({"memory_profiling": True, "profile_step_start": -1}, "0 <= start < stop"),
    ({"wandb_host": "api.wandb.ai"}, "wandb_host"),
    ({"comet_tags": ["ok", 3]}, "comet_tags"),
])
def test_bad_logging_values_are_config_errors(keys, message):
    with pytest.raises(ConfigError, match=message):
        LogConfig(**keys).validate()

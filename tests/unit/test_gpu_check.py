"""tools/gpu_check.sh on a machine without a GPU: it refuses (exit 2) before doing anything, and its plumbing works:
arguments, check selection with prerequisites, time limits (launches killed with their children), the table and
JSON, the MFU arithmetic against the datasheet, and a real stand-in run of two checks on the CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from launcher import deepy
from neox.config import ConfigError, load_config
from tests.conftest import REPO_ROOT
from tools.gpu_check import cli
from tools.gpu_check.checks import BUDGET_S, CHECKS, datasheet_peak, mfu_verdict
from tools.gpu_check.report import STANDIN_BANNER, Figure, Report, Row, render_table, to_json
from tools.gpu_check.runner import Check, CheckTimeout, Context, Result, Skip, run_checks, with_prerequisites
from tools.gpu_check.workspace import OFFLINE_ENV, Workspace, WorkspaceError

SCRIPT = REPO_ROOT / "tools" / "gpu_check.sh"
START_UP_RESERVE_S = 20  # Python, torch and the GPU gate before the first check starts


def test_without_a_gpu_it_says_so_exits_2_and_runs_nothing(tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = subprocess.run(["bash", str(SCRIPT), "--work-dir", str(work)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert "needs a machine with a CUDA GPU" in result.stderr and "Nothing was run" in result.stderr
    assert result.stdout == "" and not work.exists()


def test_the_limits_add_up_to_less_than_eight_minutes() -> None:
    assert BUDGET_S == sum(c.limit_s for c in CHECKS) <= 8 * 60 - START_UP_RESERVE_S
    assert [c.name for c in CHECKS] == ["train_bf16", "fp16", "two_ranks_refused", "flash_sdpa", "export_logits",
                                        "generate", "eval_piqa"]


def test_arguments_and_check_selection(capsys) -> None:
    parser = cli.build_parser()
    args = parser.parse_args([])
    assert args.checks == [c.name for c in CHECKS] and args.device == "cuda" and args.json is None
    args = parser.parse_args(["--checks", "generate", "flash_sdpa", "--json", "-", "--peak-tflops", "150"])
    assert args.peak_tflops == 150.0
    # prerequisites join, in the registry's order, whatever order they were asked in
    assert [c.name for c in with_prerequisites(CHECKS, args.checks)] == [
        "train_bf16", "flash_sdpa", "export_logits", "generate"]
    with pytest.raises(SystemExit) as bad:
        parser.parse_args(["--checks", "train"])
    assert bad.value.code == 2
    assert "invalid choice: 'train'" in capsys.readouterr().err
    assert cli.main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == len(CHECKS) and listed[0].split()[:3] == ["train_bf16", "120", "s"]
    assert "(needs train_bf16, export_logits)" in listed[-1]


def test_one_gpu_is_pinned_for_every_launch() -> None:
    env: dict[str, str] = {}
    assert cli.pin_one_gpu(env) == "0" and env["CUDA_VISIBLE_DEVICES"] == "0"
    env = {"CUDA_VISIBLE_DEVICES": "3,1"}
    assert cli.pin_one_gpu(env) == "3" and env["CUDA_VISIBLE_DEVICES"] == "3"
    env = {"CUDA_VISIBLE_DEVICES": ""}  # the user hid every GPU: the gate will refuse
    assert cli.pin_one_gpu(env) == "" and env["CUDA_VISIBLE_DEVICES"] == ""


def _report(standin: bool, statuses: tuple[str, ...]) -> Report:
    rows = [Row("train_bf16", "125M bf16 ZeRO-1, 20 steps", statuses[0], 48.2, 120,
                [Figure("tokens/s", 152340.4), Figure("MFU of 312 TFLOP/s", 0.3531, "%")], "loss 10.95 -> 7.41"),
            Row("flash_sdpa", "flash SDPA chosen (bf16)", statuses[1], 3.0, 30,
                [Figure("kernel", "aten::_scaled_dot_product_flash_attention")]),
            Row("fp16", "125M fp16 dynamic loss scale, 10 steps", statuses[2], 0.0, 75, [], "needs CUDA")]
    return Report(rows, {"device": "NVIDIA A100-SXM4-80GB (80 GiB)", "torch": "2.5.1", "cuda": "12.4",
                         "work_dir": "runs/gpu_check"}, standin, 225)


def test_table_and_json() -> None:
    report = _report(False, ("PASS", "PASS", "FAIL"))
    table = render_table(report)
    lines = table.splitlines()
    assert lines[0].startswith("neox GPU check: NVIDIA A100-SXM4-80GB") and "CUDA 12.4" in lines[0]
    header = next(i for i, ln in enumerate(lines) if ln.startswith("check"))
    assert lines[header].split() == ["check", "result", "time", "/", "limit", "figures"]
    first = lines[header + 2]
    assert first.split()[:7] == ["125M", "bf16", "ZeRO-1,", "20", "steps", "PASS", "48s"]
    assert first.endswith("tokens/s 152,340 · MFU of 312 TFLOP/s 35.3%")
    assert lines[header + 3] == "    loss 10.95 -> 7.41"
    assert lines[header + 4].index("PASS") == first.index("PASS")  # columns line up
    assert lines[-1] == "3 checks: 2 passed, 1 failed, 0 skipped in 51 s (budget 225 s) -> FAIL"
    assert STANDIN_BANNER not in table and not report.passed
    document = json.loads(to_json(report))
    assert document["passed"] is False and document["standin"] is False and document["budget_s"] == 225
    assert document["rows"][0]["figures"][1] == {"name": "MFU of 312 TFLOP/s", "value": 0.3531, "unit": "%"}
    assert [r["status"] for r in document["rows"]] == ["PASS", "PASS", "FAIL"]

    # a GPU run must not skip anything; the CPU stand-in may skip the GPU-only checks, and says what it is
    assert not _report(False, ("PASS", "PASS", "SKIP")).passed
    standin = _report(True, ("PASS", "PASS", "SKIP"))
    assert standin.passed and render_table(standin).splitlines()[0] == STANDIN_BANNER
    assert render_table(standin).endswith("-> PASS (stand-in, not a GPU result)")
    assert json.loads(to_json(standin))["note"] == STANDIN_BANNER


def test_mfu_is_taken_against_the_datasheet_and_the_run_must_agree() -> None:
    peak, where = datasheet_peak("NVIDIA A100-SXM4-80GB", "bfloat16")
    assert peak == 312e12 and where == "A100-80GB bfloat16 datasheet"
    assert datasheet_peak("NVIDIA L4", "bfloat16", peak_tflops=121) == (121e12, "--peak-tflops")
    missing, why = datasheet_peak("NVIDIA L4", "bfloat16")
    assert missing is None and "'NVIDIA L4'" in why and "neox/train/accelerators.py" in why and "--peak-tflops" in why
    assert datasheet_peak("Tesla V100-SXM2-32GB", "bfloat16")[0] is None  # V100 has no bf16

    source = "datasheet: NVIDIA A100-SXM4-80GB (A100-80GB) bfloat16 312 TFLOP/s dense"
    figures, problems = mfu_verdict(109.2, 0.35, source, 312e12, where)
    assert problems == [] and figures[0].value == pytest.approx(0.35) and figures[0].unit == "%"
    _, problems = mfu_verdict(109.2, 0.40, source, 312e12, where)  # the run divided by another peak
    assert problems == ["the run logs MFU 40.00% but its TFLOP/s give 35.00% (" + source + ")"]
    _, problems = mfu_verdict(109.2, 0.9, "measured: bfloat16 matmul probe 1024x1024, 0.5 s", 312e12, where)
    assert "not the datasheet's" in problems[0]
    assert mfu_verdict(109.2, 0.35, source, None, why) == ([], [why])


def _check(name: str, run, limit: float = 5, needs: tuple[str, ...] = ()) -> Check:
    return Check(name, name.replace("_", " "), limit, run, needs)


def test_runner_limits_errors_skips_and_prerequisites(tmp_path: Path) -> None:
    def sleeps(ctx: Context) -> Result:
        time.sleep(30)
        return Result(True)

    def crashes(ctx: Context) -> Result:
        raise ValueError("the export has no config.json")

    def skips(ctx: Context) -> Result:
        raise Skip("needs CUDA")

    def passes(ctx: Context) -> Result:
        return Result(True, [Figure("tokens/s", 1.0)], "fine")

    checks = [_check("slow", sleeps, limit=1), _check("crash", crashes), _check("skip", skips),
              _check("fine", passes), _check("after_crash", passes, needs=("crash", "fine"))]
    seen: list[str] = []
    start = time.monotonic()
    handler = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    outer = signal.setitimer(signal.ITIMER_REAL, 100)  # pytest-timeout's, or our stand-in for it
    try:
        rows = run_checks(checks, Context("cpu", None), on_row=lambda row: seen.append(row.name))
        assert 90 < signal.getitimer(signal.ITIMER_REAL)[0] < 100  # the outer timer is back, less the time used
    finally:
        signal.setitimer(signal.ITIMER_REAL, *outer)
        signal.signal(signal.SIGALRM, handler)
    assert time.monotonic() - start < 5
    assert seen == [c.name for c in checks]
    assert [r.status for r in rows] == ["FAIL", "FAIL", "SKIP", "PASS", "FAIL"]
    assert rows[0].detail == "exceeded its 1 s limit and was stopped" and 1 <= rows[0].seconds < 3
    assert rows[1].detail == "ValueError: the export has no config.json" and "crashes" in rows[1].traceback
    assert rows[2].detail == "needs CUDA" and rows[3].figures == [Figure("tokens/s", 1.0)]
    assert rows[4].detail == "not run: it needs crash, which did not pass"


def test_a_launch_past_its_limit_is_killed_with_its_children(tmp_path: Path) -> None:
    work = Workspace.fresh(tmp_path / "work", standin=True)
    ctx = Context("cpu", work)
    ctx.deadline = time.monotonic() + 3.5  # the launch gets a second less: the check must still report
    pid_file = tmp_path / "grandchild.pid"
    with pytest.raises(CheckTimeout):
        work.run(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], ctx, "sleeper")
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # the kill is sent; the process may take a moment to be reaped by init
        if not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the launch's child {grandchild} survived the time limit")
    assert "time limit ran out" in (work.root / "logs" / "sleeper.log").read_text()

    ctx.deadline = time.monotonic() + 30
    done = work.run(["bash", "-c", "echo out; echo err >&2; exit 3"], ctx, "quick")
    assert (done.code, done.stdout, done.stderr) == (3, "out\n", "err\n")
    assert "(exit 3)" in done.log.read_text()


def test_the_work_dir_is_cleared_only_if_it_is_ours(tmp_path: Path) -> None:
    first = Workspace.fresh(tmp_path / "w", standin=False)
    (first.dir("train_bf16") / "old").write_text("x")
    again = Workspace.fresh(tmp_path / "w", standin=False)
    assert not (again.root / "train_bf16").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(WorkspaceError, match="not an earlier GPU check's work directory"):
        Workspace.fresh(tmp_path / "mine", standin=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_deepy_refuses_more_ranks_than_this_machine_has_gpus(tmp_path: Path) -> None:
    """What the two_ranks_refused row checks on the GPU: with num_gpus set the config is derived without counting
    GPUs, so the launch must compare it with the GPUs it counted (before: DeepSpeed started both ranks on one GPU)."""
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
                                    "max_position_embeddings": 64, "train_micro_batch_size_per_gpu": 2,
                                    "num_gpus": 2}))
    cfg = load_config([path])
    with pytest.raises(ConfigError, match=r"'num_gpus' is 2 but this machine has 1 GPU\(s\)"):
        deepy.check_launch_size(cfg, local_gpus=1)
    deepy.check_launch_size(cfg, local_gpus=2)
    deepy.check_launch_size(cfg, local_gpus=0)  # CPU ranks: as many as asked


def test_cpu_stand_in_run_of_two_checks(tmp_path: Path, capsys, monkeypatch) -> None:
    """The real check functions on tiny stand-ins: flash attention on the CPU (its flash kernel) and the fp16 row,
    which the CPU skips. Not a GPU result, and the table and JSON say so."""
    for key, value in OFFLINE_ENV.items():  # main() sets them for the whole process: undone after the test
        monkeypatch.setenv(key, value)
    out = tmp_path / "result.json"
    code = cli.main(["--device", "cpu", "--checks", "flash_sdpa", "fp16", "--work-dir", str(tmp_path / "work"),
                     "--json", str(out)])
    table = capsys.readouterr().out
    assert code == 0, table
    assert table.splitlines()[0] == STANDIN_BANNER
    document = json.loads(out.read_text())
    assert document["standin"] is True and document["environment"]["device"] == "CPU (stand-in)"
    fp16, flash = document["rows"]  # the registry's order
    assert fp16["name"] == "fp16" and fp16["status"] == "SKIP" and "needs CUDA" in fp16["detail"]
    assert flash["status"] == "PASS", flash
    assert flash["figures"][0]["value"] == "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert "_backward" in flash["detail"] and "q [2, 4, 128, 16] bf16" in flash["detail"]
    assert (tmp_path / "work" / "data" / "kjv_text_document.bin").stat().st_size > 1_000_000

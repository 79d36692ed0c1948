"""`deepy plan`: its memory estimate against the peak RSS of real training runs, and the 20B plan.

The measured peak is the largest resident-set high-water mark among the processes a `deepy train` launch starts
(DeepSpeed's per-node launcher, the ranks, their data-loader workers): getrusage(RUSAGE_CHILDREN).ru_maxrss of a
fresh wrapper process that runs deepy in-process, so nothing else it ever started is counted. The ranks are the
largest of those processes, so it is one rank's peak, not a sum over ranks.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.deepy import resolve
from neox.plan.cli import resolve_for_plan
from neox.plan.plan import PlanOptions, build_plan
from tests.conftest import NEOX20B_TOKENIZER, REPO_ROOT
from tests.e2e.train_helpers import DEEPY, free_port, preprocess_kjv

CONFIGS = REPO_ROOT / "configs"
TOLERANCE = 0.20
PAPER_20B_PARAMS = 20_554_567_680  # GPT-NeoX-20B paper (Black et al. 2022), table of the model's shape
# deepy in-process, then the high-water mark of everything it started (children are waited for by then).
RUSAGE_WRAPPER = (
    "import resource, sys\n"
    "from launcher import deepy\n"
    "code = deepy.main(sys.argv[1:])\n"
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)\n"
    "sys.exit(code)\n"
)

RUNS = {
    "tiny-1rank-zero2": (["tiny.yml", "cpu.yml"], ["--num_gpus", "1", "--train_iters", "4"]),
    "tiny-2ranks-zero2": (["tiny.yml", "cpu.yml"], ["--num_gpus", "2", "--train_iters", "4"]),
    # cpu.yml's ZeRO-2 over one rank: the fp32 master partition and the reduce bucket are all there.
    "70M-1rank-zero2": (["70M.yml", "cpu.yml"], ["--num_gpus", "1", "--train_iters", "2",
                                                 "--padded_vocab_size", "50304"]),
}


@pytest.fixture(scope="module")
def kjv_char_data(tmp_path_factory) -> Path:
    return preprocess_kjv(tmp_path_factory.mktemp("plan-data"))


def run_overrides(data_path: Path, extra: list[str]) -> list[str]:
    # Char-level tokens of the bundled KJV corpus; one evaluation batch so validation and test run too.
    return ["--data_path", str(data_path), "--tokenizer_type", "CharLevelTokenizer", "--vocab_file", "null",
            "--eval_iters", "1", "--eval_interval", "1000", *extra]


def measured_peak_rss(run_dir: Path, files: list[str], overrides: list[str]) -> int:
    argv = [sys.executable, "-c", RUSAGE_WRAPPER, "train", *[str(CONFIGS / f) for f in files], *overrides,
            "--master_port", str(free_port()), "--save", str(run_dir / "ckpt"), "--log_dir", str(run_dir / "logs")]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (run_dir / "ckpt" / "latest").is_file()  # it trained and saved, the save's peak included
    return int(re.search(r"PEAK_RSS_KB (\d+)", result.stdout).group(1)) * 1024


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_memory_estimate_within_20_percent_of_measured_peak_rss(name, kjv_char_data, tmp_path):
    files, extra = RUNS[name]
    overrides = run_overrides(kjv_char_data, extra)
    cfg = resolve([str(CONFIGS / f) for f in files], overrides, None, need_vocab=False)
    plan = build_plan(cfg, PlanOptions())  # baseline measured by the probe, peak measured by the matmul probe
    estimate = plan.largest.peak
    measured = measured_peak_rss(tmp_path, files, overrides)
    error = (estimate - measured) / measured
    print(f"{name}: estimate {estimate / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB ({error:+.1%}); "
          f"framework {plan.baseline.bytes / 2**20:.0f} MiB")
    assert abs(error) <= TOLERANCE, (name, estimate, measured)
    # The model terms matter: the estimate without them would miss the 70M run by far more than the tolerance.
    if name.startswith("70M"):
        assert (plan.baseline.bytes - measured) / measured < -0.5


def deepy_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEEPY), "plan", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


TWENTY_B = ["-d", "configs", "20B.yml", "--vocab_file", str(NEOX20B_TOKENIZER), "--num_gpus", "8", "--nodes", "12",
            "--accelerator", "A100-40GB"]


def test_20b_plan_on_96_a100_40gb():
    result = deepy_plan(*TWENTY_B)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    total = int(re.search(r"parameters\s+([\d,]+) total", out).group(1).replace(",", ""))
    assert total == PAPER_20B_PARAMS and abs(total - 20.5e9) / 20.5e9 < 0.01
    assert "world 96 = 12 node(s) x 8 rank(s) on A100-40GB; dp 12 x tp 2 x pp 4; ZeRO stage 1; fp16" in out
    assert "global batch 1536 sequences x 2048 tokens = 3,145,728 tokens/step" in out
    assert re.search(r"largest rank: stage \d, [\d.]+ GiB .* of 40.00 GiB \(A100-40GB device memory\): fits", out)
    assert "312.00 TFLOP/s per rank: A100-40GB fp16 (" in out


def test_20b_plan_numbers():
    cfg = resolve_for_plan(["20B.yml"], ["--vocab_file", str(NEOX20B_TOKENIZER), "--num_gpus", "8"],
                           str(CONFIGS), lambda f, o, d: resolve(f, o, d, need_vocab=False), nodes=12)
    plan = build_plan(cfg, PlanOptions(accelerator="A100-40GB", mfu=0.4))
    assert cfg.model.padded_vocab_size == 50432  # the paper's padded vocabulary
    assert sum(s.blocks for s in plan.params.stages) == 44
    thr = plan.throughput
    # 6N + 12 L h s per token over 1536 x 2048 tokens, at 40% of 96 x 312 TFLOP/s.
    assert thr.step_time_s == pytest.approx(thr.model_flops_per_step / (96 * 312e12 * 0.4))
    assert thr.tokens_per_s == pytest.approx(1536 * 2048 / thr.step_time_s)


@pytest.mark.parametrize("args, message", [
    (["--accelerator", "Z80", "--num_gpus", "8"], "unknown --accelerator 'Z80'"),
    (["--mfu", "1.5", "--num_gpus", "8"], "--mfu is a fraction"),
    (["--nodes", "2"], "--nodes needs 'num_gpus'"),
    (["--nodes", "2", "--num_gpus", "3"], "world size 6"),
])
def test_bad_plan_options_exit_2_with_one_paragraph(args, message):
    result = deepy_plan("-d", "configs", "20B.yml", "--vocab_file", str(NEOX20B_TOKENIZER), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_fp16_plan_for_this_cpu_asks_for_the_accelerator():
    result = deepy_plan("-d", "configs", "20B.yml", "--vocab_file", str(NEOX20B_TOKENIZER), "--num_gpus", "8",
                        "--nodes", "12")
    assert result.returncode == 2
    assert "--accelerator" in result.stderr and "Traceback" not in result.stderr


def test_plan_without_a_vocabulary_says_how_to_give_one():
    result = deepy_plan("-d", "configs", "20B.yml", "--accelerator", "A100-40GB", "--num_gpus", "8", "--nodes", "12")
    assert result.returncode == 2
    assert "--vocab_file" in result.stderr and "Traceback" not in result.stderr


def test_cpu_plan_with_stated_baseline_and_configured_peak():
    result = deepy_plan("-d", "configs", "tiny.yml", "cpu.yml", "--tokenizer_type", "CharLevelTokenizer",
                        "--baseline_mb", "300", "--peak_flops", "1e10", "--mfu", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "framework: 0.29 GiB, given by --baseline_mb" in out
    assert "10.00 GFLOP/s per rank: 'peak_flops' from the config (command line)" in out
    assert "world 2 = 1 node(s) x 2 rank(s) on CPU (this machine); dp 2 x tp 1 x pp 1; ZeRO stage 2; fp32" in out
    flops_per_step = float(re.search(r"= ([\d.]+) GFLOP/step", out).group(1)) * 1e9
    step = float(re.search(r"estimate\s+step ([\d.]+) s", out).group(1))
    assert step == pytest.approx(flops_per_step / (2 * 1e10 * 0.5), rel=0.01)

"""Command line of tools/gpu_check.sh: pick the checks, require a CUDA GPU, run, print the table (and JSON).

Exit codes: 0 every check passed, 1 a check failed, 2 no CUDA GPU here (nothing was run) or bad arguments.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path

from tools.gpu_check.checks import CHECKS
from tools.gpu_check.report import Report, Row, render_table, to_json
from tools.gpu_check.runner import Context, run_checks, with_prerequisites
from tools.gpu_check.workspace import OFFLINE_ENV, REPO, Workspace, WorkspaceError

NO_GPU_EXIT = 2


def build_parser() -> argparse.ArgumentParser:
    names = [c.name for c in CHECKS]
    parser = argparse.ArgumentParser(
        prog="tools/gpu_check.sh",
        description="Run neox's GPU paths on a machine with one CUDA GPU and print a pass/fail table with figures. "
        f"All checks take at most {sum(c.limit_s for c in CHECKS):.0f} s together.",
        epilog="Checks and their time limits: " + ", ".join(f"{c.name} ({c.limit_s:.0f} s)" for c in CHECKS)
        + ". Selecting a check also runs the checks it needs (generate needs train_bf16 and export_logits).")
    parser.add_argument("--checks", nargs="+", choices=names, default=names, metavar="NAME",
                        help=f"run only these (default: all): {', '.join(names)}")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE ('-': print the JSON "
                        "instead of the table)")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "gpu_check",
                        help="where data, checkpoints, the export and every launch's log go; an earlier GPU "
                        "check's is cleared (default: runs/gpu_check)")
    parser.add_argument("--peak-tflops", type=float, metavar="T",
                        help="the GPU's dense bf16 peak in TFLOP/s, for a GPU neox/train/accelerators.py does not "
                        "list (the MFU denominator; also given to the training run as peak_flops)")
    parser.add_argument("--list", action="store_true", help="list the checks with their time limits and exit")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: tests this tool's plumbing with tiny stand-in workloads on the CPU (the unit test "
                        "uses it); its figures are not a GPU result")
    return parser


def pin_one_gpu(environ: MutableMapping[str, str]) -> str:
    """Make the first visible GPU the only one this process and deepy see (the checks are for one GPU; DeepSpeed
    gives a one-rank launch the machine's GPU 0 whatever is visible). Must run before torch initialises CUDA;
    CUDA_VISIBLE_DEVICES="" (no GPU) stays as it is."""
    first = environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    environ["CUDA_VISIBLE_DEVICES"] = first
    return first


def gpu_gate() -> str | None:
    """None when a CUDA GPU is usable here, else the message to print."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= 1:
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"gpu_check: needs a machine with a CUDA GPU, and torch {torch.__version__} ({build}) sees none "
            "(torch.cuda.is_available() is False). Nothing was run.")


def environment(device: str, work: Path, environ: Mapping[str, str]) -> dict:
    import torch

    env = {"torch": torch.__version__, "work_dir": str(work), "git": _git_describe()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device=f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, "
                          f"CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES')})",
                   cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
    else:
        env["device"] = "CPU (stand-in)"
    return env


def _git_describe() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def _progress(total: int):
    done: list[Row] = []

    def say(row: Row) -> None:
        done.append(row)
        print(f"[{len(done)}/{total}] {row.name}: {row.status} in {row.seconds:.0f} s", file=sys.stderr, flush=True)
    return say


def main(argv: Sequence[str] | None = None, environ: MutableMapping[str, str] = os.environ) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for check in CHECKS:
            needs = f" (needs {', '.join(check.needs)})" if check.needs else ""
            print(f"{check.name:<18} {check.limit_s:>4.0f} s  {check.title}{needs}")
        return 0
    if args.device == "cuda":
        pin_one_gpu(environ)
        refusal = gpu_gate()
        if refusal is not None:
            print(refusal, file=sys.stderr)
            return NO_GPU_EXIT
    environ.update(OFFLINE_ENV)  # before transformers or lm_eval are imported: they read it once
    checks = with_prerequisites(CHECKS, args.checks)
    try:
        work = Workspace.fresh(args.work_dir, standin=args.device != "cuda")
    except WorkspaceError as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 2
    budget = sum(c.limit_s for c in checks)
    print(f"gpu_check: {len(checks)} checks ({', '.join(c.name for c in checks)}), at most {budget:.0f} s; "
          f"logs in {work.root / 'logs'}", file=sys.stderr, flush=True)
    ctx = Context(device=args.device, work=work, options={"peak_tflops": args.peak_tflops})
    rows = run_checks(checks, ctx, on_row=_progress(len(checks)))
    report = Report(rows, environment(args.device, work.root, environ), ctx.standin, budget)
    if args.json == "-":
        print(to_json(report))
    else:
        print(render_table(report))
        if args.json:
            Path(args.json).write_text(to_json(report) + "\n")
    return 0 if report.passed else 1

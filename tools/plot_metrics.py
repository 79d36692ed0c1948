"""Plot a run's metrics.jsonl (training loss, validation loss, lr) to a PNG.

usage: python tools/plot_metrics.py RUN_LOG_DIR_or_metrics.jsonl [--output loss.png] [--keys lm_loss valid_loss]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class PlotError(ValueError):
    pass


def read_metrics(path: Path) -> list[dict]:
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: no such metrics file (expected the metrics.jsonl a training run writes in log_dir)")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PlotError(f"{path}:{line_no}: not a JSON object ({err.msg})") from None
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["iteration"], r[key]) for r in records if r.get(key) is not None and "iteration" in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot(records: list[dict], keys: list[str], output: Path, title: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = []
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    for key in keys:
        xs, ys = series(records, key)
        if xs:
            ax_loss.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
            plotted.append(key)
    if not plotted:
        plt.close(fig)
        raise PlotError(f"none of {keys} appears in the metrics; keys present: "
                        f"{sorted({k for r in records for k in r})}")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(title)
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    xs, ys = series(records, "lr")
    ax_lr.plot(xs, ys, color="tab:gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.tmp{output.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(output)
    return plotted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="a run's log_dir or its metrics.jsonl")
    parser.add_argument("--output", type=Path, default=None, help="PNG path (default: next to the metrics, loss.png)")
    parser.add_argument("--keys", nargs="+", default=["lm_loss", "valid_loss"])
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        records = read_metrics(args.metrics)
        base = args.metrics if args.metrics.is_dir() else args.metrics.parent
        output = args.output or base / "loss.png"
        plotted = plot(records, args.keys, output, args.title or str(base))
    except PlotError as err:
        print(f"plot_metrics: {err}", file=sys.stderr)
        return 2
    print(f"wrote {output} ({', '.join(plotted)}; {len(records)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

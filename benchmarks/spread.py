"""What every benchmark here reports of repeated timings: the median and its spread (quartiles, min, max), never the
fastest run alone; and how it writes its JSON."""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path


def summary(values: list[float], digits: int = 6) -> dict:
    """Median, quartiles (inclusive method: within the observed range), interquartile range, min, max, count."""
    if not values:
        raise ValueError("no timings to summarise")
    if len(values) > 1:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {"median": round(statistics.median(values), digits), "q1": round(q1, digits), "q3": round(q3, digits),
            "iqr": round(q3 - q1, digits), "min": round(min(values), digits), "max": round(max(values), digits),
            "n": len(values)}


def write_json(result: dict, output: Path | None) -> None:
    """To `output` (atomically: a reader never sees half a file) or to stdout."""
    text = json.dumps(result, indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, output)
    print(f"wrote {output}", file=sys.stderr)

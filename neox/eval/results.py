"""The results of one eval launch: a JSON file in log_dir (written atomically) and tables for the console."""
from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neox.eval.perplexity import Perplexity


def results_path(directory: str | Path, prefix: str, now: datetime.datetime | None = None) -> Path:
    stamp = (now or datetime.datetime.now()).strftime("%Y-%m-%dT%H-%M-%S")
    name = f"{prefix}_eval_results_{stamp}.json" if prefix else f"eval_results_{stamp}.json"
    return Path(directory) / name


def _jsonable(value: Any) -> Any:
    # lm_eval's results hold numpy numbers, sets and the odd callable in task configs.
    from lm_eval.utils import handle_non_serializable

    return handle_non_serializable(value)


def write_results(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, default=_jsonable, ensure_ascii=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def perplexity_table(rows: Sequence[Perplexity]) -> str:
    chars = any(r.char_level_perplexity is not None for r in rows)  # char_level_ppl adds a column
    header = "|  source  | windows |  tokens  |  loss  | perplexity |" + (" char ppl |" if chars else "") + " data"
    lines = [header, "|" + "-" * (len(header) - 1)]
    for r in rows:
        char_cell = ""
        if chars:
            char_cell = f" {r.char_level_perplexity:8.4f} |" if r.char_level_perplexity is not None else " " * 9 + " |"
        lines.append(f"| {r.source:<8} | {r.windows:>7} | {r.tokens:>8} | {r.loss:6.4f} | {r.perplexity:10.4f} |"
                     f"{char_cell} {r.path}")
    return "\n".join(lines)


def lm_eval_tables(results: dict[str, Any]) -> str:
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text

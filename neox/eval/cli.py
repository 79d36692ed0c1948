"""`deepy.py eval` command-line conveniences: several values after one list key, and lm_eval's flag names.

    --eval_tasks piqa arc_easy perplexity   ->  --eval_tasks "[piqa, arc_easy, perplexity]"
    --include_path DIR                      ->  --eval_tasks_path "[DIR]"   (lm_eval's name for it)
    --eval_perplexity_files a.jsonl b.txt   ->  --eval_perplexity_files "[a.jsonl, b.txt]"
Paths become absolute: the ranks may start in another directory.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

LIST_KEYS = ("eval_tasks", "eval_tasks_path", "eval_perplexity_files", "eval_perplexity_splits")
PATH_KEYS = ("eval_tasks_path", "eval_perplexity_files")
ALIASES = {"include_path": "eval_tasks_path", "tasks": "eval_tasks", "limit": "eval_limit",
           "batch_size": "eval_batch_size"}


def _key(token: str) -> str:
    return token[2:].split("=", 1)[0].replace("-", "_")


def fold_eval_overrides(overrides: Sequence[str]) -> list[str]:
    """Rewrite eval's list keys and aliases into the `--key value` pairs the config loader reads."""
    out: list[str] = []
    i = 0
    while i < len(overrides):
        token = overrides[i]
        if not token.startswith("--"):
            out.append(token)
            i += 1
            continue
        key = _key(token)
        key = ALIASES.get(key, key)
        inline = token.split("=", 1)[1] if "=" in token else None
        if key not in LIST_KEYS:
            out.append(f"--{key}={inline}" if inline is not None else f"--{key}")
            i += 1
            continue
        values = [] if inline is None else [inline]
        i += 1
        while inline is None and i < len(overrides) and not overrides[i].startswith("--"):
            values.append(overrides[i])
            i += 1
        out += [f"--{key}", _as_yaml_list(key, values)]
    return out


def _as_yaml_list(key: str, values: list[str]) -> str:
    if len(values) == 1 and values[0].lstrip().startswith("["):
        return values[0]  # already a YAML list: --eval_tasks "[piqa, arc_easy]"
    items = [v for value in values for v in value.split(",") if v.strip()] if key not in PATH_KEYS else values
    if key in PATH_KEYS:
        items = [os.path.abspath(os.path.expanduser(v)) for v in items]
    return json.dumps([v.strip() for v in items])  # JSON is YAML, and quotes odd characters safely

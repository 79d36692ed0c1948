"""Datasets of the offline tasks in neox/eval/tasks, read from the jsonl files shipped beside their YAMLs.

The task YAMLs name these functions as `custom_dataset`; lm_eval calls them with the task's metadata and
dataset_kwargs, which the local files do not need.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from None
    return rows


def validation_split(task: str, file_name: str):
    import datasets

    path = TASKS_DIR / task / file_name
    if not path.is_file():
        raise FileNotFoundError(f"task {task}: its data file {path} is missing; reinstall neox")
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(read_jsonl(path))})


def piqa(**_: Any):
    return validation_split("piqa", "piqa_validation.jsonl")


def arc_easy(**_: Any):
    return validation_split("arc_easy", "arc_easy_validation.jsonl")

"""Which lm_eval tasks a run can use: lm_eval's own, then ours (neox/eval/tasks), then the user's folders.

Later folders win, so our offline piqa/arc_easy replace lm_eval's hub-backed tasks of the same name, and a
user folder can replace ours. A name lm_eval does not know is an error that says what it does know.
"""
from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neox.eval.errors import EvalError
from neox.eval.task_data import TASKS_DIR


def include_paths(user_paths: Sequence[str] | None) -> list[Path]:
    paths = [TASKS_DIR]
    for raw in user_paths or []:
        path = Path(raw).expanduser()
        if not path.is_dir():
            raise EvalError(f"'eval_tasks_path' (--include_path): {path} is not a directory of lm_eval task YAMLs")
        paths.append(path.resolve())
    return paths


def task_manager(user_paths: Sequence[str] | None, names: Sequence[str] = ()) -> Any:
    """lm_eval's TaskManager over our folders and the user's; lm_eval's own tasks are indexed too (10-20 s of
    YAML parsing) unless every name in `names` is found in those folders."""
    from lm_eval.tasks import TaskManager

    folders = [str(p) for p in include_paths(user_paths)]
    if names:
        local = TaskManager(include_path=folders, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    return TaskManager(include_path=folders, include_defaults=True)


def local_task_names(manager: Any, folders: Sequence[Path]) -> list[str]:
    """Names indexed from YAMLs under the given folders."""
    roots = [str(Path(f).resolve()) for f in folders]
    names = []
    for name, entry in manager.task_index.items():
        yaml_path = getattr(entry, "yaml_path", None)
        if yaml_path is not None and any(str(Path(yaml_path).resolve()).startswith(root) for root in roots):
            names.append(name)
    return sorted(names)


def check_task_names(manager: Any, names: Sequence[str], user_paths: Sequence[str] | None) -> None:
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known and not Path(n).is_file()]
    if not unknown:
        return
    local = local_task_names(manager, include_paths(user_paths))
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    raise EvalError(
        f"lm_eval cannot load eval task(s) {', '.join(hints)}. Offline tasks found in the neox tasks folder "
        f"and 'eval_tasks_path': {', '.join(local) or 'none'}; lm_eval also indexes {len(known)} tasks, groups "
        "and tags of its own (most download their data; list them with `lm_eval ls tasks`). Add a folder of "
        "task YAMLs with --eval_tasks_path DIR (or --include_path DIR)"
    )

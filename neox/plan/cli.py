"""`deepy.py plan CONFIGS... [--key value] [--accelerator NAME] [--mfu F] [--nodes N] [--baseline_mb MB]`.

The plan's own options are taken out of the `--key value` overrides before the config is loaded; everything else
is a config override, as for train. --nodes N plans for N nodes of num_gpus ranks each without a hostfile: the
layout is resolved from a hostfile of N placeholder hosts written to a temporary directory and removed again.
"""
from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from neox.config.errors import ConfigError
from neox.config.load import parse_overrides, resolve_paths
from neox.config.neox_config import NeoXConfig
from neox.config.yaml_file import normalise_key, read_config_file
from neox.plan.baseline import BaselineError
from neox.plan.plan import PlanOptions, build_plan
from neox.plan.report import format_plan

Resolve = Callable[[Sequence[str], Sequence[str], "str | None"], NeoXConfig]
PLAN_OPTIONS = {"accelerator": str, "mfu": float, "nodes": int, "baseline_mb": float}


def pull_plan_options(overrides: Sequence[str]) -> tuple[PlanOptions, list[str]]:
    """(the plan's options, the remaining config overrides). Accepts --opt value and --opt=value; - or _."""
    values: dict[str, object] = {}
    rest: list[str] = []
    i = 0
    while i < len(overrides):
        token = overrides[i]
        name, eq, inline = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        key = name.replace("-", "_")
        if key not in PLAN_OPTIONS:
            rest.append(token)
            i += 1
            continue
        if eq:
            raw, i = inline, i + 1
        elif i + 1 < len(overrides):
            raw, i = overrides[i + 1], i + 2
        else:
            raise ConfigError(f"--{name} needs a value")
        try:
            values[key] = PLAN_OPTIONS[key](raw)
        except ValueError:
            raise ConfigError(f"--{name} expects a {PLAN_OPTIONS[key].__name__}, got {raw!r}") from None
    return PlanOptions(**values), rest


def resolve_for_plan(files: Sequence[str], overrides: Sequence[str], config_dir: str | None,
                     resolve: Resolve, nodes: int | None) -> NeoXConfig:
    if nodes is None:
        return resolve(files, overrides, config_dir)
    if not sets_num_gpus(files, overrides, config_dir):
        raise ConfigError("--nodes needs 'num_gpus', the ranks per node (e.g. --nodes 12 --num_gpus 8)")
    with tempfile.TemporaryDirectory(prefix="neox-plan-") as tmp:
        hostfile = Path(tmp) / "hostfile"
        # One slot per host; num_gpus sets the ranks per node, as it does over a real hostfile.
        hostfile.write_text("".join(f"node-{i} slots=1\n" for i in range(nodes)))
        cfg = resolve(files, [*overrides, "--hostfile", str(hostfile)], config_dir)
    cfg.launch.hostfile = None  # the placeholder hostfile is gone; the plan names the layout instead
    return cfg


def sets_num_gpus(files: Sequence[str], overrides: Sequence[str], config_dir: str | None) -> bool:
    """Whether a config file or an override sets num_gpus (read before resolving: derive needs the layout)."""
    if "num_gpus" in parse_overrides(list(overrides)):
        return True
    return any("num_gpus" in {normalise_key(k) for k in read_config_file(path)[0]}
               for path in resolve_paths(files, config_dir))


def run_plan(files: Sequence[str], overrides: Sequence[str], config_dir: str | None, resolve: Resolve) -> int:
    """Print the plan. ConfigError propagates (the caller reports it, exit 2); a failed baseline probe exits 1."""
    options, rest = pull_plan_options(overrides)
    options.validate()
    cfg = resolve_for_plan(files, rest, config_dir, resolve, options.nodes)
    try:
        plan = build_plan(cfg, options)
    except BaselineError as err:
        print(f"deepy: error: {err}", file=sys.stderr)
        return 1
    print(format_plan(plan))
    return 0

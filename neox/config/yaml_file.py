"""Read one YAML config file: its mapping with keys normalised (- == _) and the line of every key."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from neox.config.errors import ConfigError


def normalise_key(key: Any) -> Any:
    """gpt-neox accepts 'seq-length' and 'seq_length' alike; so do we, at every depth."""
    return key.replace("-", "_") if isinstance(key, str) else key


def read_config_file(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Return (mapping, {dotted key path: 1-based line}); ConfigError names the file and line on bad input."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
        # compose() only builds the node tree (no object construction), which carries the key positions.
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        detail = getattr(err, "problem", None) or str(err)
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and context_mark is not None and mark is not None and context_mark.line != mark.line:
            detail = f"{detail}; {context} opened at line {context_mark.line + 1}"
        elif context:
            detail = f"{context}, {detail}"
        raise ConfigError(f"{where}: invalid YAML ({detail}); fix the syntax there") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values, got {type(data).__name__}")
    lines: dict[str, int] = {}
    _collect_lines(root, "", path, lines)
    return _normalise(data), lines


def _collect_lines(node: yaml.Node, prefix: str, path: Path, lines: dict[str, int]) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[Any, int] = {}
    for key_node, value_node in node.value:
        key = normalise_key(key_node.value)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(
                f"{path}:{line}: key '{prefix}{key}' is set twice in the same mapping (also at line {seen[key]}); "
                "keep one ('-' and '_' are the same)"
            )
        seen[key] = line
        dotted = f"{prefix}{key}"
        lines[dotted] = line
        _collect_lines(value_node, dotted + ".", path, lines)


def _normalise(value: Any) -> Any:
    if isinstance(value, dict):
        return {normalise_key(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value

"""The show-config table: every final value and the file, command line, default or rule it came from."""
from __future__ import annotations

from typing import Any

from neox.config.neox_config import NeoXConfig
from neox.config.fields import group_fields


def config_rows(cfg: NeoXConfig) -> list[tuple[str, str, str, str]]:
    """(group, key, value, origin) for every key; dict values are shown one leaf per row."""
    rows = []
    for name, group in cfg.groups().items():
        for key in group_fields(type(group)):
            value = getattr(group, key)
            if isinstance(value, dict) and value:
                for dotted, leaf in _leaves(key, value):
                    rows.append((name, dotted, _fmt(leaf), cfg.origin(dotted)))
            else:
                rows.append((name, key, _fmt(value), cfg.origin(key)))
    return rows


def _leaves(prefix: str, value: dict[str, Any]) -> list[tuple[str, Any]]:
    out = []
    for key, sub in value.items():
        dotted = f"{prefix}.{key}"
        if isinstance(sub, dict) and sub:
            out.extend(_leaves(dotted, sub))
        else:
            out.append((dotted, sub))
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, str):
        return repr(value) if value == "" or value != value.strip() or "\n" in value else value
    return str(value)


def format_config_table(cfg: NeoXConfig) -> str:
    rows = config_rows(cfg)
    header = ("group", "key", "value", "from")
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(3)]
    widths = [widths[0], widths[1], min(widths[2], 60)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells[:3], widths)) + "  " + cells[3]

    out = [line(header), line(tuple("-" * w for w in widths) + ("-" * 4,))]
    out += [line(r) for r in rows]
    return "\n".join(out)

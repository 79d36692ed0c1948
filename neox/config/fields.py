"""Field declaration and the runtime type check shared by every config group."""
from __future__ import annotations

import re
import types
from dataclasses import MISSING, Field, field, fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

# PyYAML reads 6e-4 as a string (YAML 1.1 wants a dot), and the command line hands us text: a float field
# accepts any string Python parses as a float literal.
_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def option(default: Any, help: str) -> Any:
    """A config key: its default and the one-line help the reference and show-config print."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: _copy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


class TypeMismatch(Exception):
    """Raised by check_type; the loader turns it into a ConfigError naming the key and its origin."""

    def __init__(self, expected: str, value: Any):
        super().__init__(f"must be {expected}, got {type(value).__name__} {value!r}")
        self.expected = expected


def check_type(value: Any, hint: Any) -> Any:
    """Return value (floats widened from int or parsed from text) if it fits the type hint, else raise."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        for option_hint in options:
            if option_hint is type(None):
                continue
            try:
                return check_type(value, option_hint)
            except TypeMismatch:
                pass
        raise TypeMismatch(describe_type(hint), value)
    if origin is Literal:
        if value in get_args(hint) and not isinstance(value, bool):
            return value
        raise TypeMismatch(describe_type(hint), value)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is list or origin is list:
        if isinstance(value, str) and get_args(hint) and get_args(hint)[0] is str:
            # gpt-neox configs write one path or task where a list is expected (eval_tasks: piqa)
            return [value]
        if isinstance(value, list):
            (item_hint,) = get_args(hint) or (Any,)
            try:
                return [check_type(item, item_hint) for item in value]
            except TypeMismatch:
                raise TypeMismatch(describe_type(hint), value) from None
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
    else:
        raise TypeError(f"config fields cannot use the type {hint!r}")
    raise TypeMismatch(describe_type(hint), value)


def describe_type(hint: Any) -> str:
    """Readable type for messages and the reference: 'int | None', "one of 'a', 'b'", 'list[str]'."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " | ".join(describe_type(h) for h in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in get_args(hint))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(describe_type(h) for h in get_args(hint))}]"
    if hint is type(None):
        return "None"
    if hint is Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


def group_fields(group_cls: type) -> dict[str, tuple[Field, Any]]:
    """Every key of a config group: name -> (dataclass field, resolved type hint)."""
    hints = get_type_hints(group_cls)
    return {f.name: (f, hints[f.name]) for f in fields(group_cls) if f.init}


def field_default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def field_help(f: Field) -> str:
    return str(f.metadata.get("help", ""))


__all__ = [
    "TypeMismatch",
    "check_type",
    "describe_type",
    "field_default",
    "field_help",
    "group_fields",
    "option",
]

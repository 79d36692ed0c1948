"""The tokenizer protocol every build implements, its error type, and small file helpers."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable


class TokenizerError(ValueError):
    """A tokenizer cannot be built or used as asked; the message names the file or option to fix."""


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eod: int
    pad: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def files(self) -> list[Path]: ...


def require_file(path: str | Path | None, option: str, tokenizer_type: str, what: str) -> Path:
    """Return `path` as a readable file, or raise naming `option` and what it should hold."""
    if path is None or str(path) == "":
        raise TokenizerError(f"{tokenizer_type} needs {option}: pass {what}")
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise TokenizerError(f"{tokenizer_type}: {option} '{resolved}' does not exist; pass {what}")
    if not resolved.is_file():
        raise TokenizerError(f"{tokenizer_type}: {option} '{resolved}' is not a file; pass {what}")
    try:
        with resolved.open("rb") as handle:
            handle.read(1)
    except OSError as err:
        raise TokenizerError(f"{tokenizer_type}: cannot read {option} '{resolved}': {err}") from err
    return resolved


def suggest(name: str, choices: Sequence[str]) -> str:
    """A ' (did you mean X?)' hint for a mistyped name, or '' when nothing is close."""
    lowered = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)
    return f" (did you mean {lowered[close[0]]}?)" if close else ""


def check_threads(num_threads: int) -> int:
    if not isinstance(num_threads, int) or num_threads < 1:
        raise TokenizerError(f"num_threads must be an integer >= 1, got {num_threads!r}")
    return num_threads

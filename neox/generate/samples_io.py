"""Prompts in (text split on prompt_end, or jsonl with a "prompt"/"text" key) and samples out (jsonl, atomic)."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from neox.generate.decode import GenerationError

PROMPT_KEYS = ("prompt", "text")


@dataclass
class Sample:
    """One line of sample_output_file."""

    prompt: str
    text: str  # the continuation only, without the prompt
    tokens_generated: int
    finish_reason: str  # eod | stop | length
    seconds: float  # wall time of the batch this sample was decoded in
    tokens: list[int]
    logits: list[float] | None = None  # with return_logits

    def to_json(self) -> str:
        record = asdict(self)
        if record["logits"] is None:
            del record["logits"]
        return json.dumps(record, ensure_ascii=False)


def read_prompts(path: str | Path, prompt_end: str = "\n") -> list[str]:
    """Prompts of sample_input_file: jsonl (.jsonl/.json suffix, or every line a JSON object) or plain text.

    Plain text is split on prompt_end; surrounding whitespace is stripped and empty prompts are skipped.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GenerationError(f"sample_input_file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise GenerationError(f"cannot read sample_input_file {path}: {err}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if path.suffix in (".jsonl", ".json") or (lines and all(_is_json_object(line) for line in lines)):
        prompts = [_prompt_of(line, path, number) for number, line in _numbered(text)]
    else:
        if prompt_end == "":
            raise GenerationError("'prompt_end' must not be empty")
        prompts = [chunk.strip() for chunk in text.split(prompt_end)]
        prompts = [p for p in prompts if p]
    if not prompts:
        raise GenerationError(f"sample_input_file {path} holds no prompt")
    return prompts


def _numbered(text: str):
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _prompt_of(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except ValueError as err:
        raise GenerationError(f"{path}:{number}: not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise GenerationError(f"{path}:{number}: expected a JSON object with a 'prompt' or 'text' key")
    for key in PROMPT_KEYS:
        if isinstance(record.get(key), str):
            return record[key]
    raise GenerationError(f"{path}:{number}: no string 'prompt' or 'text' key (keys: {sorted(record)})")


def write_samples(path: str | Path, samples: list[Sample]) -> Path:
    """Write one JSON object per line, through a temporary file replaced at the end."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for sample in samples:
                handle.write(sample.to_json() + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

"""gpt-neox's config_files: the YAML files of a run as the user wrote them (comments kept), kept with each
checkpoint under configs/ so the run can be read, or launched again, from the checkpoint alone."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from neox.config.errors import ConfigError


def original_config_files(paths: Sequence[Path]) -> dict[str, str]:
    """File name -> text. gpt-neox refuses two files of one name; here the later one gets a -2, -3 ... suffix."""
    texts: dict[str, str] = {}
    for path in paths:
        name, n = path.name, 1
        while name in texts:
            n += 1
            name = f"{path.stem}-{n}{path.suffix}"
        try:
            texts[name] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from None
    return texts

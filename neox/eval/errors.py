"""The eval package's error type."""
from __future__ import annotations


class EvalError(ValueError):
    """An evaluation cannot run as configured; the message names the key, task or file to fix."""

"""`python run_module.py MODULE ARGS...` runs MODULE as `python -m MODULE ARGS...` would.

For launchers that start a script file and cannot start a module: DeepSpeed's SlurmRunner runs `python -u SCRIPT`
and drops its --module flag, so deepy hands slurm ranks this script followed by the module name.
"""
from __future__ import annotations

import os
import runpy
import sys


def main(argv: list[str]) -> None:
    if not argv or argv[0].startswith("-"):
        print("usage: run_module.py MODULE [ARGS...]", file=sys.stderr)
        raise SystemExit(2)
    # As under `python -m`: the working directory, not this script's folder, heads the import path.
    sys.path[0] = os.getcwd()
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])

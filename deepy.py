#!/usr/bin/env python3
"""gpt-neox's entry point, kept so its command lines run unchanged: `./deepy.py train.py -d configs 125M.yml ...`.

The launcher itself is launcher/deepy.py (also installed as the `deepy` command).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launcher.deepy import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

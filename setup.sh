#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv (reused if present), the CPU build of torch
# when no torch is installed yet, then this project with its dev extras.
#   VENV=path      use another virtual environment (default .venv)
#   TORCH_INDEX=url  where to get torch from, e.g. https://download.pytorch.org/whl/cpu on a
#                    generic Linux machine (plain PyPI would give a multi-GB CUDA build there)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: installing the CPU build of torch 2.13.0"
    "$PY" -m pip install --quiet "torch==2.13.0" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
fi
# The installed torch is pinned on this line: left free, pip's resolver may backtrack out of an
# fsspec/s3fs conflict by replacing it with a newer (CUDA, several GB) build.
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
"$PY" -m pip install --quiet -e ".[dev]" "torch==$TORCH_VERSION"
"$PY" -c "import torch, foundation; print(f'setup: ok (torch {torch.__version__}, foundation {foundation.__version__}); activate with: . $VENV/bin/activate')"

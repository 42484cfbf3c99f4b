#!/usr/bin/env bash
# Set up (once) and run the whole test suite. "No tests collected" counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
# Human-written evaluation data is read in place from the shared data folder when there is one.
if [ -z "${PROMPTKIT_DATA:-}" ] && [ -d ../shared/data ]; then
  export PROMPTKIT_DATA="$(cd ../shared/data && pwd)"
fi
# The test run includes the optional Gemma 3 270M (its integration test); PROMPTKIT_GEMMA=0 skips it.
PROMPTKIT_GEMMA=${PROMPTKIT_GEMMA:-1} bash scripts/setup.sh || exit 1
# The optional extras the suite tests for real: Ray (a local cluster), MLflow (a loopback tracking
# server), plotly (the report page) and optuna (DSPy's MIPROv2).
.venv/bin/python -c "import ray.serve, mlflow, plotly, optuna" 2>/dev/null || \
  PIP_DISABLE_PIP_VERSION_CHECK=1 .venv/bin/pip install -q -e ".[ray,mlflow,report,dspy]" || exit 1
# Headless Chromium renders the report page in its test (Debian's package; needs root or sudo).
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo -n")
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium) >/dev/null 2>&1 || \
    echo "warning: could not install chromium; the report's browser test will be skipped" >&2
fi
# llama.cpp's own OpenAI server, which the remote-backend and DSPy tests run against (built once
# from source, several minutes; pip keeps the wheel). PROMPTKIT_LLAMACPP=0 skips it and those tests.
if [ "${PROMPTKIT_LLAMACPP:-1}" = "1" ]; then
  .venv/bin/python -c "import llama_cpp.server" 2>/dev/null || \
    PIP_DISABLE_PIP_VERSION_CHECK=1 .venv/bin/pip install -q "llama-cpp-python[server]==0.3.36" || exit 1
fi
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "no tests were collected" >&2
  exit 1
fi
exit "$rc"

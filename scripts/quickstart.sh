#!/usr/bin/env bash
# Set up (once) and answer a question over the bundled documents with the embedded models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/promptkit quickstart "$@"

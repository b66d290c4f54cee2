#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh) and runs the whole test suite on two processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 -q "$@"

#!/usr/bin/env bash
# The test command (what CI runs): set up if needed, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"

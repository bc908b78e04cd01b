#!/usr/bin/env bash
# One command on a fresh machine: set up, prepare the default model, run `fedsea serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fedsea serve "$@"

#!/usr/bin/env bash
# The test command (what CI runs): set up if needed, then the whole suite in two worker
# processes (pytest-xdist; a file's tests stay on one worker, so its module fixtures load
# once). Many tests wait on sockets, subprocesses and timeouts rather than compute.
# `-n 0` after it runs in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"

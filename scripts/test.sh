#!/usr/bin/env bash
# The test command (what CI runs): set up if needed, then the whole suite in one process.
# `-n 2 --dist loadfile --max-worker-restart 0` after it runs two worker processes (a file's
# module fixtures stay on one worker; a crashed worker ends the run, since xdist 3.8 can hang
# replacing one under loadfile: pytest-xdist#784, #1323). Faster here, but not CI's default:
# CI's one two-worker run lost a worker to an abort inside torch's compiled CPU flex attention
# that no local run reproduced; one process passed the CI runs before it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"

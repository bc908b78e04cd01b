"""Deployment defaults shared by `fedsea serve`, `fedsea server` and `fedsea gateway`, so
each starts with no flags beyond addresses and they agree on the split."""

import os

from .models import DEFAULT_MODEL

MODEL = DEFAULT_MODEL
HEAD = 2  # blocks before the server's range, on the edge
TAIL = 2  # blocks after it, on the edge
# Relative to per-token RMS (fedsea_shared.noise).  Calibrated with `fedsea audit` on the
# default model: 0.1 costs ~3% perplexity; no level that keeps the model usable stops a
# learned inverter (94% of tokens recovered at head 2), so more noise buys nothing.
NOISE = 0.1
# Send the chat template's public prefix (and so the attention sink) un-noised: it is the
# same in every prompt, and noise on the sink's outlier activations costs quality.
PUBLIC_TEMPLATE = True
# Replace names, digit runs and e-mail addresses by keyed surrogates before the prompt
# becomes token ids, and map them back in the output (edge_runtime.pseudonyms).
PSEUDONYMIZE = True
MAX_CONTEXT = 8192  # tokens a session may hold on the server (prompt and generated)


def kv_cache_memory() -> str:
    """The server's KV pool (bytes, or a fraction of free accelerator memory), preallocated
    at start: $FEDSEA_KV_CACHE_MEMORY, else 1GiB."""
    return os.environ.get("FEDSEA_KV_CACHE_MEMORY", "1GiB")


def weights() -> str:
    """The default weight format of the server, the gateway's edge, `fedsea serve` and
    `EdgeClient`: $FEDSEA_WEIGHTS (e.g. float32, to stay exact against `transformers` on
    any machine), else auto (fedsea_shared.layers.linear.resolve_weights)."""
    return os.environ.get("FEDSEA_WEIGHTS", "auto")


SERVER_PORT = 8765
GATEWAY_PORT = 8000

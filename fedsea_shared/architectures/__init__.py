"""The model registry: each supported `model_type` and what its family declares
(`base.Architecture`), config reading, and the longest context fedsea serves exactly.

Edge, server, training, audit and adapters build a model through `shard.ModelShard`,
which asks this registry for the family's rotary embedding and biases; nothing else
names a family."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PretrainedConfig

from .base import Architecture
from .llama import LLAMA
from .mistral import MISTRAL
from .qwen2 import QWEN2

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (LLAMA, MISTRAL, QWEN2)}


def architecture(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(f"model_type {model_type!r} is not supported; supported model types: "
                         f"{', '.join(sorted(ARCHITECTURES))}") from None


def architecture_of(config: PretrainedConfig) -> Architecture:
    return architecture(config.model_type)


def load_config(model_dir: str | Path) -> PretrainedConfig:
    """Read a checkpoint's config.json with its family's transformers config class (never a
    hub download)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory: no config.json")
    model_type = json.loads(path.read_text()).get("model_type") or "llama"  # none given: Llama's config
    config = architecture(model_type).config_class.from_pretrained(str(model_dir), local_files_only=True)
    config._attn_implementation = "sdpa"
    return config


def sliding_window(config: PretrainedConfig) -> int | None:
    """The window of the model's sliding-window layers (a query attends to the last
    `window` positions, itself included), None where no layer has one.  Qwen2's config
    clears it unless `use_sliding_window`; a Qwen2 that sets it but slides no layer (all
    below `max_window_layers`) counts as windowed too: stricter than needed, never wrong."""
    return getattr(config, "sliding_window", None)


def context_limit(config: PretrainedConfig) -> int:
    """The longest context (prompt and generated tokens) this model computes exactly in
    fedsea: its positions, and its sliding window where it has one, since every attention
    path here (the edge's buffers, each server backend, training) attends to the whole
    context, which is the windowed attention only up to the window."""
    window, positions = sliding_window(config), config.max_position_embeddings
    return positions if window is None else min(positions, window)


def check_context(config: PretrainedConfig, tokens: int, setting: str) -> None:
    """Refuse, at start, to serve or train on `tokens` of context (the value of `setting`)
    where the model's sliding window is shorter: past the window the results would silently
    differ from the model's."""
    window = sliding_window(config)
    if window is not None and tokens > window:
        raise ValueError(
            f"this {config.model_type} checkpoint attends over a sliding window of {window} tokens, which fedsea "
            f"does not implement: it serves at most {window} tokens of context exactly, and {setting} is {tokens}; "
            f"set {setting} {window} (or less)"
        )

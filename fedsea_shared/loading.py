"""Reading a shard's own tensors from a checkpoint, straight into the side's weight format.

A checkpoint is a directory of safetensors files.  Each tensor is read by name, converted
to its role's format (`role_format`) and dropped before the next is read, so loading holds
the shard's final tensors plus one tensor in flight, never a float32 copy of the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

from .layers.linear import DENSE_FORMATS, quantize

log = logging.getLogger("fedsea.loading")

EMBEDDING = "model.embed_tokens.weight"


@dataclass
class Prequantized:
    """A tensor a file already holds in one of the weight formats (`fmt`), and the way to
    its float values for any other format."""

    fmt: str
    tensors: dict[str, torch.Tensor]
    dequantize: Callable[[], torch.Tensor]


def role_format(name: str, fmt: str, linear: bool) -> str:
    """The format a tensor of a shard is stored in under the side's weight format `fmt`.

    Quantized formats keep the embedding int8 per row: a lookup dequantizes only its rows,
    and torch has no int4 gather.  The LM head takes the side's format like any linear
    (under int4, a model that ties it to the embedding gets a separate int4 copy: torch's
    int4 kernel ran that 49152x576 product 2.2x faster than its int8 one here,
    benchmarks/linear_formats.py); norms and other small tensors stay dense."""
    if not (linear or name == EMBEDDING):
        return "dense"
    if name == EMBEDDING and fmt not in DENSE_FORMATS:
        return "int8"
    return fmt


def convert(name: str, raw: torch.Tensor | Prequantized, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state_dict entries (`name` and its sibling tensors) of a raw tensor stored in
    `fmt` ("dense": the side's dtype `dtype`)."""
    if isinstance(raw, Prequantized) and raw.fmt == fmt:
        tensors = raw.tensors
    else:
        raw = raw.dequantize() if isinstance(raw, Prequantized) else raw
        if fmt == "dense":
            return {name: raw.to(dtype)}
        tensors = quantize(raw, fmt)
    stem = name[: -len("weight")]
    return {stem + k: t for k, t in tensors.items()}


def safetensors_tensors(model_dir: Path, wanted: set[str], device: str) -> Iterator[tuple[str, torch.Tensor]]:
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in sorted(wanted.intersection(f.keys())):
                yield name, f.get_tensor(name)


def read_shard(model_dir: Path, wanted: dict[str, bool], fmt: str, dtype: torch.dtype,
               device: str, copies: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The state_dict of the tensors in `wanted` (name -> whether it is a linear's weight),
    each stored in its role's format under the weight format `fmt`; `copies`: a tensor
    also stored as a linear's weight under another name (an LM head tied to the embedding
    in another format)."""
    state: dict[str, torch.Tensor] = {}
    found: set[str] = set()
    for name, raw in safetensors_tensors(model_dir, set(wanted), device):
        state.update(convert(name, raw, role_format(name, fmt, wanted[name]), dtype))
        if name in (copies or {}):
            state.update(convert(copies[name], raw, role_format(copies[name], fmt, True), dtype))
        found.add(name)
    missing = set(wanted) - found
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks tensors: {sorted(missing)[:5]}")
    return state

"""Reading a shard's own tensors from a checkpoint, straight into the side's weight format.

A checkpoint is a directory of safetensors files, or one prepared for a GGUF file
(fedsea_shared.models: config and tokenizer from the file's metadata, `GGUF_SOURCE` naming
the file).  Each tensor is read by name, converted to its role's format (`role_format`)
and dropped before the next is read, so loading holds the shard's final tensors plus one
tensor in flight (GGUF tensors that need converting: one chunk of `CHUNK_ROWS` rows in
float32), never a float32 copy of the model.  The weight format "file" keeps each GGUF
tensor in the format matching its own type (`gguf_format`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

from .layers.linear import DENSE_FORMATS, INT4_GROUP, INT4_MIN_ROWS, int4_tensors, quantize
from .models import GGUF_SOURCE

log = logging.getLogger("fedsea.loading")

EMBEDDING = "model.embed_tokens.weight"

# Rows of a GGUF tensor converted at a time (a multiple of torch's int4 row block, 64).
CHUNK_ROWS = 4096


@dataclass
class Prequantized:
    """A tensor a file holds quantized (`kind`: the file's type name): its tensors in the
    weight format `fmt` where that format represents it (else None), and its float values
    by rows."""

    kind: str
    fmt: str | None
    tensors: dict[str, torch.Tensor] | None
    rows: int
    dequantize: Callable[[int, int], torch.Tensor]  # rows [start, stop) in float32


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
    elif isinstance(raw, Prequantized):  # every format is row-local: convert a chunk at a time
        parts = [convert(name, raw.dequantize(i, min(i + CHUNK_ROWS, raw.rows)), fmt, dtype)
                 for i in range(0, raw.rows, CHUNK_ROWS)]
        return {k: torch.cat([p[k] for p in parts], 1 if k.endswith("scale_zeros") else 0) for k in parts[0]}
    else:
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
               device: str, copies: dict[str, str] | None = None, config=None) -> dict[str, torch.Tensor]:
    """The state_dict of the tensors in `wanted` (name -> whether it is a linear's weight),
    each stored in its role's format under the weight format `fmt`; `copies`: a tensor
    also stored as a linear's weight under another name (an LM head tied to the embedding
    in another format)."""
    state: dict[str, torch.Tensor] = {}
    found: set[str] = set()
    source = model_dir / GGUF_SOURCE
    if source.is_file():
        path = json.loads(source.read_text())["path"]
        tensors = gguf_tensors(path, set(wanted), config)
    else:
        tensors = safetensors_tensors(model_dir, set(wanted), device)
    kinds: dict[str, int] = {}
    for name, raw in tensors:
        f = gguf_format(raw) if fmt == "file" else fmt
        role = role_format(name, f, wanted[name])
        state.update(convert(name, raw, role, dtype))
        copy = (copies or {}).get(name)
        if copy and role_format(copy, f, True) != role:  # else the copy is tied to this one
            state.update(convert(copy, raw, role_format(copy, f, True), dtype))
        found.add(name)
        if isinstance(raw, Prequantized):
            how = ("as stored" if raw.fmt == role else "dequantized" if role == "dense" or role in DENSE_FORMATS
                   else "dequantized and requantized")
            how = f"{raw.kind} -> {role} ({how})"
            kinds[how] = kinds.get(how, 0) + 1
    for how, n in sorted(kinds.items()):
        log.info("%s: %d tensors %s", model_dir.name, n, how)
    missing = set(wanted) - found
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks tensors: {sorted(missing)[:5]}")
    return state


# GGUF tensor names (llama.cpp's) -> the Hugging Face checkpoint's.
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    m = _GGUF_LAYER.match(gguf_name)
    if m:
        part = _GGUF_BLOCK.get(m[2])
        return f"model.layers.{m[1]}.{part}.{m[3]}" if part else None
    stem, _, kind = gguf_name.rpartition(".")
    return f"{_GGUF_TOP[stem]}.{kind}" if stem in _GGUF_TOP else None


def rope_rows(rows: int, heads: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's q/k permutation: its converter reorders each
    head's rows from (pairs, 2) halves-interleaved to (2, pairs), for its rope kernel; the
    checkpoint's row h * 2p + half * p + i is the file's row h * 2p + 2i + half."""
    pairs = rows // heads // 2
    return torch.arange(rows).view(heads, pairs, 2).transpose(1, 2).reshape(-1)


def gguf_format(raw) -> str:
    """The weight format matching a GGUF tensor's type (dense types: the stored dtype;
    k-quants and others, which no format here holds: float32)."""
    if isinstance(raw, Prequantized):
        return {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8"}.get(raw.kind, "float32")
    return str(raw.dtype).removeprefix("torch.")


def gguf_tensors(path: str, wanted: set[str], config) -> Iterator[tuple[str, torch.Tensor | Prequantized]]:
    """The wanted tensors of a GGUF file, each read from the file's memory map only when
    reached (other sides' tensors are never touched).  Q4_0/Q4_1 come with their int4
    tensors: the same codes, and per group of 32 the same scale and zero (Q4_0: w = d(q - 8),
    Q4_1: w = dq + m = d(q - 8) + (m + 8d)), in bf16 (the kernel's; GGUF stores fp16)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        name = hf_name(t.name)
        if name not in wanted:
            continue
        kind = t.tensor_type.name
        data = t.data
        heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
        order = next((rope_rows(data.shape[0], n) for part, n in heads.items() if f".{part}." in name), None)
        if order is not None:
            data = data[order.numpy()]
        if kind in ("F32", "F16", "BF16"):
            tensor = torch.from_numpy(np.array(data))  # a copy: the map is read-only
            yield name, tensor.view(torch.bfloat16) if kind == "BF16" else tensor
            continue
        qtype = t.tensor_type
        cols = int(t.shape[0])  # GGUF lists dimensions innermost first

        def rows_of(start, stop, data=data, qtype=qtype, cols=cols):
            return torch.from_numpy(gguf.quants.dequantize(np.asarray(data[start:stop]), qtype).reshape(-1, cols))

        q4 = kind in ("Q4_0", "Q4_1") and data.shape[0] % INT4_MIN_ROWS == 0
        yield name, Prequantized(kind, "int4" if q4 else None, _q4_tensors(data, kind, cols) if q4 else None,
                                 data.shape[0], rows_of)


def _q4_tensors(data, kind: str, cols: int) -> dict[str, torch.Tensor]:
    """int4 tensors of Q4_0/Q4_1 blocks: [d fp16, (m fp16,) 16 bytes: q0..15 in the low
    nibbles, q16..31 in the high ones] per 32 values."""
    import numpy as np

    rows = data.shape[0]
    blocks = torch.from_numpy(np.array(data)).view(rows, cols // INT4_GROUP, -1)
    head = 4 if kind == "Q4_1" else 2
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
    qs = blocks[..., head:]
    codes = torch.cat([qs & 0xF, qs >> 4], -1).reshape(rows, cols)
    if kind == "Q4_1":
        m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
        return int4_tensors(codes, d, m + 8 * d)
    return int4_tensors(codes, d, torch.zeros_like(d))

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

import ctypes
import json
import logging
import math
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
LM_HEAD = "lm_head.weight"

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

    Quantized formats keep the embedding int8 per row (a lookup dequantizes only its rows;
    torch has no int4 gather) and the LM head int8 under int4 too, as llama.cpp keeps its
    output tensor above 4 bits: an int4 head ran 2.2x faster than int8 here
    (benchmarks/linear_formats.py) but took SmolLM2's BBC perplexity from +0.2% to +5.8%
    over float32 (benchmarks/weight_quality.py).  Norms and other small tensors stay dense."""
    if not (linear or name == EMBEDDING):
        return "dense"
    if fmt not in DENSE_FORMATS and name in (EMBEDDING, LM_HEAD):
        return "int8"
    return fmt


def convert(name: str, raw: torch.Tensor | Prequantized, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state_dict entries (`name` and its sibling tensors) of a raw tensor stored in
    `fmt` ("dense": the side's dtype `dtype`)."""
    if isinstance(raw, Prequantized) and raw.fmt == fmt:
        tensors = raw.tensors
    elif isinstance(raw, Prequantized) or (fmt != "dense" and raw.shape[0] > CHUNK_ROWS):
        # Every format is row-local: convert a chunk at a time (a float32 chunk in flight,
        # not the whole tensor and its temporaries: the 49152-row embedding is 113 MB).
        rows = raw.rows if isinstance(raw, Prequantized) else raw.shape[0]
        parts = []
        for i in range(0, rows, CHUNK_ROWS):
            chunk = raw.dequantize(i, min(i + CHUNK_ROWS, rows)) if isinstance(raw, Prequantized) else raw[i: i + CHUNK_ROWS]
            parts.append(convert(name, chunk, fmt, dtype))
            release_freed_memory()
        return {k: torch.cat([p[k] for p in parts], 1 if k.endswith("scale_zeros") else 0) for k in parts[0]}
    elif fmt == "dense":
        return {name: raw.to(dtype)}
    else:
        tensors = quantize(raw, fmt)
    stem = name[: -len("weight")]
    return {stem + k: t for k, t in tensors.items()}


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS.  A tensor's conversion frees temporaries
    of a few MB between the shard's kept tensors, and glibc keeps such holes in the heap:
    loading the packaged Q4_1's middle blocks (55 MiB as int4) grew RSS by 265 MiB without
    this, by about the shard's size with it."""
    if _TRIM is not None:
        _TRIM(0)


# (dimension, start, stop) of a tensor a reader reads only part of (a tensor-parallel
# rank's share, fedsea_shared.layers.tensor_parallel); None: all of it.
Slice = tuple[int, int, int] | None
SliceOf = Callable[[str], Slice]


def whole(name: str) -> Slice:
    return None


def safetensors_tensors(model_dir: Path, wanted: set[str], device: str,
                        slice_of: SliceOf = whole) -> Iterator[tuple[str, torch.Tensor]]:
    """The wanted tensors (or the part `slice_of` names: only its bytes are read), the file
    mapped anew for each: the pages a tensor's read touched leave the process with it (one
    mapping over the loop kept every page read so far resident: +424 MiB of RSS reading the
    middle blocks into 55 MiB of int4)."""
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            names = sorted(wanted.intersection(f.keys()))
        for name in names:
            part = slice_of(name)
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                if part is None:
                    tensor = f.get_tensor(name)
                else:
                    dim, start, stop = part
                    tensor = f.get_slice(name)[(slice(None),) * dim + (slice(start, stop),)]
            yield name, tensor


def read_shard(model_dir: Path, wanted: dict[str, bool], fmt: str, dtype: torch.dtype,
               device: str, config=None, slice_of: SliceOf = whole) -> dict[str, torch.Tensor]:
    """The state_dict of the tensors in `wanted` (name -> whether it is a linear's weight),
    each stored in its role's format under the weight format `fmt` ("file": a GGUF tensor's
    own, see `gguf_format`); `config` gives the head counts for GGUF's q/k rows; of each
    tensor only the part `slice_of` names is read."""
    state: dict[str, torch.Tensor] = {}
    found: set[str] = set()
    source = model_dir / GGUF_SOURCE
    if source.is_file():
        tensors = gguf_tensors(json.loads(source.read_text()), set(wanted), config, slice_of)
    else:
        tensors = safetensors_tensors(model_dir, set(wanted), device, slice_of)
    kinds: dict[str, int] = {}
    for name, raw in tensors:
        f = gguf_format(raw) if fmt == "file" else fmt
        role = role_format(name, f, wanted[name])
        state.update(convert(name, raw, role, dtype))
        found.add(name)
        release_freed_memory()
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


_GGUF_DENSE = {"F32": "float32", "F16": "float16", "BF16": "uint16"}


def gguf_source(path: Path) -> dict:
    """A GGUF file's path, its `general.architecture` and where each of its tensors lies
    ({name: {type, shape, offset, bytes}}), kept in the prepared directory so loading maps
    only a shard's tensors and never parses the file's metadata again (gguf's reader builds
    an array per vocabulary entry: 5 s and 160 MiB for SmolLM2's 49k tokens here)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: {"type": t.tensor_type.name, "shape": [int(d) for d in t.shape], "offset": int(t.data_offset),
                        "bytes": int(t.n_bytes)} for t in reader.tensors}
    return {"path": str(path), "architecture": reader.fields["general.architecture"].contents(), "tensors": tensors}


# The GGUF architectures whose q/k rows llama.cpp's converter reorders for its rope kernel
# (its LlamaModel; Qwen2's and Mistral's own converters keep the checkpoint's order), as
# transformers' GGUF reader undoes it.
_ROPE_PERMUTED = {"llama"}


def gguf_tensors(source: dict, wanted: set[str], config,
                 slice_of: SliceOf = whole) -> Iterator[tuple[str, torch.Tensor | Prequantized]]:
    """The wanted tensors of the GGUF file `source` names (models.GGUF_SOURCE: its path and
    `gguf_source`), each mapped from the file only when reached (other sides' tensors are
    never touched), and of each only the rows or whole quantization blocks of columns
    `slice_of` names.  Q4_0/Q4_1 come with their int4 tensors: the same codes, and per group
    of 32 the same scale and zero (Q4_0: w = d(q - 8), Q4_1: w = dq + m = d(q - 8) + (m + 8d)),
    in bf16 (the kernel's; GGUF stores fp16)."""
    import gguf
    import numpy as np

    # Directories prepared before the architecture was recorded hold llama files only.
    permuted = source.get("architecture", "llama") in _ROPE_PERMUTED
    for gname, info in source["tensors"].items():
        name = hf_name(gname)
        if name not in wanted:
            continue
        kind, cols = info["type"], info["shape"][0]  # GGUF lists dimensions innermost first
        rows = math.prod(info["shape"][1:])
        data = np.memmap(source["path"], np.uint8, "r", offset=info["offset"], shape=(info["bytes"],))
        block, size = (1, 1) if kind in _GGUF_DENSE else gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        vector = not info["shape"][1:]
        if kind in _GGUF_DENSE:
            # A vector (norm, bias) as a column: its entries are the rows that q/k's order and
            # a tensor-parallel slice pick.
            data = data.view(_GGUF_DENSE[kind]).reshape((cols, 1) if vector else (rows, cols))
        else:
            data = data.reshape(rows, cols // block * size)
        heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
        order = next((rope_rows(data.shape[0], n) for part, n in heads.items() if f".{part}." in name and permuted), None)
        part = slice_of(name)
        if part is not None and part[0] == 1:  # columns
            _, start, stop = part
            if start % block or stop % block:
                raise ValueError(f"{name}: columns [{start}, {stop}) split {kind}'s blocks of {block}")
            data, cols = data[:, start // block * size: stop // block * size], stop - start
        elif part is not None:
            order = torch.arange(part[1], part[2]) if order is None else order[part[1]: part[2]]
        if order is not None:
            data = data[order.numpy()]
        if kind in _GGUF_DENSE:
            tensor = torch.from_numpy(np.array(data))  # a copy: the map is read-only
            tensor = tensor.view(torch.bfloat16) if kind == "BF16" else tensor
            yield name, tensor.view(-1) if vector else tensor
            continue
        qtype = gguf.GGMLQuantizationType[kind]

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

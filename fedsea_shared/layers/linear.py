"""A linear layer's weight format: how its weight is stored and which kernel multiplies by it.

Each format is a `LinearMethod` (as vLLM's): dense float32 / bfloat16 / float16 on torch's
or oneDNN's kernels, int8 weight-only with a scale per output channel, int4 weight-only with
a scale and zero per group of `INT4_GROUP` inputs.  A `Linear` holds its format's tensors
under its own state_dict names (`weight`, plus `weight_scale` or `weight_scale_zeros`), and
the format is read off those tensors when a state_dict is loaded: a quantized shard loads,
merges and fuses the way a dense one does.  `resolve_weights` is the one place a side's
`--weights` choice is made.  Activations keep the side's dtype between layers; a layer casts
its input to what its kernel computes in and its output back.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("fedsea.linear")

WEIGHT_FORMATS = ("auto", "float32", "bfloat16", "float16", "int8", "int4")
DENSE_FORMATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Inputs sharing one int4 scale and zero: GGUF's Q4_0/Q4_1 block, so those load as they are.
INT4_GROUP = 32
# torch's CPU int4 layout packs rows in blocks of 64 and needs a multiple of 16.
INT4_PACK_ROWS, INT4_MIN_ROWS = 64, 16


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _FrozenLinear(torch.autograd.Function):
    """The product with a frozen weight whose kernel has no backward (oneDNN's, the
    quantized ones): only the input's gradient, through the dequantized weight (LoRA
    training over an inference or quantized shard: QLoRA's frozen base)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        with torch.no_grad():
            return layer.method.kernel(layer, x)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.method.dequantize(ctx.layer).to(grad.dtype), None


class LinearMethod:
    """A weight format: its tensors beside `weight`, its kernel, its way back to a dense
    weight (for merging a LoRA delta and for the input gradient)."""

    name = "?"
    extra: tuple[str, ...] = ()  # the layer's persistent buffers besides weight and bias

    def adopt(self, layer: "Linear", tensors: dict[str, torch.Tensor]) -> None:
        """Make `layer` hold `tensors` (weight and `extra`) in this format."""
        w = tensors["weight"]
        layer.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)  # tied stays tied
        for name in self.extra:
            layer.register_buffer(name, tensors[name])
        layer.method = self

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenLinear.apply(x, layer)
        return self.kernel(layer, x)

    def kernel(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, layer: "Linear") -> torch.Tensor:
        """The weight [out, in] as a dense tensor (float32 for quantized formats)."""
        raise NotImplementedError

    def fused(self, parts: list["Linear"]) -> dict[str, torch.Tensor]:
        """The tensors of one layer computing the parts' outputs side by side."""
        return {name: torch.cat([getattr(p, name) for p in parts]) for name in ("weight", *self.extra)}


class Dense(LinearMethod):
    """A plain weight in any float dtype, on torch's dense linear (MKL on CPU) or oneDNN's
    (`apply_linear_kernel` packs it and may keep a dense copy for few-row products)."""

    name = "dense"

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        w = layer.weight
        if x.dtype != w.dtype:  # bf16/fp16 weights under float32 activations
            return self.apply(layer, x.to(w.dtype)).to(x.dtype)
        if x.shape[0] <= layer.few_rows_limit and not w.requires_grad:
            return F.linear(x, layer.few_rows, layer.bias)
        if not (layer.onednn or w.is_mkldnn):
            return F.linear(x, w, layer.bias)
        if w.requires_grad:
            raise RuntimeError(f"{layer} runs on oneDNN, which cannot train its weight")
        return super().apply(layer, x)

    def kernel(self, layer, x):
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        if n <= WARM_ROWS:
            return _onednn_linear(x, layer.weight, layer.bias)
        # More rows are padded to one of eight row counts per doubling (at most 1/8 more
        # rows): oneDNN keeps a kernel per row count (up to 1024, each holding scratch
        # memory that grows with its rows), so prompts of ever-new lengths grew a process
        # for as long as new lengths came (docs/performance.md, memory).
        step = 1 << (n.bit_length() - 4)
        padded = rows.new_zeros((-(-n // step) * step, rows.shape[1]))
        padded[:n] = rows
        out = _onednn_linear(padded, layer.weight, layer.bias)[:n]
        return out.view(*x.shape[:-1], out.shape[-1])

    def dequantize(self, layer):
        return dense(layer.weight)

    def fused(self, parts):
        return {"weight": torch.cat([dense(p.weight) for p in parts])}


def _act_dtype(device: torch.device) -> torch.dtype:
    # torch's weight-only CPU kernels are fast with bf16 activations only (int8 x fp32:
    # 8x slower than with bf16 here, 10x on the AVX2 box; benchmarks/linear_formats.py).
    return torch.bfloat16


class Int8(LinearMethod):
    """int8 weights, one float32 scale per output channel (w = q * scale), on torch's
    `_weight_int8pack_mm` with bf16 activations."""

    name = "int8"
    extra = ("weight_scale",)

    def adopt(self, layer, tensors):
        super().adopt(layer, tensors)
        layer.register_buffer("scale_act", tensors["weight_scale"].to(_act_dtype(layer.weight.device)), persistent=False)

    def kernel(self, layer, x):
        act = layer.scale_act.dtype
        out = torch.ops.aten._weight_int8pack_mm(x.to(act), layer.weight, layer.scale_act)
        if layer.bias is not None:
            out = out + layer.bias.to(act)
        return out.to(x.dtype)

    def dequantize(self, layer):
        return layer.weight.float() * layer.weight_scale[:, None]


class Int4(LinearMethod):
    """int4 weights in groups of `INT4_GROUP` inputs, w = (q - 8) * scale + zero per group,
    in torch's CPU int4 layout (`_convert_weight_to_int4pack_for_cpu`: [out, in / 2]
    bytes, rows independent) on `_weight_int4pack_mm_for_cpu` with bf16 activations.
    weight_scale_zeros: [in / group, out, 2] bf16 (the kernel's own)."""

    name = "int4"
    extra = ("weight_scale_zeros",)

    def kernel(self, layer, x):
        sz = layer.weight_scale_zeros
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(sz.dtype), layer.weight, self.group(layer), sz)
        if layer.bias is not None:
            out = out + layer.bias.to(sz.dtype)
        return out.to(x.dtype)

    @staticmethod
    def group(layer) -> int:
        return layer.in_features // layer.weight_scale_zeros.shape[0]

    def dequantize(self, layer):
        # The kernel applied to the identity: exact codes and scales, no second unpacker to keep in step.
        eye = torch.eye(layer.in_features, dtype=layer.weight_scale_zeros.dtype, device=layer.weight.device)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, layer.weight, self.group(layer), layer.weight_scale_zeros)
        return out.t().float()

    def fused(self, parts):
        sz = torch.cat([p.weight_scale_zeros for p in parts], 1)
        if all(p.out_features % INT4_PACK_ROWS == 0 for p in parts):
            return {"weight": torch.cat([p.weight for p in parts]), "weight_scale_zeros": sz}
        # Packed rows are interleaved within blocks of 64: repack the codes, recovered exactly
        # from the dequantized weights (w - zero) / scale + 8 is an integer up to bf16 rounding.
        w = torch.cat([self.dequantize(p) for p in parts])
        scale, zero = (t.float().t().repeat_interleave(self.group(parts[0]), 1) for t in sz.unbind(-1))
        codes = ((w - zero) / scale + 8).round().clamp(0, 15)
        return int4_tensors(codes, sz[..., 0].t(), sz[..., 1].t())


DENSE, INT8, INT4 = Dense(), Int8(), Int4()
METHODS = (INT8, INT4)  # told apart by their extra tensors; Dense has none


def method_of(names) -> LinearMethod:
    """The format of a layer whose state_dict holds these tensor names (unprefixed)."""
    for method in METHODS:
        if all(n in names for n in method.extra):
            return method
    return DENSE


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric per-row int8 of a [rows, cols] weight: the linear format and the embedding's."""
    w = w.float()
    scale = (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return {"weight": (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), "weight_scale": scale}


def int4_tensors(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, torch.Tensor]:
    """The Int4 tensors of codes [out, in] in 0..15 with w = (q - 8) * scale + zero, scale
    and zero [out, in / group]."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return {"weight": packed, "weight_scale_zeros": sz}


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> dict[str, torch.Tensor]:
    """Asymmetric int4 per group of inputs (min/max), as GGUF's Q4_1."""
    rows, cols = w.shape
    if cols % group:
        raise ValueError(f"int4 needs the input size ({cols}) to be a multiple of {group}")
    g = w.float().view(rows, cols // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    codes = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).view(rows, cols)
    return int4_tensors(codes, scale, lo + 8 * scale)


def quantize(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """A linear weight's tensors in a weight format (float32, bfloat16, float16, int8, int4)."""
    if fmt in DENSE_FORMATS:
        return {"weight": w.to(DENSE_FORMATS[fmt])}
    if fmt == "int8":
        return quantize_int8(w)
    if fmt == "int4":
        if w.shape[0] % INT4_MIN_ROWS or w.shape[1] % INT4_GROUP:
            log.info("a %dx%d weight is stored int8: torch's int4 layout needs rows in multiples of %d and inputs "
                     "in multiples of %d", *w.shape, INT4_MIN_ROWS, INT4_GROUP)
            return quantize_int8(w)
        return quantize_int4(w)
    raise ValueError(f"weight format must be one of {', '.join(WEIGHT_FORMATS[1:])}, not {fmt!r}")


class Linear(nn.Linear):
    """`nn.Linear` in any weight format (`method`, read off the tensors it loads).

    Dense weights can run on oneDNN's CPU matmul (`use_onednn`).
    On CPU torch's dense linear goes to MKL, which on some CPUs (AMD's, measured in
    docs/performance.md) reads the weights of a one-to-sixteen-row product at half the
    memory bandwidth oneDNN reaches; oneDNN is faster still with the weight reordered
    into its blocked layout ("packed": same bytes, replacing the dense tensor).  A packed
    weight always runs on oneDNN (also in a shard loaded from this one's state_dict);
    `onednn` sends a dense one there too.  On other CPUs (Intel's here) MKL is the faster one
    at one or two rows: `few_rows`, a dense copy kept beside the packed weight (a buffer, so
    it counts in `resident_bytes`), runs products of at most `few_rows_limit` rows on torch's
    (`apply_linear_kernel`'s "mixed")."""

    onednn = False
    few_rows_limit = 0
    method: LinearMethod = DENSE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        method = method_of({k[len(prefix):] for k in state_dict if k.startswith(prefix)})
        if method is not DENSE:
            method.adopt(self, {n: state_dict[prefix + n] for n in ("weight", *method.extra)})
        super()._load_from_state_dict(state_dict, prefix, *args)
        w, bias = self.weight, self.bias
        if method is DENSE and bias is not None and not w.is_meta and bias.dtype != w.dtype:
            self.bias = nn.Parameter(bias.to(w.dtype), requires_grad=False)  # the kernels add it in the weight's dtype

    def tie(self, embedding: "Embedding") -> None:
        """Share the embedding's weight (and its int8 scales) as this LM head's."""
        scale = getattr(embedding, "weight_scale", None)
        if scale is None:
            self.weight = embedding.weight
        else:
            INT8.adopt(self, {"weight": embedding.weight, "weight_scale": scale})


class Embedding(nn.Embedding):
    """`nn.Embedding` whose table may be int8 with a scale per row: a lookup dequantizes
    only the rows it gathers.  Rows come out in `dtype` (the side's activations)."""

    dtype: torch.dtype | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight)
        scale = getattr(self, "weight_scale", None)
        if scale is not None:
            rows = rows.float() * scale[ids, None]
        return rows.to(self.dtype or rows.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        if prefix + "weight_scale" in state_dict:
            self.weight = nn.Parameter(state_dict[prefix + "weight"], requires_grad=False)
            self.register_buffer("weight_scale", state_dict[prefix + "weight_scale"])
        super()._load_from_state_dict(state_dict, prefix, *args)


def onednn_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear runs here: a CPU build of torch with oneDNN, a dtype it
    computes in (probed with one tiny product, so a CPU without the instructions for bf16
    says no)."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.ones(1, 32, dtype=dtype), torch.ones(16, 32, dtype=dtype)
        out = _onednn_linear(x, torch.ops.mkldnn._reorder_linear_weight(w, 1), None)
    except RuntimeError:
        return False
    return bool((out == 32).all())


# The batch-size hint oneDNN picks its weight layout for: measured on 1-40-row products
# of SmolLM2's shapes, 64 was fastest at every size (docs/performance.md).
PACK_HINT_ROWS = 64


def use_onednn(shard: nn.Module, copy_shared: bool = False) -> None:
    """Run every `Linear` of a frozen (inference) shard on oneDNN, packing its weight
    unless another module shares it: the LM head tied to the embedding stays dense (which
    oneDNN also reads, at about half the speed at 8-16 rows), or with `copy_shared` gets
    a packed copy of its own (more memory: the embedding's size).  Already-packed weights
    (an adapted shard's untouched ones, shared with the base) stay as they are."""
    linears = dense_linears(shard)
    users: dict[int, int] = {}
    for m in shard.modules():
        for p in m.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    for m in linears:
        if not m.weight.is_mkldnn and (users[id(m.weight)] == 1 or copy_shared):
            m.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), PACK_HINT_ROWS),
                                    requires_grad=False)
        m.onednn = True


LINEAR_KERNELS = ("auto", "onednn", "mixed", "torch")
NO_DENSE_WEIGHTS = "none (no dense weights)"  # what a quantized shard's linears run on: their format's kernel


def apply_linear_kernel(shard: nn.Module, kernel: str, device: torch.device | str, copy_shared: bool = False) -> str:
    """Put an inference shard's linears on `kernel`; returns the one in use.  onednn: packed
    oneDNN weights; mixed: those plus dense copies for the few-row products where torch's
    (MKL) measures faster here (twice the weights' memory); auto: mixed where that
    measurement finds torch's at least 10% faster at one row and the copies take at most a
    quarter of the memory available, else onednn, and torch's where oneDNN does not run.
    `copy_shared`: see `use_onednn`.  Call it before merging adapters
    into the shard (merged weights get no dense copies)."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"linear kernel must be one of {', '.join(LINEAR_KERNELS)}, not {kernel!r}")
    linears = dense_linears(shard)
    if not linears:
        return NO_DENSE_WEIGHTS
    dtype = linears[0].weight.dtype
    if kernel == "torch" or not onednn_available(device, dtype):
        if kernel in ("onednn", "mixed"):
            raise ValueError(f"oneDNN's linear does not run on {device} with {dtype} here (--linear-kernel torch or auto)")
        return "torch"
    dense_weights = {m: m.weight for m in linears if not m.weight.is_mkldnn}
    use_onednn(shard, copy_shared)
    if kernel == "onednn":
        return "onednn"
    if kernel == "auto":
        extra = sum(w.nbytes for m, w in dense_weights.items() if m.weight.is_mkldnn)  # kept beside a packed copy
        free = available_memory()
        if free is not None and extra > free // 4:
            log.info("linear kernel auto: onednn (dense copies of %.0f MB would take over a quarter of the "
                     "%.0f MB of memory available)", extra / 1e6, free / 1e6)
            return "onednn"
    limit = few_rows_limit(dense_weights)
    if kernel == "auto" and limit == 0:
        return "onednn"
    for m, w in dense_weights.items():
        m.register_buffer("few_rows", w.detach(), persistent=False)  # the packed weight's dense original
        m.few_rows_limit = max(limit, 1)
    return "mixed"


def dense_linears(shard: nn.Module) -> list[Linear]:
    return [m for m in shard.modules() if isinstance(m, Linear) and m.method is DENSE]


def loaded_format(shard: nn.Module) -> str:
    """The weight format a loaded shard's linears hold, named as `--weights` names it: int4
    or int8 where any linear has it (a GGUF file's own formats mix), else its dense weights'
    dtype."""
    methods = {m.method.name for m in shard.modules() if isinstance(m, Linear)}
    for fmt in ("int4", "int8"):
        if fmt in methods:
            return fmt
    dtypes = {m.weight.dtype for m in dense_linears(shard)}
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        if dtype in dtypes:
            return name
    return "float32"


def available_memory() -> int | None:
    """Bytes of physical memory available now (None where the OS does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# (rows, minimum speed-up) `few_rows_limit` tries in turn: a dense copy costs the weights'
# memory again, so it has to win clearly.
FEW_ROWS_TRIALS = ((1, 1.1), (2, 1.05), (3, 1.05), (4, 1.05), (8, 1.05))


def few_rows_limit(dense_weights: dict["Linear", torch.Tensor], repeats: int = 3) -> int:
    """The most rows up to which torch's dense product beats the packed oneDNN one over all
    these linears, timed here, each kernel's best of `repeats` interleaved passes (a pass
    reads every weight once: from memory, as when serving); 0 where it does not win at one
    row.  About 0.4 s for the middle blocks of SmolLM2-135M.

    Timed on a thread of its own that then ends: the products run in parallel, and the
    OpenMP team a thread makes for that lives as long as the thread (fedsea_shared.threads:
    a second live team makes every parallel region of the serving thread wake its workers
    through the kernel; a calibration on the loading thread cost 15% of tokens/s)."""
    if not dense_weights:
        return 0
    found: list[int] = []
    thread = threading.Thread(target=lambda: found.append(_time_few_rows(dense_weights, repeats)),
                              name="fedsea-linear-calibration")
    thread.start()
    thread.join()
    if not found:
        raise RuntimeError("timing the linears failed (see the thread's traceback above)")
    return found[0]


def _time_few_rows(dense_weights: dict["Linear", torch.Tensor], repeats: int) -> int:
    limit = 0
    with torch.inference_mode():
        for rows, speedup in FEW_ROWS_TRIALS:
            inputs = {m: torch.zeros(rows, m.in_features, dtype=w.dtype) for m, w in dense_weights.items()}
            best = {"dense": float("inf"), "packed": float("inf")}
            for _ in range(repeats):
                for kind in best:
                    t0 = time.perf_counter()
                    for m, w in dense_weights.items():
                        x = inputs[m]
                        F.linear(x, w, m.bias) if kind == "dense" else _onednn_linear(x, m.weight, m.bias)
                    best[kind] = min(best[kind], time.perf_counter() - t0)
            log.info("linears at %d rows: torch's dense %.2f ms, oneDNN's packed %.2f ms", rows,
                     best["dense"] * 1e3, best["packed"] * 1e3)
            if best["packed"] < speedup * best["dense"]:
                break
            limit = rows
    return limit


# Row counts whose oneDNN kernels a serving thread builds before its first batch: decode
# batches of up to 64 sessions and prompt chunks of up to 64 tokens (longer ones are few
# and cost far more than the build).
WARM_ROWS = 64


def warm_linear_kernels(shard: nn.Module, max_rows: int = WARM_ROWS) -> None:
    """Build the oneDNN kernels of the shard's product shapes for 1..max_rows rows.

    oneDNN builds (JIT-compiles) a kernel the first time a shape runs, about 1 ms per
    shape here: every new prompt length or batch size paid that once per linear shape on
    the serving path (a 24-token prefill of the middle blocks took 62 ms cold, 37 warm).  Its cache is
    keyed by the calling thread's OpenMP thread count too, so call this on the thread that
    runs the forward passes.  No-op for a shard on torch's linears; a failure is logged
    (the kernels are then built on first use), never raised into a serving thread."""
    seen: dict[tuple, Linear] = {}
    for m in shard.modules():
        if isinstance(m, Linear) and (m.onednn or m.weight.is_mkldnn):
            seen.setdefault((m.in_features, m.out_features, m.bias is not None, m.weight.is_mkldnn), m)
    try:
        with torch.inference_mode():
            for m in seen.values():
                for rows in range(1, max_rows + 1):
                    m(torch.zeros(rows, m.in_features, dtype=m.weight.dtype))
    except Exception:
        log.exception("building the oneDNN kernels ahead failed; they are built on first use")


class FusedLinear(Linear):
    """Linears that read the same input, as one product whose output is split back into
    theirs (a block's q/k/v, its gate/up).  At one to sixteen rows a product costs ~10 us
    however small, and the small ones read their weights far below the memory bandwidth
    (576x192: 19 GB/s, 576x960: 33, 576x3072: 41 here), so one call for q, k and v and one
    for gate and up took the one-row tick of the middle blocks from 15.5 to 14.0 ms
    (docs/performance.md).  Made by `fuse_projections`; in its parts' format, packed or dense
    as they were (parts in different formats, an adapter's merged q beside a quantized k,
    fuse dense)."""

    def __init__(self, parts: list[Linear]):
        first = parts[0]
        if any(p.in_features != first.in_features for p in parts):
            raise ValueError("only linears over the same input can be fused")
        self.sizes = [p.out_features for p in parts]
        super().__init__(first.in_features, sum(self.sizes), bias=any(p.bias is not None for p in parts), device="meta")
        biases = [p.bias for p in parts if p.bias is not None]
        if biases:
            self.bias = nn.Parameter(torch.cat([p.bias if p.bias is not None else biases[0].new_zeros(p.out_features)
                                                for p in parts]), requires_grad=False)
        method = first.method
        if any(p.method is not method for p in parts):
            dtype = next(p.weight.dtype for p in parts if p.method is DENSE)
            self.weight = nn.Parameter(torch.cat([p.method.dequantize(p).to(dtype) for p in parts]), requires_grad=False)
            self.onednn = first.onednn
            return
        if method is not DENSE:
            method.adopt(self, method.fused(parts))
            return
        packed = first.weight.is_mkldnn
        weight = DENSE.fused(parts)["weight"]
        if first.few_rows_limit:  # the dense copy stays, fused as well
            self.register_buffer("few_rows", weight, persistent=False)
            self.few_rows_limit = first.few_rows_limit
        if packed:
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_HINT_ROWS)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.onednn = first.onednn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.product(x).split(self.sizes, -1)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """The parts' outputs side by side, unsplit."""
        return super().forward(x)


def uses_onednn(shard: nn.Module) -> bool:
    return any(m.onednn for m in shard.modules() if isinstance(m, Linear))


def dense(weight: torch.Tensor) -> torch.Tensor:
    """A weight in the plain layout (a copy only if `use_onednn` packed it)."""
    return weight.to_dense() if weight.is_mkldnn else weight


def address(t: torch.Tensor) -> int:
    """Where a tensor's data starts, the same for every tensor object over that data (a
    Parameter, a state_dict entry), packed oneDNN weights included."""
    return torch.ops.mkldnn.data_ptr(t) if t.is_mkldnn else t.data_ptr()


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), which torch's int8
    and int4 CPU kernels need to be fast: they take bf16 activations, emulated elsewhere."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell, so no
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def resolve_weights(weights: str, device: torch.device | str, side: str, gguf: bool = False,
                    stored: torch.dtype | None = None) -> str:
    """The weight format a side stores its linears in: `weights`, or for auto the policy
    below; logged, so an operator sees what each side chose.

    auto: a GGUF file's tensors in the formats matching their types ("file": Q8_0 int8,
    Q4_0/Q4_1 int4, see fedsea_shared.loading); a checkpoint stored in bfloat16 or float16
    (`stored`, config.json's dtype: most published Llama 3, Qwen2 and Mistral checkpoints) in
    that dtype, since widening it to float32 doubles the memory and adds no precision (vLLM's
    dtype auto keeps it too).  A float32 checkpoint: int4 on a CPU with native bf16, the
    fastest format there at 1-16 clients and half float32's memory, for +0.2-0.4% perplexity
    on the default model (whose float32 weights are its Q4_1 GGUF's, so int4 reproduces
    them; docs/performance.md); float32 elsewhere (the quantized kernels are emulated, so
    slower) and on accelerators.  float32 is the one format exact against `transformers`:
    ask for it by name (or $FEDSEA_WEIGHTS) where that matters."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights (--weights or $FEDSEA_WEIGHTS) must be one of {', '.join(WEIGHT_FORMATS)}, not {weights!r}")
    kept = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
    fast = "int4" if torch.device(device).type == "cpu" and native_bf16_cpu() else "float32"
    chosen = weights if weights != "auto" else "file" if gguf else kept.get(stored, fast)
    log.info("%s weights: %s%s", side, "as the GGUF file stores them" if chosen == "file" else chosen,
             " (auto)" if weights == "auto" else "")
    return chosen

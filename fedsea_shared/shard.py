"""LLaMA-family model shards: which decoder blocks a side holds, and how it runs them.

Both sides run the same `DecoderBlock` code, so a split forward computes exactly what the
centralized model computes.  Tensors are flat: `hidden` is [tokens, hidden_size] for all
sequences of a batch back to back, and attention is delegated to an `AttentionFn` that
each runtime implements over its own KV cache (the edge: per-sequence buffers; the
server: the paged pool).  Parameter names follow the Hugging Face checkpoint
(`model.layers.7.self_attn.q_proj.weight`) so a shard loads straight from safetensors.
What a model family changes in the block (biases, rotary embedding) comes from the
registry, `fedsea_shared.architectures`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from .architectures import architecture_of, load_config

log = logging.getLogger("fedsea.shard")


@dataclass(frozen=True)
class Partition:
    """Where the model is cut: the edge keeps `head` blocks before and `tail` blocks after
    the server's range [head, num_layers - tail)."""

    num_layers: int
    head: int
    tail: int

    def __post_init__(self) -> None:
        if self.head < 1 or self.tail < 1:
            raise ValueError(f"head and tail must each be >= 1 (got head={self.head}, tail={self.tail})")
        if self.head + self.tail >= self.num_layers:
            raise ValueError(
                f"head={self.head} + tail={self.tail} leaves no block for the server "
                f"(the model has {self.num_layers} blocks)"
            )

    @property
    def server_range(self) -> tuple[int, int]:
        return self.head, self.num_layers - self.tail

    @property
    def head_layers(self) -> range:
        return range(0, self.head)

    @property
    def server_layers(self) -> range:
        return range(*self.server_range)

    @property
    def tail_layers(self) -> range:
        return range(self.num_layers - self.tail, self.num_layers)


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class AttentionFn(Protocol):
    """Attention over a runtime's own KV cache for the tokens of one flat batch.

    q: [tokens, num_heads, head_dim]; k, v: [tokens, num_kv_heads, head_dim], already
    rotated.  The callee stores k/v in its cache and returns [tokens, num_heads * head_dim].
    """

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence's attention: q holds the last q_len positions of the k/v context.

    q: [q_len, heads, d]; k, v: [ctx_len, kv_heads, d] -> [q_len, heads * d].  The causal
    mask is rebuilt from lengths alone, which is why no mask ever crosses the wire.
    """
    q_len, ctx_len = q.shape[0], k.shape[0]
    mask = None
    if q_len > 1:
        mask = torch.ones(q_len, ctx_len, dtype=torch.bool, device=q.device).tril(diagonal=ctx_len - q_len)
    # 4-D (a batch of one): torch's CPU flash kernel takes only 4-D inputs; 3-D ones went
    # to the unfused math path, which also repeats K/V for the grouped heads.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask, scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1).reshape(q_len, -1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one new token per sequence over padded contexts, for many sequences in
    one kernel call.  q: [batch, heads, d]; k, v: [batch, ctx, kv_heads, d];
    valid: [batch, ctx] bool (False marks padding) -> [batch, heads * d]."""
    out = F.scaled_dot_product_attention(
        q[:, :, None], k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True,
    )
    return out.reshape(q.shape[0], -1)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _FrozenOneDNNLinear(torch.autograd.Function):
    """oneDNN's linear has no backward; a frozen weight needs only the input's gradient
    (LoRA training through the inference shard's packed weights, server_runtime's
    training service)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ dense(weight), None, None


class Linear(nn.Linear):
    """`nn.Linear` that can run on oneDNN's CPU matmul (`use_onednn`).

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.few_rows_limit and not self.weight.requires_grad:
            return F.linear(x, self.few_rows, self.bias)
        if not (self.onednn or self.weight.is_mkldnn):
            return F.linear(x, self.weight, self.bias)
        if self.weight.requires_grad:
            raise RuntimeError(f"{self} runs on oneDNN, which cannot train its weight")
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenOneDNNLinear.apply(x, self.weight, self.bias)
        return _onednn_linear(x, self.weight, self.bias)


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
    linears = [m for m in shard.modules() if isinstance(m, Linear)]
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
    dtype = next(shard.parameters()).dtype
    if kernel == "torch" or not onednn_available(device, dtype):
        if kernel in ("onednn", "mixed"):
            raise ValueError(f"oneDNN's linear does not run on {device} with {dtype} here (--linear-kernel torch or auto)")
        return "torch"
    dense_weights = {m: m.weight for m in shard.modules() if isinstance(m, Linear) and not m.weight.is_mkldnn}
    use_onednn(shard, copy_shared)
    if kernel == "onednn":
        return "onednn"
    if kernel == "auto":
        extra = sum(w.nbytes for m, w in dense_weights.items() if m.weight.is_mkldnn)  # kept beside a packed copy
        free = _available_memory()
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


def _available_memory() -> int | None:
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
    dtype = next(shard.parameters()).dtype
    try:
        with torch.inference_mode():
            for m in seen.values():
                for rows in range(1, max_rows + 1):
                    m(torch.zeros(rows, m.in_features, dtype=dtype))
    except Exception:
        log.exception("building the oneDNN kernels ahead failed; they are built on first use")


class FusedLinear(Linear):
    """Linears that read the same input, as one product whose output is split back into
    theirs (a block's q/k/v, its gate/up).  At one to sixteen rows a product costs ~10 us
    however small, and the small ones read their weights far below the memory bandwidth
    (576x192: 19 GB/s, 576x960: 33, 576x3072: 41 here), so one call for q, k and v and one
    for gate and up took the one-row tick of the middle blocks from 15.5 to 14.0 ms
    (docs/performance.md).  Made by `fuse_projections`; packed or dense as its parts were."""

    def __init__(self, parts: list[Linear]):
        first = parts[0]
        if any(p.in_features != first.in_features for p in parts):
            raise ValueError("only linears over the same input can be fused")
        self.sizes = [p.out_features for p in parts]
        super().__init__(first.in_features, sum(self.sizes), bias=any(p.bias is not None for p in parts), device="meta")
        packed = first.weight.is_mkldnn
        weight = torch.cat([dense(p.weight) for p in parts])
        if first.few_rows_limit:  # the dense copy stays, fused as well
            self.register_buffer("few_rows", weight, persistent=False)
            self.few_rows_limit = first.few_rows_limit
        if packed:
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_HINT_ROWS)
        self.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            self.bias = nn.Parameter(torch.cat([p.bias if p.bias is not None else first.weight.new_zeros(p.out_features)
                                                for p in parts]), requires_grad=False)
        self.onednn = first.onednn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.product(x).split(self.sizes, -1)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """The parts' outputs side by side, unsplit."""
        return super().forward(x)


# (submodule, fused name, the projections it replaces) in each DecoderBlock.
FUSED_PROJECTIONS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                     ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


def fuse_projections(shards: list[ModelShard]) -> None:
    """Replace every block's q/k/v and gate/up projections by one `FusedLinear` each, in
    inference shards (after `apply_linear_kernel` and after merging adapters: the
    per-projection weights are gone afterwards, so such a shard can no longer be merged
    with an adapter or trained with LoRA).  Shards that share a group's weights (an
    adapter's merged shard and its base, where the adapter leaves the group alone) share
    the fused weight too."""
    made: dict[tuple[int, ...], tuple[FusedLinear, list[Linear]]] = {}  # the parts kept alive: addresses stay unique
    for shard in shards:
        for block in shard.model.layers.values():
            for owner_name, fused_name, names in FUSED_PROJECTIONS:
                owner = getattr(block, owner_name)
                if getattr(owner, fused_name) is not None:
                    continue  # fused already (a shard listed twice)
                parts = [getattr(owner, n) for n in names]
                key = tuple(address(p.weight) for p in parts)
                if key not in made:
                    made[key] = FusedLinear(parts), parts
                setattr(owner, fused_name, made[key][0])
                for n in names:
                    delattr(owner, n)


def uses_onednn(shard: nn.Module) -> bool:
    return any(m.onednn for m in shard.modules() if isinstance(m, Linear))


def dense(weight: torch.Tensor) -> torch.Tensor:
    """A weight in the plain layout (a copy only if `use_onednn` packed it)."""
    return weight.to_dense() if weight.is_mkldnn else weight


class SelfAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim(config)
        self.scale = self.head_dim**-0.5
        qkv_bias, o_bias = architecture_of(config).attention_biases(config)
        h = config.hidden_size
        self.q_proj = Linear(h, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(h, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, h, bias=o_bias)
        self.qkv_proj: FusedLinear | None = None  # set by fuse_projections, replacing q/k/v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttentionFn,
                ops: "BlockOps") -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x) if self.qkv_proj is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = ops.rope(q, k, cos, sin)
        return self.o_proj(attend(self.layer, q, k, v))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of x [tokens, heads, d] with `ModelShard.rotary_tables`: transformers'
    x * cos + rotate_half(x) * sin, where rotate_half(x) * sin = roll(x, d/2) * the
    sin table with its first half negated, in three ops instead of eight."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm (transformers' LlamaRMSNorm) as torch's `rms_norm`; a block runs its
    two through its `BlockOps`."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class BlockOps:
    """A decoder block's operations between its products, in torch: the reference, and
    what runs wherever a fused kernel does not (autograd, other dtypes and devices).
    `cpu_kernels.NativeOps` and `VllmOps` replace them with fused kernels (`use_block_ops`)."""

    name = "torch"
    kernels = None  # the compiled library behind fused ops (cpu_kernels.load()), for attention to share

    def for_rows(self, x: torch.Tensor) -> "BlockOps":
        """The ops to run a block's forward of hidden states x with (these, or a fallback)."""
        return self

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return F.rms_norm(x, weight.shape, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual sum x + delta, and its norm."""
        x = x + delta
        return x, self.rms_norm(x, weight, eps)

    def rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: [tokens, heads, d], views of the block's q/k/v product (a kernel may
        rotate them in place)."""
        return rotate(q, cos, sin), rotate(k, cos, sin)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of a fused gate/up product [tokens, 2 * ff]."""
        gate, up = gate_up.chunk(2, -1)
        return F.silu(gate) * up


class VllmOps(BlockOps):
    """RMSNorm on vLLM's kernels (vllm must be installed): vLLM's `rms_norm` is one op
    where torch's runs as seven (2.3 vs 8.2 us for one row of 576 here); the same outputs
    to about one ulp.  vLLM's kernels have no backward."""

    name = "vllm"

    def __init__(self):
        from vllm import _custom_ops

        self.ops = _custom_ops

    def rms_norm(self, x, weight, eps):
        if torch.is_grad_enabled() and x.requires_grad:
            return super().rms_norm(x, weight, eps)
        out = torch.empty_like(x)
        self.ops.rms_norm(out, x.contiguous(), weight, eps)
        return out


BLOCK_OPS = ("auto", "native", "vllm", "torch")


def make_block_ops(kind: str, device: torch.device | str, dtype: torch.dtype, vllm: bool = False) -> BlockOps:
    """auto: the fused CPU kernels where they build and the shard is float32 on the CPU,
    else vLLM's norm where `vllm` says it is imported anyway (its attention backend), else
    torch's ops.  native and vllm fail loudly where they cannot run."""
    if kind not in BLOCK_OPS:
        raise ValueError(f"block ops must be one of {', '.join(BLOCK_OPS)}, not {kind!r}")
    if kind == "torch":
        return BlockOps()
    if kind == "vllm":
        return VllmOps()
    from . import cpu_kernels

    runs = torch.device(device).type == "cpu" and dtype == torch.float32
    lib = cpu_kernels.load() if runs else None
    if lib is not None:
        return cpu_kernels.NativeOps(lib)
    if kind == "native":
        raise ValueError(f"the fused CPU kernels do not run here ({device}, {dtype}; "
                         "float32 on a CPU with a C compiler): --block-ops torch or auto")
    return VllmOps() if vllm else BlockOps()


def use_block_ops(shard: nn.Module, ops: BlockOps) -> None:
    for m in shard.modules():
        if isinstance(m, DecoderBlock):
            m.ops = ops


class MLP(nn.Module):
    """LLaMA's gated MLP (as transformers' LlamaMLP, on `Linear`)."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        h, ff, bias = config.hidden_size, config.intermediate_size, getattr(config, "mlp_bias", False)
        self.gate_proj = Linear(h, ff, bias=bias)
        self.up_proj = Linear(h, ff, bias=bias)
        self.down_proj = Linear(ff, h, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self.silu = config.hidden_act == "silu"
        self.gate_up_proj: FusedLinear | None = None  # set by fuse_projections, replacing gate/up_proj

    def forward(self, x: torch.Tensor, ops: BlockOps) -> torch.Tensor:
        if self.gate_up_proj is not None and self.silu:
            return self.down_proj(ops.silu_mul(self.gate_up_proj.product(x)))
        gate, up = self.gate_up_proj(x) if self.gate_up_proj is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act_fn(gate) * up)


class DecoderBlock(nn.Module):
    ops = BlockOps()  # its small ops; use_block_ops puts an inference shard's on fused kernels

    def __init__(self, config: PretrainedConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = SelfAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttentionFn) -> torch.Tensor:
        ops, norm1, norm2 = self.ops.for_rows(x), self.input_layernorm, self.post_attention_layernorm
        delta = self.self_attn(ops.rms_norm(x, norm1.weight, norm1.eps), cos, sin, attend, ops)
        x, h = ops.add_rms_norm(x, delta, norm2.weight, norm2.eps)
        return x + self.mlp(h, ops)


class _Blocks(nn.Module):
    """Holds decoder blocks under their global indices, as `model.layers.<i>` does."""

    def __init__(self, config: PretrainedConfig, layers: list[int]):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): DecoderBlock(config, i) for i in layers})


class ModelShard(nn.Module):
    """The part of the model one side holds.  The edge holds embedding, head and tail
    blocks, final norm and LM head; the server holds only its range of blocks."""

    def __init__(self, config: PretrainedConfig, layers: list[int], with_edge_parts: bool):
        super().__init__()
        self.config = config
        self.model = _Blocks(config, layers)
        self.rotary = architecture_of(config).rotary_embedding(config)
        if with_edge_parts:
            self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.model.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def rotary_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin [tokens, 1, head_dim] for `rotate`, once per forward."""
        probe = torch.empty(0, dtype=dtype, device=positions.device)
        cos, sin = self.rotary(probe, positions[None])
        half = sin.shape[-1] // 2
        return cos[0, :, None], torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)[:, None]

    def run_blocks(
        self, layers: range, hidden: torch.Tensor, positions: torch.Tensor, attend: AttentionFn
    ) -> torch.Tensor:
        cos, sin = self.rotary_tables(positions, hidden.dtype)
        for i in layers:
            hidden = self.model.layers[str(i)](hidden, cos, sin, attend)
        return hidden

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(token_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden))


def shard_tensor_names(config: PretrainedConfig, layers: list[int], with_edge_parts: bool) -> list[str]:
    """The checkpoint tensors a shard needs, and no others."""
    shard = _meta_shard(config, layers, with_edge_parts)
    return [n for n in shard.state_dict() if not n.startswith("rotary.")]


def _meta_shard(config: PretrainedConfig, layers: list[int], with_edge_parts: bool) -> ModelShard:
    with torch.device("meta"):
        return ModelShard(config, layers, with_edge_parts)


def load_shard(
    model_dir: str | Path,
    layers: list[int],
    with_edge_parts: bool,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: PretrainedConfig | None = None,
) -> ModelShard:
    """Build a shard and read only its own tensors from the checkpoint's safetensors files.

    The module is created on the meta device, so tensors of other sides are never
    allocated, and each needed tensor is read by name from the file index.
    """
    model_dir = Path(model_dir)
    config = config or load_config(model_dir)
    shard = _meta_shard(config, layers, with_edge_parts)
    wanted = set(shard_tensor_names(config, layers, with_edge_parts))
    tied = with_edge_parts and config.tie_word_embeddings
    if tied:
        wanted.discard("lm_head.weight")
    state: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in wanted.intersection(f.keys()):
                state[name] = f.get_tensor(name).to(dtype)
    missing = wanted - state.keys()
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks tensors: {sorted(missing)[:5]}")
    shard.load_state_dict(state, strict=False, assign=True)
    if tied:
        shard.lm_head.weight = shard.model.embed_tokens.weight
    # Rotary tables are computed, not stored: rebuild them off the meta device.
    with torch.device(device):
        shard.rotary = architecture_of(config).rotary_embedding(config)
    return shard.eval().requires_grad_(False)


def edge_layers(partition: Partition) -> list[int]:
    return [*partition.head_layers, *partition.tail_layers]


def load_edge_shard(model_dir, partition: Partition, **kw) -> ModelShard:
    return load_shard(model_dir, edge_layers(partition), with_edge_parts=True, **kw)


def load_server_shard(model_dir, partition: Partition, **kw) -> ModelShard:
    return load_shard(model_dir, list(partition.server_layers), with_edge_parts=False, **kw)


def resident_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers, counting tied tensors once."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen[address(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def address(t: torch.Tensor) -> int:
    """Where a tensor's data starts, the same for every tensor object over that data (a
    Parameter, a state_dict entry), packed oneDNN weights included."""
    return torch.ops.mkldnn.data_ptr(t) if t.is_mkldnn else t.data_ptr()

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
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from .architectures import architecture_of, load_config

from . import loading
from .layers.tensor_parallel import TensorSplit
# The linear layer and its kernels live in layers.linear; re-exported for the runtimes.
from .layers.linear import (LINEAR_KERNELS, WEIGHT_FORMATS, Embedding, FusedLinear, Linear,  # noqa: F401
                            address, apply_linear_kernel, dense, onednn_available, resolve_weights, use_onednn,
                            uses_onednn, warm_linear_kernels)

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
            self.model.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
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
    weights: str | None = None,
    split: TensorSplit | None = None,
) -> ModelShard:
    """Build a shard and read only its own tensors from the checkpoint.

    The module is created on the meta device, so tensors of other sides are never
    allocated, and each needed tensor is read by name and stored in the weight format
    `weights` (`WEIGHT_FORMATS` without auto, see `resolve_weights`; default: dense in
    `dtype`, the side's activations) before the next is read.  `split`: a tensor-parallel
    rank's share of the blocks, of whose tensors only that part is read.
    """
    model_dir = Path(model_dir)
    config = config or load_config(model_dir)
    shard = _meta_shard(split.rank_config(config) if split else config, layers, with_edge_parts)
    linears = {f"{n}.weight" for n, m in shard.named_modules() if isinstance(m, Linear)}
    wanted = {n: n in linears for n in shard_tensor_names(config, layers, with_edge_parts)}
    fmt = weights or str(dtype).removeprefix("torch.")
    tied = with_edge_parts and config.tie_word_embeddings
    if tied:  # every format stores the embedding as the head (loading.role_format): one tensor for both
        del wanted["lm_head.weight"]
    state = loading.read_shard(model_dir, wanted, fmt, dtype, str(device), config,
                               split.slice_of if split else loading.whole)
    shard.load_state_dict(state, strict=False, assign=True)
    if with_edge_parts:
        shard.model.embed_tokens.dtype = dtype
    if tied:
        shard.lm_head.tie(shard.model.embed_tokens)
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



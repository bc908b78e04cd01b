"""One interface for the attention of a tick's prefill chunks and decode rows.

`build(plan)` turns the tick's `TickPlan` into the backend's metadata once per tick;
`attend(layer, q, k, v, metadata)` then runs once per layer: it writes the new tokens'
K/V into the pool (where and how is the backend's business: vLLM's kernels want their
own layout) and returns every new token's attention over its session's context.

Backends:
- "torch": K/V written by one index_copy per layer into the flat pool; decode rows
  through one `DecodeAttention` call (gather or flex, paged_attention.py); each prefill
  chunk through SDPA over its context gathered from the pool.
- "vllm": vLLM's paged-attention kernels, one varlen call per layer for all sequences
  (vllm_attention.py; needs vllm installed, imported only when chosen).

The pool's per-layer tensor shape is the backend's choice (`pool_layer_shape`), so a
pool is made for one backend.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedsea_shared.cpu_kernels import decode_attention_fits
from fedsea_shared.shard import causal_attention

from .kv_pool import KVPool
from .paged_attention import DecodeAttention, DecodeRows, make_decode_attention, padded_batch
from .tick_plan import TickPlan

BACKENDS = ("torch", "vllm")
log = logging.getLogger("fedsea.server.attention")


class AttentionBackend(Protocol):
    needs_clean_blocks: bool  # whether a block must be zeroed before its first write (the kernel reads whole blocks)

    def build(self, plan: TickPlan) -> Any:
        """Per-tick work shared by all layers (index tensors, masks, kernel schedules)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: Any) -> torch.Tensor:
        """layer: index into the pool; q: [tokens, heads, d]; k, v: [tokens, kv_heads, d].
        Stores k, v at the plan's slots and returns [tokens, heads * d]."""


@dataclass
class TorchMetadata:
    slots: torch.Tensor  # [tokens]: the plan's slot mapping
    decode_rows: torch.Tensor | None  # batch rows of the decode sequences (None: no decode row)
    padding: int  # extra rows the decode kernel's batch is padded with
    decode_plan: Any  # the DecodeAttention's plan of those rows
    prefill: list[tuple[int, int, torch.Tensor]]  # (first row, end row, context slots) per prefill chunk

    @property
    def all_decode(self) -> bool:
        """Every row is a decode row, in order: the kernel takes q and gives its output as they are."""
        return self.decode_rows is not None and not self.prefill


class TorchAttention:
    def __init__(self, pool: KVPool, scale: float, decode: DecodeAttention):
        self.pool = pool
        self.scale = scale
        self.decode = decode

    @property
    def needs_clean_blocks(self) -> bool:
        return self.decode.needs_clean_blocks

    def build(self, plan: TickPlan) -> TorchMetadata:
        device = plan.slot_mapping.device
        decode = [i for i in range(plan.num_seqs) if plan.is_decode(i)]
        prefill = [(*plan.rows(i), plan.context_slots(i).to(device)) for i in range(plan.num_seqs) if not plan.is_decode(i)]
        if not decode:
            return TorchMetadata(plan.slot_mapping, None, 0, None, prefill)
        n = len(decode)
        padded = padded_batch(n) if self.decode.pads_batch else n
        rows = DecodeRows.build([plan.block_tables[i] for i in decode], [plan.seq_lens[i] for i in decode],
                                self.pool, padded, device)
        decode_rows = torch.tensor([plan.query_start[i] for i in decode], device=device)
        return TorchMetadata(plan.slot_mapping, decode_rows, padded - n, self.decode.plan(rows), prefill)

    def attend(self, layer, q, k, v, metadata: TorchMetadata):
        self.pool.write(layer, metadata.slots, k, v)
        if metadata.all_decode:  # no gather of the rows, no scatter of the results
            return self._decode(layer, q, metadata)[: q.shape[0]]
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        if metadata.decode_rows is not None:
            rows = metadata.decode_rows
            out[rows] = self._decode(layer, q[rows], metadata)[: len(rows)]
        for a, b, ctx in metadata.prefill:
            kc, vc = self.pool.read(layer, ctx, q.dtype)
            out[a:b] = causal_attention(q[a:b], kc, vc, self.scale)
        return out

    def _decode(self, layer: int, q: torch.Tensor, metadata: TorchMetadata) -> torch.Tensor:
        if metadata.padding:
            q = torch.cat([q, q.new_zeros(metadata.padding, *q.shape[1:])])
        return self.decode.attend(metadata.decode_plan, q, self.pool.k[layer], self.pool.v[layer])


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, block_size: int, head_dim: int) -> str:
    """"auto": vllm where it is installed and its CPU kernels fit the pool (measured faster
    than torch there, see docs/performance.md), else torch.  Other names pass through."""
    if backend != "auto":
        return backend
    if device.type != "cpu" or importlib.util.find_spec("vllm") is None:
        return "torch"
    from .vllm_attention import VllmAttention

    try:
        reason = VllmAttention.cpu_unsupported(dtype, block_size, head_dim)
    except ImportError as e:  # installed but broken: say so, serve anyway
        reason = f"vllm does not import ({e})"
    if reason:
        log.info("attention backend auto: torch (%s)", reason)
        return "torch"
    return "vllm"


def pool_layer_shape(backend: str, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                     device: torch.device) -> tuple[int, ...] | None:
    """The backend's tensor shape for one layer of the pool, `num_blocks` counting the
    scratch block; None: the pool's own flat layout [slots, kv_heads, head_dim]."""
    if backend == "torch":
        return None
    if backend == "vllm":
        from .vllm_attention import VllmAttention

        return VllmAttention.layer_shape(num_blocks, block_size, num_kv_heads, head_dim, device)
    raise ValueError(f"unknown attention backend {backend!r} (one of {', '.join(BACKENDS)})")


def make_attention_backend(backend: str, pool: KVPool, scale: float, num_heads: int,
                           decode_attention: str = "gather", kernels=None) -> AttentionBackend:
    """`decode_attention` (gather | flex) picks the torch backend's decode kernel;
    `kernels` (fedsea_shared.cpu_kernels.load()) lets gather read short contexts with the
    fused CPU kernel where it takes the pool."""
    if backend == "torch":
        kv_heads, d = pool.k.shape[-2:]  # the torch backend's flat layout, [layers, slots, kv_heads, d]
        if kernels is not None and not decode_attention_fits(num_heads, kv_heads, d, pool.k.dtype, pool.k.device):
            kernels = None
        return TorchAttention(pool, scale, make_decode_attention(decode_attention, pool, scale, kernels))
    if backend == "vllm":
        from .vllm_attention import VllmAttention

        return VllmAttention(pool, scale, num_heads)
    raise ValueError(f"unknown attention backend {backend!r} (one of {', '.join(BACKENDS)})")

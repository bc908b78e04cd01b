"""Attention of a tick's decode rows (one new token per session) over the paged KV pool.

`DecodeRows` describes the rows once per tick: each row's page table (its blocks, in
order) and context length.  Two kernels read the pool through it:

- `GatherAttention` copies every row's context out of the pool into one padded batch and
  runs one SDPA call.  Nothing to compile, so no stall on a new batch size: the CPU
  default (the copy only costs more than FlexAttention at many long contexts, see README).
- `FlexPagedAttention` runs FlexAttention over the pool in place: the block mask lists
  each row's blocks, so the kernel reads exactly those blocks from the pool and copies
  nothing.  Compiled (Triton on CUDA, C++ on CPU) once per padded batch size, which is
  why its rows are padded to `BATCH_BUCKETS`: the CUDA default.

Padding rows point at the pool's scratch block with a context of one token, so a padded
batch is computed like a real one and its extra outputs are dropped.

Slots a row does not own (padding of its page table, the unwritten tail of its last
block) may hold anything another session left there, NaN and Inf included: a masked slot
must contribute exactly zero, and a zero softmax weight does not do that (0 * NaN is
NaN).  Gather selects zeros into those slots; the flex kernel cannot, so it reads only a
row's own blocks and the runner clears each block when a session first writes to it
(`needs_clean_blocks`).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from fedsea_shared.cpu_kernels import MAX_DECODE_CONTEXT, paged_decode_attention
from fedsea_shared.shard import causal_attention, decode_attention

from .kv_pool import KVPool

# Batch sizes compiled kernels (and CUDA graphs) are built for; vLLM captures a similar ladder.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def padded_batch(n: int) -> int:
    """The bucket a batch of n rows is padded to (multiples of 64 past the ladder)."""
    i = bisect.bisect_left(BATCH_BUCKETS, n)
    return BATCH_BUCKETS[i] if i < len(BATCH_BUCKETS) else -(-n // 64) * 64


@dataclass
class DecodeRows:
    page_table: torch.Tensor  # [rows, width] int32: each row's blocks in order, 0 past its end
    lengths: torch.Tensor  # [rows] int32: tokens of context, the new one included

    @classmethod
    def build(cls, tables: list[list[int]], lengths: list[int], pool: KVPool, rows: int,
              device: torch.device) -> "DecodeRows":
        """Rows for `tables`, padded to `rows` with one-token rows on the scratch block."""
        width = max((len(t) for t in tables), default=1)
        padding = [[pool.scratch_block] + [0] * (width - 1)] * (rows - len(tables))
        page_table = torch.tensor([t + [0] * (width - len(t)) for t in tables] + padding, dtype=torch.int32)
        padded = torch.tensor(lengths + [1] * (rows - len(lengths)), dtype=torch.int32)
        return cls(page_table.to(device), padded.to(device))


class KernelFailure(RuntimeError):
    """A compiled decode kernel failed to build, capture or run on this device."""


class DecodeAttention(Protocol):
    pads_batch: bool  # whether DecodeRows must be padded to a bucket
    needs_clean_blocks: bool  # whether the unwritten slots of a row's last block must be finite

    def plan(self, rows: DecodeRows) -> Any:
        """Per-tick work shared by all layers (index tensors, masks)."""

    def attend(self, plan: Any, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q: [rows, heads, d]; k_cache, v_cache: one layer of the pool, [slots, kv_heads, d].
        Returns [rows, heads * d]."""


@dataclass
class _FusedRows:
    tables: torch.Tensor  # [rows, width] int64
    lengths: torch.Tensor  # [rows] int64


class GatherAttention:
    pads_batch = False
    needs_clean_blocks = False

    def __init__(self, block_size: int, scale: float, kernels=None):
        """`kernels`: the fused CPU kernels' library (cpu_kernels.load()), for ticks whose decode
        rows hold at most cpu_kernels.MAX_DECODE_CONTEXT tokens in all; None: gather + SDPA."""
        self.block_size = block_size
        self.scale = scale
        self.kernels = kernels

    def plan(self, rows: DecodeRows) -> tuple[torch.Tensor, torch.Tensor | int, torch.Tensor | None] | _FusedRows:
        if self.kernels is not None and int(rows.lengths.sum()) <= MAX_DECODE_CONTEXT:
            return _FusedRows(rows.page_table.long(), rows.lengths.long())
        if rows.page_table.shape[0] == 1:
            # A lone stream: its context is read up to its length, so nothing is masked
            # (no zeroing, no mask in the kernel: 0.4-0.5 ms of a 13 ms one-row tick here).
            return rows.page_table[0].long(), int(rows.lengths[0]), None
        # Every block of the table's width, whatever the longest row; slots past a row's
        # length are read, then zeroed.  Whole blocks are gathered, not single slots:
        # one index per block_size tokens (measured 5-10x faster per layer on CPU).
        pos = torch.arange(rows.page_table.shape[1] * self.block_size, device=rows.lengths.device)
        valid = pos[None, :] < rows.lengths[:, None]
        # The masked slots by index, once per tick: zeroing only those is ~10x cheaper per
        # layer than a masked_fill over the whole gathered context (on CUDA, where gather is
        # only the fallback, nonzero costs one host sync per tick).
        masked = (~valid).flatten().nonzero().flatten()
        return rows.page_table.flatten().long(), valid, masked

    def attend(self, plan, q, k_cache, v_cache):
        if isinstance(plan, _FusedRows):
            return paged_decode_attention(self.kernels, q, k_cache, v_cache, plan.tables, plan.lengths,
                                          self.block_size, self.scale)
        blocks, valid, masked = plan
        by_block = (-1, self.block_size, *k_cache.shape[1:])
        k = k_cache.view(by_block).index_select(0, blocks).to(q.dtype)  # a narrower pool's, widened
        v = v_cache.view(by_block).index_select(0, blocks).to(q.dtype)
        if masked is None:  # one row, `valid` tokens long
            return causal_attention(q, k.flatten(0, 1)[:valid], v.flatten(0, 1)[:valid], self.scale)
        shape = (*valid.shape, *k_cache.shape[1:])
        k, v = k.view(shape), v.view(shape)
        # A select, so stale NaN/Inf in masked slots cannot leak.
        k.view(-1, *k.shape[2:]).index_fill_(0, masked, 0)
        v.view(-1, *v.shape[2:]).index_fill_(0, masked, 0)
        return decode_attention(q, k, v, valid, self.scale)


class FlexPagedAttention:
    pads_batch = True
    needs_clean_blocks = True  # the kernel weighs a partial block's masked slots by zero

    def __init__(self, pool: KVPool, scale: float):
        self.block_size = pool.block_size
        self.kernel_options = None
        if pool.k.device.type == "cuda":
            P = pool.block_size
            if P < 16 or P & (P - 1):
                raise ValueError(f"flex decode attention on CUDA needs --block-size a power of two >= 16 "
                                 f"(a Triton tile must divide a block), not {P}")
            # The Triton kernels' default KV tile (64-128 tokens) need not divide a block.
            self.kernel_options = {"fwd_BLOCK_N": min(P, 64)}
        self.num_blocks = pool.k.shape[1] // pool.block_size  # the scratch block included
        self.scale = scale
        self._threads = threading.local()
        # dynamic=False: one kernel per padded batch size (dynamic shapes do not lower on
        # the CPU backend, and CUDA graphs want static shapes anyway).
        self._flex = torch.compile(flex_attention, dynamic=False)

    def plan(self, rows: DecodeRows) -> BlockMask:
        """A block mask whose row b lists row b's blocks: all but the last as full blocks
        (no mask evaluated), the last as a partial block cut at the row's length."""
        table, lengths, P = rows.page_table, rows.lengths, self.block_size
        n, width = table.shape
        device = table.device
        used = (lengths + P - 1) // P
        full = lengths // P
        last_block = table.gather(1, (used - 1)[:, None].long())[:, 0]
        last_fill = lengths - (used - 1) * P
        full_idx = torch.zeros(n, 1, 1, self.num_blocks, dtype=torch.int32, device=device)
        full_idx[:, 0, 0, :width] = table
        part_idx = torch.zeros_like(full_idx)
        part_idx[:, 0, 0, 0] = last_block
        # owner[block] = the row holding it, so the mask is true exactly on a row's own
        # tokens even where a kernel evaluates it (entries past a row's end go to a dump slot).
        in_use = torch.arange(width, device=device)[None, :] < used[:, None]
        owner = torch.full((self.num_blocks + 1,), -1, dtype=torch.int32, device=device)
        row_ids = torch.arange(n, dtype=torch.int32, device=device)[:, None].expand(n, width)
        owner.scatter_(0, torch.where(in_use, table, self.num_blocks).flatten().long(), row_ids.flatten())

        def own_tokens(b, h, q_idx, kv_idx):
            block = kv_idx // P
            return (owner[block] == b) & ((block != last_block[b]) | (kv_idx % P < last_fill[b]))

        return BlockMask.from_kv_blocks(
            (used > full).to(torch.int32)[:, None, None], part_idx,
            full.to(torch.int32)[:, None, None], full_idx,
            BLOCK_SIZE=(128, P), mask_mod=own_tokens, seq_lengths=(1, self.num_blocks * P),
            compute_q_blocks=False,
        )

    def attend(self, plan, q, k_cache, v_cache):
        if not getattr(self._threads, "limit_raised", False):
            # Every padded batch size (and pool shape) is one more compiled variant of
            # flex_attention; past dynamo's default limit of 8 it would silently fall back
            # to the unfused path.  Dynamo's config is per thread: set it in the caller's.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._threads.limit_raised = True
        # The pool as one sequence of every slot: [1, kv_heads, slots, d], a view, no copy.
        k = k_cache.permute(1, 0, 2)[None]
        v = v_cache.permute(1, 0, 2)[None]
        # Contiguous q: one compiled variant per batch size, whichever path calls.
        try:
            out = self._flex(q.contiguous()[:, :, None], k, v, block_mask=plan, scale=self.scale,
                             enable_gqa=True, kernel_options=self.kernel_options)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            raise KernelFailure(f"flex attention: {e}") from e
        return out.reshape(q.shape[0], -1)


def make_decode_attention(kind: str, pool: KVPool, scale: float, kernels=None) -> DecodeAttention:
    """`kernels`: the fused CPU kernels, which gather uses for short contexts (the caller checks
    that they take the pool: cpu_kernels.decode_attention_fits)."""
    if kind == "gather":
        return GatherAttention(pool.block_size, scale, kernels)
    if kind == "flex":
        return FlexPagedAttention(pool, scale)
    raise ValueError(f"unknown decode attention {kind!r} (gather or flex)")

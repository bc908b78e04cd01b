"""Decode-only ticks as replays of CUDA graphs, one graph per padded batch size.

Once padded to a bucket, a decode tick always has the same shapes: B hidden states in,
B out, one new slot per row, page tables of a fixed width.  So its whole pass through
the middle blocks (projections, K/V writes into the pool, paged attention, MLPs of every
layer) is captured once per bucket into a CUDA graph and replayed: one launch per tick
instead of a dozen kernels and their Python per layer.  The graph reads its inputs from
static buffers that each tick fills, and the pool's K/V from fixed addresses, which is
why the attention must read the pool in place (`FlexPagedAttention`).

Every bucket is captured when the server starts (`capture_all`, largest first so the
smaller graphs reuse its memory), with all rows padding, which writes only the scratch
block; capturing lazily would stall live traffic for a compile per new batch size.

On a CPU there is nothing to capture; the same static-buffer path runs eagerly, which
is how the tests check padding and the scratch block without a GPU.
"""

from __future__ import annotations

import logging

import torch

from fedsea_shared.shard import ModelShard

from .kv_pool import KVPool
from .paged_attention import DecodeRows, FlexPagedAttention, KernelFailure, padded_batch

log = logging.getLogger("fedsea.server.graphs")


def graph_safe_rope(config) -> bool:
    """Dynamic RoPE variants recompute their frequencies from the longest position on the
    host each step: a host sync inside the graph, and a buffer swapped under it."""
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    return rope.get("rope_type", rope.get("type")) not in ("dynamic", "longrope")


class DecodeGraphs:
    def __init__(self, shard: ModelShard, layers: range, pool: KVPool, attention: FlexPagedAttention,
                 max_batch: int, max_context: int, device: torch.device):
        self.shard, self.layers, self.pool, self.attention = shard, layers, pool, attention
        self.max_batch = padded_batch(max_batch)
        self.capture = device.type == "cuda"
        width = min(-(-max_context // pool.block_size), pool.allocator.num_blocks)
        n, dtype = self.max_batch, next(shard.parameters()).dtype
        self.hidden = torch.zeros(n, shard.config.hidden_size, dtype=dtype, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.zeros(n, dtype=torch.long, device=device)
        self.page_table = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.lengths = torch.ones(n, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._memory_pool = torch.cuda.graph_pool_handle() if self.capture else None

    def fits(self, rows: int) -> bool:
        return rows <= self.max_batch

    def run(self, hidden: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            tables: list[list[int]], lengths: list[int]) -> torch.Tensor:
        """One decode token for each of `len(tables)` sessions; returns [rows, hidden]."""
        n = len(tables)
        b = padded_batch(n)
        self._fill(b, hidden, positions, slots, DecodeRows.build(tables, lengths, self.pool, b, self.hidden.device))
        if not self.capture:
            return self._forward(b)[:n]
        graph, output = self._graphs[b]  # every bucket up to max_batch, from capture_all
        graph.replay()
        return output[:n].clone()  # the static output is overwritten by the next replay

    def capture_all(self) -> None:
        """Capture every bucket, largest first, with all rows padding (on a CPU: run it)."""
        for b in sorted({padded_batch(n) for n in range(1, self.max_batch + 1)}, reverse=True):
            self._fill(b, self.hidden[:0], self.positions[:0], self.slots[:0],
                       DecodeRows.build([], [], self.pool, b, self.hidden.device))
            if self.capture:
                self._graphs[b] = self._capture(b)
            else:
                self._forward(b)

    def _fill(self, b: int, hidden: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
              rows: DecodeRows) -> None:
        """Rewrite the static inputs of bucket b: the real rows, then padding rows that
        read and write only the scratch block."""
        n = hidden.shape[0]
        self.hidden[:n].copy_(hidden)
        self.hidden[n:b].zero_()
        self.positions[:n].copy_(positions)
        self.positions[n:b].zero_()
        self.slots[:n].copy_(slots)
        self.slots[n:b].fill_(self.pool.scratch_block * self.pool.block_size)
        self.page_table[:b].zero_()
        self.page_table[:b, : rows.page_table.shape[1]].copy_(rows.page_table)
        self.lengths[:b].copy_(rows.lengths)

    def _forward(self, b: int) -> torch.Tensor:
        plan = self.attention.plan(DecodeRows(self.page_table[:b], self.lengths[:b]))
        slots = self.slots[:b]
        first = self.layers[0]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            local = layer - first
            self.pool.write(local, slots, k, v)
            return self.attention.attend(plan, q, self.pool.k[local], self.pool.v[local])

        return self.shard.run_blocks(self.layers, self.hidden[:b], self.positions[:b], attend)

    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up (compiles the kernels) on a side stream, then capture.  The warm-up
        runs on this tick's inputs, so it writes exactly the K/V the replay writes."""
        log.info("capturing the decode graph for batch %d", b)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._forward(b)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the training service may use the GPU from another thread meanwhile.
            with torch.cuda.graph(graph, pool=self._memory_pool, capture_error_mode="thread_local"):
                output = self._forward(b)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            raise KernelFailure(f"capturing the decode graph for batch {b}: {e}") from e
        return graph, output

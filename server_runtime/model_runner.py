"""Runs one scheduled tick through the middle blocks as a single flat batch.

All chunks' tokens are concatenated into one [tokens, hidden] tensor, so every linear
layer runs once per tick for all sessions, and each layer writes every new token's K/V
into the paged pool with one scatter.  Attention: all decode rows (one new token per
session) are served by one `DecodeAttention` call per layer; prefill chunks attend per
session over their gathered context (a prefill chunk's many queries amortise the copy).
A tick of decode rows only goes to `DecodeGraphs` when the runner has them (CUDA).

If the compiled path fails (a kernel that does not build on this device), the runner
logs it, falls back to gather + SDPA for good and reruns the tick: re-running rewrites
the same K/V, so no session is corrupted and the server keeps serving.
"""

from __future__ import annotations

import logging

import torch

from fedsea_shared.shard import ModelShard, causal_attention

from .decode_graphs import DecodeGraphs, graph_safe_rope
from .kv_pool import KVPool
from .paged_attention import (
    DecodeAttention, DecodeRows, FlexPagedAttention, GatherAttention, KernelFailure, make_decode_attention,
    padded_batch,
)
from .scheduler import Chunk

log = logging.getLogger("fedsea.server.runner")


class ModelRunner:
    def __init__(self, shard: ModelShard, layers: range, pool: KVPool, device: str | torch.device = "cpu",
                 decode_attention: str = "gather", decode_graphs: bool = False,
                 max_graph_batch: int = 64, max_context: int = 8192):
        self.shard = shard
        self.layers = layers
        self.pool = pool
        self.device = torch.device(device)
        self.dtype = next(shard.parameters()).dtype
        self.scale = shard.model.layers[str(layers[0])].self_attn.scale
        self.attention: DecodeAttention = make_decode_attention(decode_attention, pool, self.scale)
        self.graphs = self._decode_graphs(max_graph_batch, max_context) if decode_graphs else None

    def _decode_graphs(self, max_batch: int, max_context: int) -> DecodeGraphs | None:
        if not isinstance(self.attention, FlexPagedAttention):
            raise ValueError("decode graphs need the flex decode attention (it reads the pool in place)")
        if not graph_safe_rope(self.shard.config):
            log.warning("dynamic RoPE cannot run inside a CUDA graph: decode graphs off")
            return None
        graphs = DecodeGraphs(self.shard, self.layers, self.pool, self.attention, max_batch, max_context, self.device)
        if graphs.capture:
            try:
                with torch.inference_mode():
                    graphs.capture_all()
            except KernelFailure:
                self._fall_back()
                return None
        return graphs

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        try:
            return self._run(chunks)
        except KernelFailure:
            self._fall_back()
            return self._run(chunks)

    def _fall_back(self) -> None:
        log.exception("flex decode attention failed on %s; falling back to gather + SDPA "
                      "(pass --decode-attention gather to start that way)", self.device)
        self.attention, self.graphs = GatherAttention(self.pool.block_size, self.scale), None

    def _run(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        hidden = torch.cat([c.hidden for c in chunks]).to(self.device, self.dtype)
        spans, positions, new_slots = [], [], []
        decode_rows, decode_tables, decode_lengths, prefill = [], [], [], []
        offset = 0
        for c in chunks:
            lo, hi = c.positions
            spans.append((offset, offset + hi - lo))
            positions.append(torch.arange(lo, hi))
            if hi - lo == 1:  # the decode kernels find the context from the block table
                new_slots.append(c.session.table.slots(lo, hi))
                decode_rows.append(offset)
                decode_tables.append(c.session.table.blocks)
                decode_lengths.append(hi)
            else:
                ctx = c.session.table.slots(0, hi)  # the new tokens' slots are its tail
                new_slots.append(ctx[lo:])
                prefill.append((offset, offset + hi - lo, ctx.to(self.device)))
            offset += hi - lo
        pos = torch.cat(positions).to(self.device)
        slots = torch.cat(new_slots).to(self.device)
        if self.attention.needs_clean_blocks:
            self._clear_entered_blocks(chunks)
        if not prefill and self.graphs is not None and self.graphs.fits(len(chunks)):
            result = self.graphs.run(hidden, pos, slots, decode_tables, decode_lengths)
            return [result[a:b] for a, b in spans]
        if decode_rows:
            n = len(decode_rows)
            rows = torch.tensor(decode_rows, device=self.device)
            padded = padded_batch(n) if self.attention.pads_batch else n
            plan = self.attention.plan(DecodeRows.build(decode_tables, decode_lengths, self.pool, padded, self.device))
        first_layer = self.layers[0]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            local = layer - first_layer
            self.pool.write(local, slots, k, v)
            out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
            if decode_rows:
                qd = q[rows]
                if padded > n:
                    qd = torch.cat([qd, qd.new_zeros(padded - n, *qd.shape[1:])])
                out[rows] = self.attention.attend(plan, qd, self.pool.k[local], self.pool.v[local])[:n]
            for a, b, ctx in prefill:
                kc, vc = self.pool.read(local, ctx)
                out[a:b] = causal_attention(q[a:b], kc, vc, self.scale)
            return out

        result = self.shard.run_blocks(self.layers, hidden, pos, attend)
        return [result[a:b] for a, b in spans]

    def _clear_entered_blocks(self, chunks: list[Chunk]) -> None:
        """Zero the blocks this tick's chunks write first (fresh from the free list, where
        a closed session may have left NaN), in every layer, before anything reads them."""
        P = self.pool.block_size
        fresh = [b for c in chunks for b in c.session.table.blocks[-(-c.positions[0] // P):-(-c.positions[1] // P)]]
        if fresh:
            blocks = torch.tensor(fresh, device=self.device)
            slots = (blocks[:, None] * P + torch.arange(P, device=self.device)).flatten()
            self.pool.k.index_fill_(1, slots, 0)
            self.pool.v.index_fill_(1, slots, 0)

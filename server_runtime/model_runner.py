"""Runs one scheduled tick through the middle blocks as a single flat batch.

All chunks' tokens are concatenated into one [tokens, hidden] tensor, so every linear
layer runs once per tick for all sessions.  Attention is per session: each layer writes
the chunk's new K/V into the session's paged slots and attends over the session's slots
(on CPU: gather then SDPA, which the issue allows; see README for the CUDA plan).
"""

from __future__ import annotations

import torch

from fedsea_shared.shard import ModelShard, causal_attention

from .kv_pool import KVPool
from .scheduler import Chunk


class ModelRunner:
    def __init__(self, shard: ModelShard, layers: range, pool: KVPool, device: str | torch.device = "cpu"):
        self.shard = shard
        self.layers = layers
        self.pool = pool
        self.device = torch.device(device)
        self.dtype = next(shard.parameters()).dtype
        first = shard.model.layers[str(layers[0])].self_attn
        self.scale = first.scale

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        hidden = torch.cat([c.hidden for c in chunks]).to(self.device, self.dtype)
        spans, positions, new_slots, ctx_slots = [], [], [], []
        offset = 0
        for c in chunks:
            lo, hi = c.positions
            n = hi - lo
            spans.append((offset, offset + n))
            offset += n
            positions.append(torch.arange(lo, hi))
            new_slots.append(c.session.table.slots(lo, hi).to(self.device))
            ctx_slots.append(c.session.table.slots(0, hi).to(self.device))
        pos = torch.cat(positions).to(self.device)
        first_layer = self.layers[0]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            local = layer - first_layer
            out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
            for (a, b), new, ctx in zip(spans, new_slots, ctx_slots):
                self.pool.write(local, new, k[a:b], v[a:b])
                kc, vc = self.pool.read(local, ctx)
                out[a:b] = causal_attention(q[a:b], kc, vc, self.scale)
            return out

        result = self.shard.run_blocks(self.layers, hidden, pos, attend)
        return [result[a:b] for a, b in spans]

"""Runs one scheduled tick through the middle blocks as a single flat batch.

All chunks' tokens are concatenated into one [tokens, hidden] tensor, so every linear
layer runs once per tick for all sessions, and each layer writes every new token's K/V
into the paged pool with one scatter.  Attention: all decode rows (one new token per
session) are served by one call over their padded block-gathered contexts; prefill
chunks attend per session.  This is the CPU path (gather + SDPA); a CUDA deployment
wants a paged kernel that reads the blocks in place (see README).
"""

from __future__ import annotations

import torch

from fedsea_shared.shard import ModelShard, causal_attention, decode_attention

from .kv_pool import KVPool
from .scheduler import Chunk


class ModelRunner:
    def __init__(self, shard: ModelShard, layers: range, pool: KVPool, device: str | torch.device = "cpu"):
        self.shard = shard
        self.layers = layers
        self.pool = pool
        self.device = torch.device(device)
        self.dtype = next(shard.parameters()).dtype
        self.scale = shard.model.layers[str(layers[0])].self_attn.scale

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        hidden = torch.cat([c.hidden for c in chunks]).to(self.device, self.dtype)
        spans, positions, new_slots = [], [], []
        decode_rows, decode_ctx, prefill = [], [], []
        offset = 0
        for c in chunks:
            lo, hi = c.positions
            spans.append((offset, offset + hi - lo))
            positions.append(torch.arange(lo, hi))
            ctx = c.session.table.slots(0, hi)  # the new tokens' slots are its tail
            new_slots.append(ctx[lo:])
            if hi - lo == 1:
                decode_rows.append(offset)
                decode_ctx.append(ctx)
            else:
                prefill.append((offset, offset + hi - lo, ctx.to(self.device)))
            offset += hi - lo
        pos = torch.cat(positions).to(self.device)
        slots = torch.cat(new_slots).to(self.device)
        if decode_rows:
            rows = torch.tensor(decode_rows, device=self.device)
            ctx_index = torch.nn.utils.rnn.pad_sequence(decode_ctx, batch_first=True).to(self.device)
            lengths = torch.tensor([len(c) for c in decode_ctx], device=self.device)
            valid = torch.arange(ctx_index.shape[1], device=self.device)[None, :] < lengths[:, None]
        first_layer = self.layers[0]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            local = layer - first_layer
            self.pool.write(local, slots, k, v)
            out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
            if decode_rows:
                kc, vc = self.pool.read(local, ctx_index.flatten())
                shape = (*ctx_index.shape, *kc.shape[1:])
                out[rows] = decode_attention(q[rows], kc.view(shape), vc.view(shape), valid, self.scale)
            for a, b, ctx in prefill:
                kc, vc = self.pool.read(local, ctx)
                out[a:b] = causal_attention(q[a:b], kc, vc, self.scale)
            return out

        result = self.shard.run_blocks(self.layers, hidden, pos, attend)
        return [result[a:b] for a, b in spans]

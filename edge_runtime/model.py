"""The edge's model shard and its batched execution.

`EdgeModel` runs the head blocks (token ids -> hidden states to send) and the tail
blocks (hidden states received -> next-token logits) for many sequences at once, each
with its own `SequenceCache`.  `EdgeWorker` is the edge's counterpart of the server's
scheduler: concurrent generations submit work, and everything that arrived while the
previous batch ran is executed as one flat batch on a worker thread, so the event loop
never waits on the model and concurrent requests share each forward pass.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from fedsea_shared.shard import ModelShard, Partition, causal_attention


@dataclass
class SequenceCache:
    """K/V of one sequence for the edge's own layers, in buffers that double as they fill."""

    k: dict[int, torch.Tensor] = field(default_factory=dict)
    v: dict[int, torch.Tensor] = field(default_factory=dict)

    def extend(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[0]
        buf_k, buf_v = self.k.get(layer), self.v.get(layer)
        if buf_k is None or buf_k.shape[0] < end:
            size = max(end, 2 * (buf_k.shape[0] if buf_k is not None else 16))
            new_k = k.new_empty((size, *k.shape[1:]))
            new_v = v.new_empty((size, *v.shape[1:]))
            if buf_k is not None:
                new_k[:start], new_v[:start] = buf_k[:start], buf_v[:start]
            self.k[layer], self.v[layer] = buf_k, buf_v = new_k, new_v
        buf_k[start:end], buf_v[start:end] = k, v
        return buf_k[:end], buf_v[:end]

    def fork(self, length: int) -> "SequenceCache":
        """A private copy of positions [0, length): another choice, or a later turn,
        continues from there without touching this one."""
        twin = SequenceCache()
        for layer in self.k:
            twin.k[layer] = self.k[layer][:length].clone()
            twin.v[layer] = self.v[layer][:length].clone()
        return twin

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.k.values(), *self.v.values()))


@dataclass
class _Item:
    cache: SequenceCache
    start: int  # position of the first new token
    x: torch.Tensor  # token ids [n] (head) or hidden states [n, hidden] (tail)
    every: bool = False  # tail: logits of every position, not only the last (prompt logprobs)


class EdgeModel:
    def __init__(self, shard: ModelShard, partition: Partition):
        self.shard = shard
        self.partition = partition
        self.dtype = next(shard.parameters()).dtype
        self.scale = shard.model.layers[str(partition.head_layers[0])].self_attn.scale

    def _run(self, layers: range, items: list[_Item], hidden: torch.Tensor) -> tuple[torch.Tensor, list]:
        spans, positions, offset = [], [], 0
        for it in items:
            n = it.x.shape[0]
            spans.append((offset, offset + n))
            positions.append(torch.arange(it.start, it.start + n))
            offset += n

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
            for it, (a, b) in zip(items, spans):
                kc, vc = it.cache.extend(layer, it.start, k[a:b], v[a:b])
                out[a:b] = causal_attention(q[a:b], kc, vc, self.scale)
            return out

        return self.shard.run_blocks(layers, hidden, torch.cat(positions), attend), spans

    @torch.inference_mode()
    def head(self, items: list[_Item]) -> list[torch.Tensor]:
        """Token ids -> hidden states after the head blocks (what the server receives)."""
        hidden = self.shard.embed(torch.cat([it.x for it in items]))
        out, spans = self._run(self.partition.head_layers, items, hidden)
        return [out[a:b] for a, b in spans]

    @torch.inference_mode()
    def tail(self, items: list[_Item]) -> list[torch.Tensor]:
        """Middle-block outputs -> logits of each sequence's last token (float32), or
        [n, vocab] of all its tokens for an item that asks for every position."""
        hidden = torch.cat([it.x for it in items]).to(self.dtype)
        out, spans = self._run(self.partition.tail_layers, items, hidden)
        rows = [out[a:b] if it.every else out[b - 1 : b] for it, (a, b) in zip(items, spans)]
        logits = self.shard.logits(torch.cat(rows)).float().split([r.shape[0] for r in rows])
        return [l if it.every else l[0] for it, l in zip(items, logits)]


class EdgeWorker:
    """Batches concurrent head/tail requests and runs them off the event loop."""

    def __init__(self, model: EdgeModel, coalesce_s: float = 0.002):
        self.model = model
        self.coalesce_s = coalesce_s
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fedsea-edge")
        self._pending: dict[str, list[tuple[_Item, asyncio.Future]]] = {"head": [], "tail": []}
        self._running = False

    async def head(self, cache: SequenceCache, start: int, token_ids: torch.Tensor) -> torch.Tensor:
        return await self._submit("head", _Item(cache, start, token_ids))

    async def tail(self, cache: SequenceCache, start: int, hidden: torch.Tensor, every: bool = False) -> torch.Tensor:
        return await self._submit("tail", _Item(cache, start, hidden, every))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _submit(self, kind: str, item: _Item) -> torch.Tensor:
        fut = asyncio.get_running_loop().create_future()
        self._pending[kind].append((item, fut))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        # Replies for many sessions arrive frame by frame; linger a moment so the burst
        # becomes one batch rather than a first batch of one and a second of the rest.
        await asyncio.sleep(self.coalesce_s)
        try:
            while any(self._pending.values()):
                for kind in ("tail", "head"):
                    batch, self._pending[kind] = self._pending[kind], []
                    batch = [(it, f) for it, f in batch if not f.cancelled()]
                    if not batch:
                        continue
                    run = getattr(self.model, kind)
                    try:
                        results = await loop.run_in_executor(self._executor, run, [it for it, _ in batch])
                    except Exception as e:  # fail this batch's requests, keep serving
                        for _, fut in batch:
                            if not fut.done():
                                fut.set_exception(e)
                        continue
                    for (_, fut), result in zip(batch, results):
                        if not fut.done():
                            fut.set_result(result)
        finally:
            self._running = False

"""The edge's model shard and its batched execution.

`EdgeModel` runs the head blocks (token ids -> hidden states to send) and the tail
blocks (hidden states received -> next-token logits) for many sequences at once, each
with its own `SequenceCache`.  `EdgeWorker` is the edge's counterpart of the server's
scheduler: concurrent generations submit work, and everything that arrived while the
previous round ran is executed as one flat batch per kind on the worker's own thread, so
the event loop never waits on the model and concurrent requests share each forward pass.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from fedsea_shared.cpu_kernels import MAX_DECODE_CONTEXT, decode_attention_fits, paged_decode_attention
from fedsea_shared.shard import ModelShard, Partition, causal_attention, head_dim, warm_linear_kernels
from fedsea_shared.threads import run_here, serial


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
    def __init__(self, shard: ModelShard, partition: Partition, kernels=None):
        """`kernels`: the fused CPU kernels (cpu_kernels.load()), for a generated token's
        attention over its sequence's buffers (up to MAX_DECODE_CONTEXT tokens); None: SDPA
        for every item."""
        self.shard = shard
        self.partition = partition
        self.dtype = next(shard.parameters()).dtype
        self.scale = shard.model.layers[str(partition.head_layers[0])].self_attn.scale
        cfg, device = shard.config, next(shard.parameters()).device
        fits = decode_attention_fits(cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg), self.dtype, device)
        self.kernels = kernels if fits else None
        self._one_block = torch.zeros(1, 1, dtype=torch.long)  # a buffer read as one block of the cache

    def _run(self, layers: range, items: list[_Item], hidden: torch.Tensor) -> tuple[torch.Tensor, list]:
        spans, positions, offset = [], [], 0
        for it in items:
            n = it.x.shape[0]
            spans.append((offset, offset + n))
            positions.append(torch.arange(it.start, it.start + n))
            offset += n

        kernels = self.kernels

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
            for it, (a, b) in zip(items, spans):
                kc, vc = it.cache.extend(layer, it.start, k[a:b], v[a:b])
                if b - a == 1 and kernels is not None and kc.shape[0] <= MAX_DECODE_CONTEXT:
                    out[a:b] = paged_decode_attention(kernels, q[a:b], kc, vc, self._one_block,
                                                      torch.tensor([kc.shape[0]]), kc.shape[0], self.scale)
                else:
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
    """Runs head/tail work on its own thread, batched.

    Requests queue while a round runs; the thread then takes everything queued and runs the
    heads (whose outputs the server runtime waits for) and then the tails, as one batched
    forward each, handing each batch's results to the event loop as soon as it is done.
    The decode loop (edge_runtime.decode_loop) submits all its generations' rows at once;
    prompts being prefilled meanwhile join whichever round comes next.
    """

    def __init__(self, model: EdgeModel, compute: Callable = run_here):
        self.model = model
        self.compute = compute  # runs each batch: on this worker's thread, or on a shared ComputeThread
        self._wake = threading.Condition()
        self._pending: list[tuple[str, _Item, asyncio.Future, asyncio.AbstractEventLoop]] = []
        self._notify_scheduled = False
        self._closed = False
        self._threads: int | None = None
        self._stats = {"batches": 0, "rows": 0, "max_batch_sequences": 0, "intra_op_threads": None}
        self._thread = threading.Thread(target=self._serve, name="fedsea-edge", daemon=True)
        self._thread.start()

    async def head(self, cache: SequenceCache, start: int, token_ids: torch.Tensor) -> torch.Tensor:
        return (await self._submit("head", [_Item(cache, start, token_ids)]))[0]

    async def tail(self, cache: SequenceCache, start: int, hidden: torch.Tensor, every: bool = False) -> torch.Tensor:
        return (await self._submit("tail", [_Item(cache, start, hidden, every)]))[0]

    async def run_many(self, kind: str, rows: list[tuple[SequenceCache, int, torch.Tensor]]) -> list[torch.Tensor]:
        """`kind` ("head" or "tail") of many sequences, (cache, start, input) each, in one round."""
        return await self._submit(kind, [_Item(*r) for r in rows])

    def stats(self) -> dict:
        """Batches run, rows (tokens) through them, the most sequences in one batch, and the
        torch intra-op threads the worker thread runs with (None before its first batch)."""
        with self._wake:
            return dict(self._stats)

    def close(self, timeout: float = 30.0) -> None:
        """Fail what is queued and wait for the batch in flight (see ComputeThread.close:
        a thread stopped inside a torch op at interpreter exit aborts the process)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    async def _submit(self, kind: str, items: list[_Item]) -> list[torch.Tensor]:
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in items]
        with self._wake:
            if self._closed:
                raise RuntimeError("the edge worker is closed")
            self._pending += [(kind, item, fut, loop) for item, fut in zip(items, futs)]
            schedule, self._notify_scheduled = not self._notify_scheduled, True
        if schedule:
            # Wake the thread after this loop iteration, not now: prompts submitted in the
            # same iteration go in the same round.
            loop.call_soon(self._notify)
        try:
            return [await fut for fut in futs]
        finally:
            for fut in futs:
                fut.cancel()  # those not run yet leave the queue (a cancelled request)

    def _notify(self) -> None:
        with self._wake:
            self._notify_scheduled = False
            self._wake.notify()

    # ---- worker thread ----------------------------------------------------------------

    def _serve(self) -> None:
        if self.compute is not run_here:
            serial()  # the batches run on the compute thread, with the cores
        self.compute(warm_linear_kernels, self.model.shard)  # before the first batch, where batches run
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    # The timeout only guards against a notify lost with a loop that closed first.
                    self._wake.wait(timeout=1.0)
                if self._closed:
                    batch, self._pending = self._pending, []
                    _deliver_all(batch, RuntimeError("the edge worker is closed"))
                    return
            with self._wake:
                batch, self._pending = self._pending, []
                self._notify_scheduled = False  # the next submit wakes the thread again
            for kind in ("head", "tail"):
                part = [(item, fut, loop) for k, item, fut, loop in batch if k == kind and not fut.cancelled()]
                if part:
                    self._run(kind, part)

    def _batch(self, kind: str, items: list[_Item]) -> list:
        self._threads = torch.get_num_threads()  # of the thread running it: this one or the compute thread
        return getattr(self.model, kind)(items)

    def _run(self, kind: str, part: list[tuple[_Item, asyncio.Future, asyncio.AbstractEventLoop]]) -> None:
        items = [item for item, _, _ in part]
        try:
            results: list | Exception = self.compute(self._batch, kind, items)
        except Exception as e:  # fail this batch's requests, keep serving
            results = e
        with self._wake:
            s = self._stats
            s["batches"] += 1
            s["rows"] += sum(it.x.shape[0] for it in items)
            s["max_batch_sequences"] = max(s["max_batch_sequences"], len(items))
            s["intra_op_threads"] = self._threads
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for i, (_, fut, loop) in enumerate(part):
            by_loop.setdefault(loop, []).append((fut, results if isinstance(results, Exception) else results[i]))
        for loop, outcomes in by_loop.items():
            _post(loop, outcomes)


def _deliver_all(batch: list, error: Exception) -> None:
    by_loop: dict = {}
    for _, _, fut, loop in batch:
        by_loop.setdefault(loop, []).append((fut, error))
    for loop, outcomes in by_loop.items():
        _post(loop, outcomes)


def _post(loop: asyncio.AbstractEventLoop, outcomes: list[tuple[asyncio.Future, object]]) -> None:
    """Resolve futures of `loop` from the worker thread: one wake-up of the loop per batch."""
    try:
        loop.call_soon_threadsafe(_resolve, outcomes)
    except RuntimeError:  # that loop has closed: nobody waits any more
        pass


def _resolve(outcomes: list[tuple[asyncio.Future, object]]) -> None:
    for fut, outcome in outcomes:
        if fut.done():  # cancelled: its generation went away
            continue
        if isinstance(outcome, Exception):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)

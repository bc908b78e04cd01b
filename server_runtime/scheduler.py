"""Continuous batching: which tokens of which sessions go through the model this tick.

Every tick the scheduler packs all waiting decode steps (one token each) first, then
prefill chunks, until the per-tick token budget is used.  A long prompt is split into
chunks across ticks, so it cannot stall the decode steps of everyone else.  A chunk is
scheduled only when the KV pool can hold its tokens; work that stays blocked on KV blocks,
without progress, for longer than the timeout fails with a typed capacity error, and its
session is rolled back to where it was (the blocks it grew given back), so a running
session is never left half-written.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Hashable

import torch

from fedsea_shared.prefix import PrefixHasher

from .kv_pool import BlockTable, KVPool, OutOfBlocks


@dataclass
class Session:
    key: Hashable
    table: BlockTable
    model: str | None = None  # the adapter this session runs (None: the base model)
    hasher: PrefixHasher | None = None  # block keys over the hidden states received
    last_active: float = field(default_factory=time.monotonic)
    work: "StepWork | None" = None  # at most one step in flight per session


@dataclass
class StepWork:
    """One Step message: n hidden states appended at start_pos, possibly in chunks."""

    session: Session
    hidden: torch.Tensor
    start_pos: int
    future: Future
    enqueued: float = field(default_factory=time.monotonic)
    blocked_since: float | None = None  # when it last found the pool too full to grow; None: not blocked
    done: int = 0
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.hidden.shape[0] - self.done


@dataclass
class Chunk:
    work: StepWork
    start: int  # offset into work.hidden
    end: int

    @property
    def session(self) -> Session:
        return self.work.session

    @property
    def positions(self) -> tuple[int, int]:
        """Absolute token positions [from, to) this chunk fills."""
        base = self.work.start_pos
        return base + self.start, base + self.end

    @property
    def hidden(self) -> torch.Tensor:
        return self.work.hidden[self.start : self.end]


class Scheduler:
    def __init__(self, pool: KVPool, token_budget: int, wait_timeout: float):
        if token_budget < 1:
            raise ValueError("token budget per tick must be >= 1")
        self.pool = pool
        self.token_budget = token_budget
        self.wait_timeout = wait_timeout
        self.queue: deque[StepWork] = deque()

    def add(self, work: StepWork) -> None:
        self.queue.append(work)

    def __len__(self) -> int:
        return len(self.queue)

    def schedule(self) -> list[Chunk]:
        budget = self.token_budget
        chunks: list[Chunk] = []
        now = time.monotonic()
        # Decode steps first (stable sort keeps arrival order within each class).
        for work in sorted(self.queue, key=lambda w: w.remaining > 1):
            if budget == 0:
                break
            n = min(work.remaining, budget)
            try:
                self.pool.grow(work.session.table, n)
            except OutOfBlocks:
                if work.blocked_since is None:
                    work.blocked_since = now
                continue
            work.blocked_since = None  # progress: the capacity wait starts again from zero
            chunks.append(Chunk(work, work.done, work.done + n))
            budget -= n
        return chunks

    def complete(self, chunks: list[Chunk], outputs: list[torch.Tensor]) -> list[StepWork]:
        """Record a tick's outputs; return the works that are now finished."""
        finished = []
        for chunk, out in zip(chunks, outputs):
            work = chunk.work
            work.outputs.append(out)
            work.done = chunk.end
            work.session.table.num_tokens = chunk.positions[1]
            if work.remaining == 0:
                finished.append(work)
        if finished:  # one pass, not a remove() per finished step: ticks may finish hundreds
            self.queue = deque(w for w in self.queue if w.remaining)
        return finished

    def expired(self, now: float) -> list[StepWork]:
        """Works blocked on KV blocks, without progress, for longer than the timeout (a
        long prompt whose chunks keep running is never expired, however long it takes)."""
        return [w for w in self.queue if w.blocked_since is not None and now - w.blocked_since > self.wait_timeout]

    def remove(self, work: StepWork) -> None:
        """Drop a work (failed or its session closed), undoing any chunks it wrote and
        giving back the blocks it grew."""
        self.queue.remove(work)
        work.session.table.num_tokens = work.start_pos
        self.pool.shrink(work.session.table)

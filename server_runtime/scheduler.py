"""Continuous batching: which tokens of which sessions go through the model this tick.

Every tick the scheduler packs all waiting decode steps (one token each) first, then
prefill chunks, until the per-tick token budget is used.  A long prompt is split into
chunks across ticks, so it cannot stall the decode steps of everyone else.

A step starts only once the KV pool holds blocks for all of its tokens (taken at once, so
a started step always runs to its end).  Sessions are served first come, first served
(vLLM's FCFS policy): each has a `priority`, its place in the order sessions opened, which
it keeps for life, across preemptions.  When a running session's step finds the pool full,
it preempts by recompute (`victim`): the newest session holding blocks that opened after it
gives them back, and its edge reopens it in place and re-sends its states (they stay in
the prefix cache where they can); the session keeps its place, so it is never the first
to go again for a newer one.  A session not running (new, or re-sending after a
preemption) never takes blocks from a running one: it waits, the oldest first, and no
newer waiting session starts before it (a steady stream of small new sessions cannot
starve a preempted one).  A wait fails with a typed capacity error only after
`wait_timeout` in which no step ran at all (the blocks are held by idle sessions).  A
failed or preempted step is rolled back (the blocks it grew given back), so no session is
left half-written.

A tenant's KV quota (server_runtime.limits.BlockQuota) is applied the same way within
the tenant, as vLLM queues rather than refuses: a step that would take its tenant over
the quota preempts the tenant's newest session (never another tenant's), or waits, and
the tenant's newer waiting sessions wait behind it; other tenants go on.  Its wait times
out only after `wait_timeout` in which none of its tenant's steps ran.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import count
from typing import Callable, Hashable, Iterable

import torch

from fedsea_shared.prefix import PrefixHasher

from .kv_pool import BlockTable, KVPool, OutOfBlocks
from .limits import BlockQuota


@dataclass
class Session:
    key: Hashable
    table: BlockTable
    model: str | None = None  # the adapter this session runs (None: the base model)
    hasher: PrefixHasher | None = None  # block keys over the hidden states received
    priority: int = 0  # its place in the order sessions opened (lower: older, served first, kept longer)
    last_active: float = field(default_factory=time.monotonic)
    work: "StepWork | None" = None  # at most one step in flight per session
    running: bool = False  # a step of it got its blocks since it opened (or reopened)
    preempted: bool = False  # its blocks were taken for an older session: its edge must reopen it


@dataclass
class StepWork:
    """One Step message: n hidden states appended at start_pos, possibly in chunks."""

    session: Session
    hidden: torch.Tensor
    start_pos: int
    future: Future
    enqueued: float = field(default_factory=time.monotonic)
    blocked_since: float | None = None  # when it first found the pool too full to start; None: not blocked
    over_quota: bool = False  # blocked by its tenant's quota rather than the pool
    reserved: bool = False  # the session's table has blocks for all of its tokens
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


def victim(asker: Session, sessions: Iterable[Session], frees: Callable[[Session], bool]) -> Session | None:
    """Whose blocks the step of `asker` takes when the pool is full (the policy; the
    scheduler applies it): the newest session that opened after `asker` and whose blocks
    would come free (`frees`: it holds one that nobody else does; taking only blocks that
    others share, such as a chat template's, gains nothing and costs its edge a reopen),
    waiting or running; else, for a running asker, its own (it gives way to the older
    ones).  A waiting asker takes nobody's blocks while anything runs (it waits for them to
    come free); when nothing runs, the pool is full of waiting sessions' cached prefixes
    and the oldest of them takes them from the newer ones, else nobody would ever start.
    None: `asker` waits."""
    holders = [s for s in sessions if s.table.blocks and s is not asker]
    if not asker.running and any(s.running for s in holders):
        return None
    newer = [s for s in holders if s.priority > asker.priority and frees(s)]
    if newer:
        return max(newer, key=lambda s: s.priority)
    return asker if asker.running and holders and frees(asker) else None


@dataclass
class Tick:
    chunks: list[Chunk]
    preempted: list[tuple[Session, StepWork | None]]  # sessions preempted, with the step each had queued


class Scheduler:
    def __init__(self, pool: KVPool, token_budget: int, wait_timeout: float, quota: BlockQuota | None = None):
        if token_budget < 1:
            raise ValueError("token budget per tick must be >= 1")
        self.pool = pool
        self.quota = quota
        self.token_budget = token_budget
        self.wait_timeout = wait_timeout
        self.queue: deque[StepWork] = deque()
        self._arrivals = count()

    def add(self, work: StepWork) -> None:
        self.queue.append(work)

    def __len__(self) -> int:
        return len(self.queue)

    def blocked(self) -> int:
        """Steps waiting for KV blocks (or their tenant's quota) to start."""
        return sum(w.blocked_since is not None for w in self.queue)

    def arrival(self) -> int:
        """The priority of a session opening now: after every session opened before."""
        return next(self._arrivals)

    def schedule(self, sessions: Iterable[Session]) -> Tick:
        """This tick's chunks; `sessions`: every open session, in the order they opened."""
        tick = Tick([], [])
        now = time.monotonic()
        # Running sessions first, decode steps first, older first (they are kept longest);
        # then the waiting ones in the order they opened.
        order = sorted(self.queue, key=lambda w: (not w.session.running, w.session.running and w.remaining > 1,
                                                  w.session.priority))
        budget = self.token_budget
        head_waits = False  # a waiting step found no room: no newer waiting one may start before it
        quota_waits: set[Hashable] = set()  # tenants whose waiting step is over their quota: the same, per tenant
        for work in order:
            if budget == 0:
                break
            if work.session.work is not work:  # preempted earlier in this pass
                continue
            tenant = self._tenant(work.session)
            if not work.reserved and not work.session.running and (head_waits or tenant in quota_waits):
                if work.blocked_since is None:
                    work.blocked_since = now
                continue
            if not work.reserved:
                preempted, was_running = len(tick.preempted), work.session.running
                work.over_quota = not self._within_quota(work, sessions, tick)
                reserved = not work.over_quota and self._reserve(work, sessions, tick)
                if len(tick.preempted) > preempted:  # their chunks left this tick
                    budget = self.token_budget - sum(c.end - c.start for c in tick.chunks)
                if not reserved:
                    if work.blocked_since is None:
                        work.blocked_since = now
                    if not was_running:
                        if work.over_quota:
                            quota_waits.add(tenant)
                        else:
                            head_waits = True
                    continue
            n = min(work.remaining, budget)
            tick.chunks.append(Chunk(work, work.done, work.done + n))
            budget -= n
        # Blocks will come free where steps run, so waiting there is no timeout: anywhere
        # for the pool, in the tenant's own sessions for its quota.
        ran = {self._tenant(c.session) for c in tick.chunks}
        for work in self.queue:
            if work.blocked_since is not None and ran and (not work.over_quota or self._tenant(work.session) in ran):
                work.blocked_since = now
        return tick

    def _tenant(self, session: Session) -> Hashable:
        return self.quota.owner_of(session.key) if self.quota is not None else None

    def _within_quota(self, work: StepWork, sessions: Iterable[Session], tick: Tick) -> bool:
        """Charge the work's session for the blocks it will hold after the step, preempting
        the tenant's newer sessions (`victim` among the tenant's own) while that would go
        over its quota; False if it must wait (or preempted its own session)."""
        if self.quota is None:
            return True
        session = work.session
        blocks = len(session.table.blocks) + session.table.blocks_needed(work.remaining)
        tenant = self._tenant(session)
        while self.quota.reserve(session.key, blocks):
            own = [s for s in sessions if self._tenant(s) == tenant]
            loser = victim(session, own, lambda s: self.quota.charged(s.key) > 0)  # one that gives back a charge
            if loser is None:
                return False
            self._preempt_in(tick, loser)
            if loser is session:
                return False
        return True

    def _reserve(self, work: StepWork, sessions: Iterable[Session], tick: Tick) -> bool:
        """Take blocks for all of the work's tokens, preempting `victim`s while the pool is
        too full; False if it must wait (or preempted its own session)."""
        session = work.session
        while True:
            try:
                self.pool.grow(session.table, work.remaining)
                break
            except OutOfBlocks:
                loser = victim(session, sessions, self._frees)
                if loser is None:
                    return False
                self._preempt_in(tick, loser)
                if loser is session:
                    return False
        work.reserved, work.blocked_since, session.running = True, None, True
        return True

    def _preempt_in(self, tick: Tick, loser: Session) -> None:
        tick.preempted.append((loser, self.preempt(loser)))
        tick.chunks = [c for c in tick.chunks if c.session is not loser]

    def _frees(self, session: Session) -> bool:
        """Whether preempting `session` gives blocks back (it holds one nobody shares)."""
        return any(self.pool.allocator.refs(b) == 1 for b in session.table.blocks)

    def preempt(self, session: Session) -> StepWork | None:
        """Give back all of the session's blocks (full, keyed ones stay cached as
        evictable); return the step it had queued, which must fail."""
        work = session.work
        if work is not None:
            self.queue.remove(work)
        self.pool.free(session.table)
        if self.quota is not None:
            self.quota.release(session.key)
        session.work, session.running, session.preempted = None, False, True
        return work

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
        """Works waiting for blocks to start for longer than the timeout while no step ran
        (the pool is held by idle sessions), however long the prompts that run take."""
        return [w for w in self.queue if w.blocked_since is not None and now - w.blocked_since > self.wait_timeout]

    def remove(self, work: StepWork) -> None:
        """Drop a work (failed or its session closed), undoing any chunks it wrote and
        giving back the blocks it grew."""
        self.queue.remove(work)
        work.session.table.num_tokens = work.start_pos
        self.pool.shrink(work.session.table)

"""The engine: sessions, scheduler and KV block allocation on one worker thread, which
hands each tick's plan to an executor (executor.py: the model's one or many ranks).

The websocket side never touches model state: it calls the thread-safe methods of
`EngineBackend` (open/step/close), which enqueue a command and return a Future.  The
worker thread applies commands, schedules a tick, runs it and resolves futures, so the
event loop never waits on the model and all engine state has a single owner.  A
different engine (e.g. one driving vLLM) only has to implement `EngineBackend`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Callable, Hashable, NamedTuple, Protocol

import torch

from fedsea_shared import defaults
from fedsea_shared.prefix import PrefixHasher, run_key
from fedsea_shared.protocol import ErrorCode, Load, ProtocolError
from fedsea_shared.threads import run_here, serial

from .kv_pool import BlockTable
from .limits import BlockQuota
from .metrics import ServerMetrics
from .executor import Executor, ExecutorFailed
from .scheduler import Scheduler, Session, StepWork
from .tick_plan import TickPlan

log = logging.getLogger("fedsea.server.engine")


class EngineBackend(Protocol):
    def open(self, key: Hashable, model: str | None = None, root: bytes = b"", prefix: list[bytes] = (),
             reopen: bool = False, partial: list[bytes] = ()) -> Future: ...
    def fork(self, key: Hashable, parent: Hashable) -> Future: ...
    def step_many(self, steps: list[tuple[Hashable, int, torch.Tensor]]) -> list[Future]: ...
    resolving: threading.Lock  # held while one tick's futures are resolved
    def close(self, key: Hashable) -> Future: ...
    def shutdown(self) -> None: ...


class _OpenRequest(NamedTuple):
    model: str | None  # the adapter (None: the base model)
    root: bytes  # the session's block-key root (fedsea_shared.prefix)
    prefix: list[bytes]  # block keys of the prefix the edge hopes the cache holds
    partial: list[bytes]  # row digests of the rows after those blocks it hopes are cached too


@dataclass
class EngineSettings:
    max_context: int = defaults.MAX_CONTEXT
    token_budget: int = 512  # tokens per tick (decode rows + prefill chunks)
    wait_timeout: float = 30.0  # seconds a step or an open may wait for KV blocks
    idle_timeout: float = 600.0  # seconds before an idle session is freed
    admission_free_blocks: int = 1  # an open waits until at least this many blocks are free


class Engine:
    """`executor` runs each tick's plans on the model's ranks (the base model and the
    fine-tuned ones its worker serves, over one KV pool).  A session runs one model for its
    lifetime."""

    def __init__(self, executor: Executor, settings: EngineSettings, metrics: ServerMetrics,
                 quota: BlockQuota | None = None, compute: Callable = run_here,
                 on_expired: Callable[[Hashable], None] | None = None):
        # `compute(fn, *args)` runs a forward pass: here on the engine thread, or on the
        # process's shared compute thread (fedsea_shared.threads.ComputeThread.run).
        self.compute = compute
        # Told (on the engine thread) of each session the idle sweep freed, so the
        # connection that opened it stops counting it: the engine is the one registry.
        self.on_expired = on_expired
        self.executor = executor
        self.models = set(executor.worker.runners)
        self.pool = executor.worker.pool  # rank 0's: its allocator decides for every rank
        self.settings = settings
        self.metrics = metrics
        self.quota = quota
        self.scheduler = Scheduler(self.pool, settings.token_budget, settings.wait_timeout, quota)
        self.sessions: dict[Hashable, Session] = {}
        self._opens: list[tuple[Hashable, _OpenRequest, Future, float]] = []  # waiting for capacity
        self._next_idle_sweep = 0.0
        self._ran_at = 0.0  # when a tick last ran: opens waiting meanwhile are not timed out
        self._inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        # Held while a tick's (or a command's) futures are resolved: a reader that takes it
        # sees all of them done or none, so one tick's results make one reply (step_many).
        self.resolving = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="fedsea-engine", daemon=True)
        self._running = True
        self._thread.start()
        self._publish()

    # ---- thread-safe API -------------------------------------------------------------

    def open(self, key: Hashable, model: str | None = None, root: bytes = b"", prefix: list[bytes] = (),
             reopen: bool = False, partial: list[bytes] = ()) -> Future:
        """Open a session; `root` and `prefix` are its block-key root and the keys of the
        prefix the edge hopes is cached, `partial` the row digests (fedsea_shared.prefix) of
        up to block_size - 1 rows after it that it hopes are cached as well.  Resolves to the
        number of tokens it already holds.  `reopen`: the session is open and was preempted;
        it takes up its cached prefix again and keeps its place in the order sessions are served."""
        request = _OpenRequest(model, root, list(prefix), list(partial))
        return self._submit(lambda fut: (self._reopen if reopen else self._open)(key, request, fut))

    def fork(self, key: Hashable, parent: Hashable) -> Future:
        """Open `key` as a copy of the idle session `parent`, sharing its KV blocks."""
        return self._submit(lambda fut: self._fork(key, parent, fut))

    def step_many(self, steps: list[tuple[Hashable, int, torch.Tensor]]) -> list[Future]:
        """Queue the steps (key, position, hidden states) of many sessions as one command,
        so they all make the next tick: an edge's frame of decode rows is one batch here
        without waiting for stragglers.  One future per step, resolving to its output."""
        futures = [Future() for _ in steps]

        def command() -> None:
            with self.resolving:
                for (key, pos, hidden), fut in zip(steps, futures):
                    self._step(key, pos, hidden, fut)

        self._inbox.put(command)
        return futures

    def step(self, key: Hashable, pos: int, hidden: torch.Tensor) -> Future:
        return self.step_many([(key, pos, hidden)])[0]

    def close(self, key: Hashable) -> Future:
        return self._submit(lambda fut: _resolve(fut, self._close(key)))

    def shutdown(self) -> None:
        self._running = False
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def _submit(self, command: Callable[[Future], None]) -> Future:
        fut: Future = Future()
        self._inbox.put(lambda: command(fut))
        return fut

    # ---- worker thread ----------------------------------------------------------------

    def _loop(self) -> None:
        if self.compute is not run_here:
            serial()  # the forward passes run on the compute thread, with the cores
        # Before the first step (which queues behind it): kernels built where the passes run.
        self.compute(self.executor.worker.warm)
        wait = 0.5
        while self._running:
            for command in self._collect(wait):
                if command is not None:
                    command()
            try:
                ran = self._tick()
            except ExecutorFailed:  # the server was told: it closes its connections, edges replay elsewhere
                ran = False
            except Exception:  # a bug must not kill the engine: fail the tick's steps
                log.exception("engine tick failed")
                for work in list(self.scheduler.queue):
                    self._fail(work, ProtocolError(ErrorCode.INTERNAL, "server error while running the step"))
                ran = False
            self._housekeeping()
            if not ran:  # here, not via the compute thread: the engine idles between any two decode steps
                self.executor.keep_alive()
            self._publish()
            # Runnable work: loop straight on.  Work blocked on capacity: poll. Else sleep.
            wait = 0.0 if ran else 0.05 if (len(self.scheduler) or self._opens) else 0.5

    def _collect(self, wait: float) -> list[Callable[[], None] | None]:
        """Commands in the inbox: everything queued, after waiting up to `wait` for the
        first when there is nothing to run.  Steps that arrive while a tick runs make the
        next one (continuous batching); nothing waits for company."""
        commands: list[Callable[[], None] | None] = []
        try:
            commands.append(self._inbox.get(timeout=wait) if wait > 0 else self._inbox.get_nowait())
            while commands[-1] is not None:
                commands.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return commands

    def _tick(self) -> bool:
        if self.executor.failure:
            return False
        tick = self.scheduler.schedule(self.sessions.values())
        for session, work in tick.preempted:
            self._preempted(session, work)
        chunks = tick.chunks
        if not chunks:
            return bool(tick.preempted)
        t0 = time.monotonic()
        for c in chunks:
            if c.start == 0:
                self.metrics.queue_wait.observe(t0 - c.work.enqueued)
        self._ran_at = t0
        outputs = self._run(chunks)
        tokens = sum(c.end - c.start for c in chunks)
        self.metrics.tick_seconds.observe(time.monotonic() - t0)
        self.metrics.tokens_per_tick.observe(tokens)
        self.metrics.tokens.inc(tokens)
        now, results = time.monotonic(), []
        for work in self.scheduler.complete(chunks, outputs):
            session = work.session
            blocks = session.hasher.extend(work.hidden)
            if blocks:
                self.pool.cache_blocks(session.table, len(session.hasher.keys) - len(blocks), blocks)
            fresh = min(work.hidden.shape[0], len(session.hasher.pending))
            if fresh:  # a later session (this chat's next turn) may start with these rows
                self.pool.cache_partial(session.table, session.hasher.partial_keys(fresh))
            work.session.work = None
            work.session.last_active = now
            self.metrics.step_latency.observe(now - work.enqueued)
            results.append((work.future, torch.cat(work.outputs) if len(work.outputs) > 1 else work.outputs[0]))
        with self.resolving:
            for fut, result in results:
                _resolve(fut, result)
        return True

    def _run(self, chunks: list) -> list[torch.Tensor]:
        """One plan per model among the tick's chunks (the first also makes the pool's
        pending block copies); outputs in chunk order."""
        groups: dict[str | None, list[int]] = {}
        for i, c in enumerate(chunks):
            groups.setdefault(c.session.model, []).append(i)
        outputs: list = [None] * len(chunks)
        copies = self.pool.take_copies()
        for model, idx in groups.items():
            plan = TickPlan.from_chunks([chunks[i] for i in idx], self.pool.block_size, copies, model)
            copies = []
            for i, out in zip(idx, plan.split(self.compute(self.executor.execute, plan))):
                outputs[i] = out
        return outputs

    def _preempted(self, session: Session, work: StepWork | None) -> None:
        """The scheduler took the session's blocks for an older session: its step (now, or
        its next one) fails with `preempted`, and its edge reopens it and sends again."""
        log.info("session %s preempted: its KV blocks went to an older session", session.key)
        self.metrics.preemptions.inc()
        if work is not None:
            self._fail_future(work.future, _preempted_error(session.key[-1]))

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for work in self.scheduler.expired(now):
            self._fail(work, ProtocolError(
                ErrorCode.CAPACITY,
                f"no KV blocks came free for this step in {self.settings.wait_timeout:g}s; retry later",
            ))
        still = []
        for key, spec, fut, since in self._opens:
            if fut.done():
                continue
            if self.pool.allocator.num_free >= self.settings.admission_free_blocks:
                self._admit(key, spec, fut)
            elif now - max(since, self._ran_at) > self.settings.wait_timeout:
                self._fail_future(fut, ProtocolError(
                    ErrorCode.CAPACITY,
                    f"server at capacity: no KV blocks came free in {self.settings.wait_timeout:g}s; retry later",
                ))
            else:
                still.append((key, spec, fut, since))
        self._opens = still
        if now < self._next_idle_sweep:
            return
        self._next_idle_sweep = now + 1.0
        for key, s in list(self.sessions.items()):
            if s.work is None and now - s.last_active > self.settings.idle_timeout:
                log.info("session %s idle for %.0fs: freed", key, now - s.last_active)
                self._close(key)
                if self.on_expired is not None:
                    self.on_expired(key)

    def _publish(self) -> None:
        stats = self.pool.allocator.stats()
        self.metrics.kv_blocks_free.set(stats["free"] + stats["evictable"])
        self.metrics.kv_blocks_used.set(stats["used"])
        self.metrics.kv_blocks_cached.set(stats["cached"])
        self.metrics.prefix_evictions.set(stats["evictions"])
        self.metrics.sessions.set(len(self.sessions))
        self.metrics.queue_depth.set(len(self.scheduler))
        # Read by the websocket side for Welcome/Opened/Closed (one reference swap: no lock).
        self.load = Load(sessions=len(self.sessions), waiting=self.scheduler.blocked() + len(self._opens),
                         free_blocks=stats["free"] + stats["evictable"], blocks=self.pool.allocator.num_blocks)

    # ---- commands (run on the worker thread) -------------------------------------------

    def _open(self, key: Hashable, spec: _OpenRequest, fut: Future) -> None:
        if spec.model not in self.models:
            self._fail_future(fut, ProtocolError(ErrorCode.UNKNOWN_ADAPTER, f"no adapter {spec.model!r} on this server", key[-1]))
        elif key in self.sessions or any(k == key for k, _, _, _ in self._opens):
            self._fail_future(fut, ProtocolError(ErrorCode.SESSION_EXISTS, "session id already open", key[-1]))
        elif self.pool.allocator.num_free >= self.settings.admission_free_blocks:
            self._admit(key, spec, fut)
        else:
            self._opens.append((key, spec, fut, time.monotonic()))

    def _admit(self, key: Hashable, spec: _OpenRequest, fut: Future) -> None:
        session = Session(key, BlockTable(self.pool.block_size), spec.model, PrefixHasher(spec.root, self.pool.block_size),
                          priority=self.scheduler.arrival())
        self.sessions[key] = session
        self._take_up_prefix(session, spec, fut)

    def _reopen(self, key: Hashable, spec: _OpenRequest, fut: Future) -> None:
        session = self.sessions.get(key)
        if session is None:
            return self._fail_future(fut, ProtocolError(ErrorCode.UNKNOWN_SESSION, "reopen of a session that is not open", key[-1]))
        if not session.preempted:
            return self._fail_future(fut, ProtocolError(ErrorCode.SESSION_EXISTS, "reopen of a session that was not preempted", key[-1]))
        if spec.model != session.model:
            return self._fail_future(fut, ProtocolError(
                ErrorCode.UNKNOWN_ADAPTER, f"reopen names adapter {spec.model!r}; the session runs {session.model!r}", key[-1]))
        session.preempted = False
        session.hasher = PrefixHasher(spec.root, self.pool.block_size)
        session.last_active = time.monotonic()
        self._take_up_prefix(session, spec, fut)

    def _take_up_prefix(self, session: Session, spec: _OpenRequest, fut: Future) -> None:
        """Share the cached blocks of the prefix the edge named, and, when it holds them all,
        a copy of the rows after them that a cached block starts with (the digests match
        only if their bytes do); resolve to the tokens held."""
        prefix, partial = spec.prefix, spec.partial
        # Blocks taken up are held like any other: charged now, and no more than the
        # tenant's quota has room for (the edge sends the rest again).
        room = self.quota.room(session.key) if self.quota is not None else len(prefix)
        hits = self.pool.share_prefix(session.table, prefix[:max(0, room)]) if prefix else 0
        if self.quota is not None:
            self.quota.reserve(session.key, hits)
        rows = 0
        if partial and hits == len(prefix):
            # The copy is a block of the session's own: charged to its tenant now, not at its first step.
            refused = self.quota is not None and self.quota.reserve(session.key, hits + 1)
            key = run_key(prefix[-1] if prefix else spec.root, partial)
            if not refused and self.pool.share_partial(session.table, key, len(partial)):
                rows = len(partial)
        session.hasher.adopt(prefix[:hits], partial[:rows])
        if prefix or partial:
            self.metrics.prefix_queries.inc(len(prefix) * self.pool.block_size + len(partial))
            self.metrics.prefix_hits.inc(hits * self.pool.block_size + rows)
        _resolve(fut, session.table.num_tokens)

    def _fork(self, key: Hashable, parent_key: Hashable, fut: Future) -> None:
        parent = self.sessions.get(parent_key)
        if parent is None:
            return self._fail_future(fut, ProtocolError(ErrorCode.UNKNOWN_SESSION, "fork of a session that is not open", key[-1]))
        if parent.work is not None:
            return self._fail_future(fut, ProtocolError(ErrorCode.SESSION_BUSY, "fork of a session whose step has not finished", key[-1]))
        if parent.preempted:
            return self._fail_future(fut, _preempted_error(key[-1]))
        if key in self.sessions or any(k == key for k, _, _, _ in self._opens):
            return self._fail_future(fut, ProtocolError(ErrorCode.SESSION_EXISTS, "session id already open", key[-1]))
        self.sessions[key] = Session(key, self.pool.fork(parent.table), parent.model, parent.hasher.copy(),
                                     priority=self.scheduler.arrival(), running=parent.running)
        parent.last_active = time.monotonic()
        _resolve(fut, parent.table.num_tokens)

    def _step(self, key: Hashable, pos: int, hidden: torch.Tensor, fut: Future) -> None:
        sid = key[-1]
        session = self.sessions.get(key)
        if session is None:
            return self._fail_future(fut, ProtocolError(ErrorCode.UNKNOWN_SESSION, "no such session (never opened, closed or expired)", sid))
        if session.work is not None:
            return self._fail_future(fut, ProtocolError(ErrorCode.SESSION_BUSY, "the previous step of this session has not finished", sid))
        if session.preempted:
            return self._fail_future(fut, _preempted_error(sid))
        length = session.table.num_tokens
        if pos != length:
            return self._fail_future(fut, ProtocolError(ErrorCode.POSITION_MISMATCH, f"step at position {pos} but the session holds {length} tokens", sid))
        if length + hidden.shape[0] > self.settings.max_context:
            return self._fail_future(fut, ProtocolError(
                ErrorCode.CONTEXT_OVERFLOW,
                f"{length} + {hidden.shape[0]} tokens exceed the server's max context of {self.settings.max_context}",
                sid,
            ))
        blocks = len(session.table.blocks) + session.table.blocks_needed(hidden.shape[0])
        if blocks > self.pool.allocator.num_blocks:
            return self._fail_future(fut, ProtocolError(
                ErrorCode.CAPACITY,
                f"the session would hold {blocks} KV blocks after this step; the server's whole pool has "
                f"{self.pool.allocator.num_blocks} (a shorter context, or a server with more --kv-cache-memory)",
                sid,
            ))
        if self.quota is not None and blocks > self.quota.limit:  # over it for now: it waits (scheduler)
            return self._fail_future(fut, ProtocolError(
                ErrorCode.LIMIT,
                f"the session would hold {blocks} KV blocks after this step; this tenant's whole quota is "
                f"{self.quota.limit} (a shorter context, or a server with a larger --kv-quota)",
                sid,
            ))
        session.last_active = time.monotonic()
        session.work = StepWork(session, hidden, length, fut)
        self.scheduler.add(session.work)

    def _close(self, key: Hashable) -> bool:
        for entry in self._opens:
            if entry[0] == key:
                self._fail_future(entry[2], ProtocolError(ErrorCode.UNKNOWN_SESSION, "closed while waiting to open", key[-1]))
        session = self.sessions.pop(key, None)
        if session is None:
            return False
        if session.work is not None:
            self.scheduler.remove(session.work)
            self._fail_future(session.work.future, ProtocolError(ErrorCode.UNKNOWN_SESSION, "session closed during its step", key[-1]))
        self.pool.free(session.table)
        if self.quota is not None:
            self.quota.release(key)
        return True

    def _fail(self, work: StepWork, error: ProtocolError) -> None:
        self.scheduler.remove(work)
        work.session.work = None
        error.sid = work.session.key[-1]
        self._fail_future(work.future, error)

    @staticmethod
    def _fail_future(fut: Future, error: ProtocolError) -> None:
        try:
            fut.set_exception(error)
        except InvalidStateError:  # the asker gave up (disconnected) meanwhile
            pass


def _preempted_error(sid: int) -> ProtocolError:
    return ProtocolError(ErrorCode.PREEMPTED, "the server gave this session's KV blocks to an older session; "
                                              "reopen it (Open with reopen) and send its states again", sid)


def _resolve(fut: Future, value) -> None:
    try:
        fut.set_result(value)
    except InvalidStateError:
        pass

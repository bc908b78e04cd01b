"""The edge's decode loop: one per edge model (the base, or an adapter) owns every live
generation on it, as vLLM's engine core or llama.cpp's `update_slots` own every slot.

An iteration takes every generation whose next logits are in and, for each, samples a
token (its grammar mask, penalties, stop strings and detokenization included) and hands
the event to its request's queue; then the heads of all new tokens run as one batch, the
sessions' steps leave as one frame per connection (edge_runtime.connection), and the
tails of all replies run as one batch.  A generation that becomes ready meanwhile (a new
prompt prefilled, or a step held up by a failover replay or a preemption) joins the next
iteration, so one stream never waits for another's trouble, and no timer decides who
is batched with whom.  The consumer reads its queue at its own pace: a slow reader holds
up no one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from .model import EdgeWorker, SequenceCache
from .sampling import SamplingParams, sample
from .session import InferenceSession

log = logging.getLogger("fedsea.edge.decode")


@dataclass
class TokenEvent:
    token_id: int
    text: str  # text this token adds (may be "" while a character is incomplete)
    logprob: float
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" or "length" on the last event
    # First event only, when asked for: (logprob, top alternatives) of prompt tokens 2..n
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


@dataclass(eq=False)
class Generation:
    """One choice being generated: a row of the decode loop.  `events` receives
    (choice, TokenEvent), then (choice, None) when it ends, or (choice, exception)."""

    choice: int
    session: InferenceSession
    cache: SequenceCache
    prompt: torch.Tensor  # the prompt's token ids (penalties)
    params: SamplingParams
    generator: torch.Generator
    constraint: object | None  # edge_runtime.constraints.Constraint, or None: free text
    detokenizer: object  # IncrementalDetokenizer
    stops: object  # StopMatcher (restoring surrogates first where the prompt has any)
    max_context: int
    events: asyncio.Queue
    on_finish: Callable[["Generation"], None]  # remembers the sequence for the next turn
    logits: torch.Tensor | None = None  # of the next token, when the tail has run
    prompt_scores: list | None = None  # for the first event only
    pos: int = 0  # the position of the next token fed to the model
    cancelled: bool = False  # its consumer went away
    out: torch.Tensor | None = None  # the middle blocks' output for the token at `pos`
    stepping: asyncio.Task | None = None  # its session's step in flight
    _ids: torch.Tensor = field(default=None, repr=False)  # generated ids (penalties), grown in place
    count: int = 0  # tokens generated

    def __post_init__(self) -> None:
        self._ids = torch.empty(min(self.params.max_tokens, self.max_context), dtype=torch.long)

    @property
    def generated(self) -> list[int]:
        return self._ids[: self.count].tolist()

    def next_token(self, eos_ids: set[int]) -> int | None:
        """Sample and emit the next event; the token to feed on, or None when finished."""
        c = self.constraint
        s = sample(self.logits, self.params, self.generator, self.prompt, self._ids[: self.count],
                   c.allowed() if c else None)
        self._ids[self.count] = s.token_id
        self.count += 1
        if c:
            c.advance(s.token_id)
        event = TokenEvent(s.token_id, "", s.logprob, s.top, prompt_logprobs=self.prompt_scores)
        self.prompt_scores = None
        if s.token_id in eos_ids:
            event.text, event.finish_reason = self.stops.flush(), "stop"
        else:
            event.text, stopped = self.stops.push(self.detokenizer.push(s.token_id))
            if stopped:
                event.finish_reason = "stop"
            elif c and c.finished:
                event.text += self.stops.flush()
                event.finish_reason = "stop"
            elif self.count >= self.params.max_tokens or self.pos + 1 >= self.max_context:
                event.text += self.stops.flush()
                event.finish_reason = "length"
        if event.finish_reason:
            # The sequence the server and the edge now hold (the last token was sampled,
            # never sent): the next turn of this chat starts with it.
            self.on_finish(self)
        self.events.put_nowait((self.choice, event))
        if event.finish_reason:
            self.events.put_nowait((self.choice, None))
            return None
        return s.token_id

    def fail(self, error: BaseException) -> None:
        self.events.put_nowait((self.choice, error))

    async def cancel(self) -> None:
        """Its consumer went away: it leaves the loop, and a step in flight is abandoned
        (so its session can be closed; a late reply is dropped by the connection)."""
        self.cancelled = True
        if self.stepping is not None and not self.stepping.done():
            self.stepping.cancel()
            await asyncio.wait([self.stepping])


class DecodeLoop:
    def __init__(self, worker: EdgeWorker, eos_ids: set[int]):
        self.worker = worker
        self.eos_ids = eos_ids
        self._ready: list[Generation] = []
        self._task: asyncio.Task | None = None
        self._stats = {"iterations": 0, "rows": 0, "max_rows": 0}

    def add(self, gen: Generation) -> None:
        """Take `gen` (its logits in, or its step's output in `out`) into the next iteration."""
        self._ready.append(gen)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stats(self) -> dict:
        """Iterations run, rows (tokens) decoded through them, the most rows in one."""
        return dict(self._stats)

    async def _run(self) -> None:
        while self._ready:
            ready, self._ready = [g for g in self._ready if not g.cancelled], []
            try:
                await self._iteration(ready)
            except Exception as e:  # a failed batch fails its generations; the loop goes on
                log.exception("decode iteration failed")
                for g in ready:
                    g.fail(e)

    async def _iteration(self, ready: list[Generation]) -> None:
        tails = [g for g in ready if g.out is not None]
        if tails:
            logits = await self.worker.run_many("tail", [(g.cache, g.pos, g.out) for g in tails])
            for g, lg in zip(tails, logits):
                g.logits, g.out = lg, None
                g.pos += 1
        live, tokens = [], []
        for g in ready:
            if g.cancelled:
                continue
            token = g.next_token(self.eos_ids)
            if token is not None:
                live.append(g)
                tokens.append(token)
        if not live:
            return
        s = self._stats
        s["iterations"] += 1
        s["rows"] += len(live)
        s["max_rows"] = max(s["max_rows"], len(live))
        hidden = await self.worker.run_many("head", [(g.cache, g.pos, torch.tensor([t])) for g, t in zip(live, tokens)])
        steps = {}
        for g, h, t in zip(live, hidden, tokens):
            if not g.cancelled:  # (its consumer may have gone during the heads)
                g.stepping = asyncio.ensure_future(g.session.step(h, [t]))
                steps[g.stepping] = g
        if not steps:
            return
        await asyncio.wait(steps, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0)  # the rest of that reply frame's rows are in too
        for task, g in steps.items():
            if task.done():
                self._stepped(task, g, rejoin=False)
            else:  # held up: it rejoins when its step is done, the others go on now
                task.add_done_callback(lambda t, g=g: self._stepped(t, g, rejoin=True))
        self._ready = [g for g in steps.values() if g.out is not None] + self._ready

    def _stepped(self, task: asyncio.Task, g: Generation, rejoin: bool) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if g.cancelled:
            return
        if error is not None:
            g.fail(error)
            return
        g.out = task.result()[-1:]
        if rejoin:
            self.add(g)

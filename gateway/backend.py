"""The gateway's edge: one `AsyncEdgeClient` shared by every request.

All generations share its connections to the server runtimes (one per server; with
several `--server`s a generation whose server dies goes on on another) and its
EdgeWorker, which batches their head/tail/LM-head work.  A supervisor task loads the edge
model off the event loop, then keeps a connection up: a gateway started before its
servers (or whose server restarts) waits and retries instead of exiting, and /health says
503 until the edge is loaded and connected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, fields, replace
from typing import AsyncIterator, Callable

from edge_runtime.client import AsyncEdgeClient, TokenEvent
from edge_runtime.connection import ServerConnection, ServerError
from edge_runtime.constraints import Constraint
from edge_runtime.sampling import SamplingParams
from edge_runtime.settings import EdgeSettings
from fedsea_shared import defaults

from . import errors
from .limits import SessionShare
from .metrics import GatewayMetrics

log = logging.getLogger("fedsea.gateway")

RETRY_MAX_SECONDS = 10.0


@dataclass
class GatewaySettings:
    edge: EdgeSettings = field(default_factory=EdgeSettings)  # the edge it runs (and the server(s) it uses)
    host: str = "127.0.0.1"
    port: int = defaults.GATEWAY_PORT
    api_key: str | None = None  # when set, /v1 requires "Authorization: Bearer <key>"
    protect_status: bool = False  # require the key for /health, /metrics and /openapi.json too
    ssl_certfile: str | None = None  # with ssl_keyfile: serve the API over https
    ssl_keyfile: str | None = None
    server_metrics: Callable[[], bytes] | None = None  # an embedded server runtime's metrics, for /metrics (fedsea serve)

    @classmethod
    def of(cls, **options) -> "GatewaySettings":
        """Gateway and edge options in one flat call; each goes to the settings that has it."""
        own = {f.name for f in fields(cls)} - {"edge"}
        edge = EdgeSettings(**{k: v for k, v in options.items() if k not in own})
        return cls(edge=edge, **{k: v for k, v in options.items() if k in own})

    @property
    def servers(self) -> str:
        """The server runtime(s), for messages."""
        return ", ".join(self.edge.servers)


class Backend:
    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics):
        self.settings = settings
        self.metrics = metrics
        self.client: AsyncEdgeClient | None = None
        self.problem = "loading the edge model"  # why we are not ready, for /health
        self.share = SessionShare()
        self.link: ServerConnection | None = None  # the supervisor's live connection, for /fedsea/v1/status
        self._supervisor: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.client is not None and self.client.connected

    def start(self) -> None:
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self.client is not None:
            await self.client.aclose()

    async def _supervise(self) -> None:
        s = self.settings
        try:
            self.client = await asyncio.to_thread(AsyncEdgeClient, s.edge)
        except Exception as e:
            self.problem = f"the edge model failed to load: {e}"
            log.exception("edge model failed to load")
            return
        delay = 0.5
        while True:
            try:
                conn = await self.client.connection()
            except ServerError as e:  # the server refused the handshake (a different model or split)
                self.problem = f"the server runtime at {s.servers} refused this edge: {e.message}"
                log.error("%s; retrying in %.1fs", self.problem, delay)
            except Exception as e:  # not up (yet): refused, timed out, not a websocket server
                self.problem = f"waiting for the server runtime at {s.servers} ({str(e) or type(e).__name__})"
                log.warning("%s; retrying in %.1fs", self.problem, delay)
            else:
                self.metrics.ready.set(1)
                self.link = conn
                log.info("edge ready: connected to %s (layers %s on the server, noise %s)", conn.url, conn.welcome.layers, s.edge.noise)
                await conn.ws.wait_closed()
                self.metrics.ready.set(0)
                self.link = None
                self.problem = f"lost the connection to {conn.url}; reconnecting"
                log.warning(self.problem)
                delay = 0.5
            await asyncio.sleep(delay)
            delay = min(2 * delay, RETRY_MAX_SECONDS)

    def require_client(self) -> AsyncEdgeClient:
        if self.client is None:
            raise errors.APIError(503, f"not ready: {self.problem}", "server_error", code="loading")
        return self.client

    async def generate(
        self, prompts: list[list[int]], n: int, params: SamplingParams, max_tokens: int | None,
        adapter: str | None = None, constraint: Callable[[], Constraint] | None = None,
    ) -> AsyncIterator[tuple[int, TokenEvent]]:
        """Run n choices per prompt concurrently, with the base model or the named adapter;
        yield (choice index, event) as they come.  `constraint` makes each choice its
        own grammar state (structured outputs, tool calls).

        Choice i = prompt_index * n + j samples with seed + i, so the choices differ while a
        seeded request stays reproducible.  The n choices of a prompt share one prefill.
        Leaving the iteration early (a client disconnect) cancels every choice, and each
        closes its server session on the way out.
        """
        client = self.require_client()
        try:
            conn = await client.connection()
        except Exception as e:
            raise errors.from_edge(e, self.settings.servers) from e
        jobs = [(p * n, prompt, [replace(params, max_tokens=max_tokens, seed=None if params.seed is None else params.seed + p * n + j)
                                 for j in range(n)]) for p, prompt in enumerate(prompts)]
        self.share.acquire(len(prompts) * n, conn.welcome.max_sessions)
        queue: asyncio.Queue = asyncio.Queue()
        started = time.monotonic()
        tasks = [asyncio.create_task(self._choices(first, prompt, ps, adapter, constraint, queue, started))
                 for first, prompt, ps in jobs]
        try:
            remaining = len(prompts) * n
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise errors.from_edge(item, self.settings.servers)
                else:
                    yield i, item
        finally:
            self.share.release(len(prompts) * n)
            for task in tasks:
                task.cancel()

    async def _choices(self, first: int, prompt: list[int], choices: list[SamplingParams], adapter: str | None,
                       constraint: Callable[[], Constraint] | None, queue: asyncio.Queue, started: float) -> None:
        """The n choices of one prompt: one prefill, then forks (edge_runtime.client)."""
        m = self.metrics
        m.running.inc(len(choices))
        m.prompt_tokens.inc(len(prompt) * len(choices))
        last: dict[int, float] = {}
        running = len(choices)
        try:
            # Each choice follows its own grammar state; compiling one may take a while.
            grammars = [await asyncio.to_thread(constraint) for _ in choices] if constraint else None
            async for j, event in self.client.stream_choices(prompt, choices, adapter=adapter, constraints=grammars):
                now = time.monotonic()
                (m.ttft if j not in last else m.inter_token).observe(now - last.get(j, started))
                last[j] = now
                m.generation_tokens.inc()
                queue.put_nowait((first + j, event))
                if event.finish_reason:
                    m.finished.labels(event.finish_reason).inc()
                    m.running.dec()
                    running -= 1
            # Done once the stream has closed its server sessions: the request's share of
            # them is free again when its response ends.
            for j in range(len(choices)):
                queue.put_nowait((first + j, None))
        except Exception as e:
            queue.put_nowait((first, e))
        finally:
            m.running.dec(running)

"""The server runtime's network face: one websocket endpoint for edges, plus /health and
/metrics on the same port (wss:// and https:// with --ssl-certfile/--ssl-keyfile).

Each connection is checked once (API key, connection caps, then hello: protocol version
and partition) and then carries any number of sessions.  Every refused message gets a
typed Error frame and a (rate-limited) log line; only a failed handshake closes the
connection, and nothing a peer sends can take the process or other sessions down.  What
one tenant (an API key; a connection when the server has no keys) may hold is bounded:
connections, sessions, queued input bytes, KV blocks.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import logging
import signal
import ssl
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable

import torch
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from fedsea_shared import defaults, transport
from fedsea_shared.protocol import (
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    Close,
    Closed,
    ErrorCode,
    Fork,
    Hello,
    Open,
    Opened,
    Output,
    ProtocolError,
    Step,
    TRAINING_REQUESTS,
    Welcome,
    decode,
    encode,
    tensor_meta,
)
from fedsea_shared.prefix import prefix_root
from fedsea_shared.threads import run_here, serial

from .engine import Engine, EngineSettings
from .limits import BlockQuota, RefusalLog
from .metrics import ServerMetrics
from .executor import make_executor
from .training_service import TrainingService, TrainingSettings

log = logging.getLogger("fedsea.server")


@dataclass
class ServerSettings:
    model: str = defaults.MODEL
    head: int = defaults.HEAD
    tail: int = defaults.TAIL
    host: str = "127.0.0.1"
    port: int = defaults.SERVER_PORT
    device: str = "cpu"
    dtype: str = "float32"  # compute dtype
    kv_cache_memory: str = field(default_factory=defaults.kv_cache_memory)
    kv_dtype: str = "auto"  # the KV pool's: float32 | bfloat16 | float16 | auto (worker.resolve_kv_dtype)
    block_size: int = 16
    attention_backend: str = "auto"  # torch | vllm (vLLM's paged-attention kernels) | auto: vllm where installed and fit
    weights: str = field(default_factory=defaults.weights)  # the middle blocks' format (layers.linear.resolve_weights)
    linear_kernel: str = "auto"  # onednn | mixed | torch | auto: timed at start-up (fedsea_shared.shard.apply_linear_kernel)
    block_ops: str = "auto"  # norms, rotary, SiLU, short decode attention: native | vllm | torch | auto (shard.make_block_ops)
    decode_attention: str = "auto"  # torch backend: gather | flex | auto: flex (reads the pool in place) on CUDA, gather on CPU
    cuda_graphs: bool = True  # replay decode-only ticks as CUDA graphs (CUDA with flex attention only)
    max_graph_batch: int = 64  # decode ticks up to this many sessions use a graph
    noise_min: float = 0.0
    noise_max: float = 4.0
    max_sessions_per_connection: int = 256
    adapters: dict[str, str] = field(default_factory=dict)  # fine-tuned LoRA adapters served: name -> dir
    api_keys: tuple[str, ...] = ()  # empty: no authentication (loopback / trusted network)
    max_sessions_per_key: int = 1024  # across all connections presenting the same key
    max_message_bytes: int = 64 * 2**20
    engine: EngineSettings = field(default_factory=EngineSettings)
    # Exposure and per-tenant limits (a tenant: an API key, or one connection without keys).
    ssl_certfile: str | None = None  # with ssl_keyfile: serve wss:// and https://
    ssl_keyfile: str | None = None
    insecure: bool = False  # allow a non-loopback address without TLS and an API key
    protect_metrics: bool = False  # /metrics and /health need the API key too
    max_connections: int = 512
    max_connections_per_key: int = 32  # per client address when the server has no keys
    max_queued_bytes: int = 256 * 2**20  # input frames of one connection waiting or running
    kv_quota: float = 0.5  # share of the KV pool one tenant may hold
    tensor_parallel: int = 1  # ranks the middle blocks are split over (executor.py)
    tensor_parallel_timeout: float = 30.0  # seconds a rank may take to answer a collective before the server is unhealthy
    refusal_log_interval: float = 10.0  # seconds between full refusal log lines per connection
    enable_training: bool = False  # serve train_* (split fine-tuning) requests
    training: TrainingSettings = field(default_factory=TrainingSettings)

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None

    def check_exposure(self) -> None:
        """Hidden states are ~94% readable back to text (`fedsea audit`), so they and the
        key may cross a network only encrypted, to an authenticated server."""
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("--ssl-keyfile needs --ssl-certfile")
        if _loopback(self.host) or self.insecure or (self.tls and self.api_keys):
            return
        missing = [what for what, ok in (("TLS (--ssl-certfile, --ssl-keyfile)", self.tls),
                                         ("an API key (--api-key-file, --api-key or $FEDSEA_SERVER_API_KEYS)", self.api_keys))
                   if not ok]
        raise ValueError(f"refusing to listen on {self.host!r} (not a loopback address) without {' and '.join(missing)}; "
                         "pass --insecure only on a network you trust")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "" (every interface)
        return False


@dataclass
class _Connection:
    id: int
    ws: ServerConnection
    key_id: int | None = None  # which of the server's API keys it presented (never the key: ids get logged)
    refusals: RefusalLog | None = None
    hello: Hello | None = None
    sessions: set[int] = field(default_factory=set)
    tasks: set[asyncio.Task] = field(default_factory=set)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)  # the one serving it
    queued_bytes: int = 0  # input frames accepted and not yet answered

    @property
    def peer(self) -> str:
        return _peer(self.ws)

    @property
    def tenant(self) -> tuple[str, int]:
        """Who KV blocks are counted against."""
        return ("key", self.key_id) if self.key_id is not None else ("connection", self.id)

    def key(self, sid: int) -> tuple:
        """The engine's session key: the tenant first, for the KV quota."""
        return (self.tenant, self.id, sid)


def _peer(ws: ServerConnection) -> str:
    return "%s:%s" % tuple(ws.remote_address[:2]) if ws.remote_address else "?"


class ServerRuntime:
    def __init__(self, settings: ServerSettings, compute: Callable = run_here):
        """`compute(fn, *args)` runs the engine's forward passes (default: on the engine
        thread; `fedsea serve` passes its shared ComputeThread.run, see fedsea_shared.threads)."""
        settings.check_exposure()
        self.settings = settings
        self._live: dict[int, _Connection] = {}  # by connection id
        self._in_process: str | None = None  # the name it listens under in this process, if any
        self._links: set[asyncio.Task] = set()  # in-process connections being served (the loop holds tasks weakly)
        self._ssl = self._ssl_context() if settings.tls else None
        if not 0 < settings.kv_quota <= 1:
            raise ValueError(f"--kv-quota is a share of the KV pool in (0, 1], got {settings.kv_quota}")
        self.metrics = ServerMetrics()
        # Loading, kernel choice and KV sizing are the worker's (rank 0's here).
        self.executor = make_executor(settings, self.metrics, self._unhealthy)
        worker = self.executor.worker
        self.config, self.partition, self.shard, self.pool = worker.config, worker.partition, worker.shard, worker.pool
        self.weights = worker.weights
        self.shard_dtype, num_blocks = worker.dtype, worker.choices.num_blocks
        quota = (BlockQuota(max(1, int(settings.kv_quota * num_blocks)), owner_of=lambda key: key[0])
                 if settings.kv_quota < 1 else None)  # 1: a tenant may fill the pool (then waits, as anyone)
        self.engine = Engine(self.executor, settings.engine, self.metrics, quota, compute, on_expired=self._expired)
        self.training = (TrainingService(self.shard, self.partition, settings.device, settings.training)
                         if settings.enable_training else None)
        if self.training is not None:
            self.metrics.training_jobs.set_function(lambda: len(self.training.jobs))
            self.metrics.training_memory.set_function(lambda: self.training.memory_used)
        self._ids = itertools.count()
        # Session keys per API key, as sets: a session is counted once however it ends
        # (closed while still waiting to open, then its connection dropping, ...).
        self._sessions_per_key: defaultdict[int, set[tuple]] = defaultdict(set)
        self._connections_per_client: Counter[int | str] = Counter()
        self._connections = 0
        # Refused handshakes (bad key, connection caps) share one rate-limited log.
        self._handshake_refusals = RefusalLog(log, "new connections", settings.refusal_log_interval)
        log.info("server runtime: layers [%d, %d) of %d, %s, adapters: %s", *self.partition.server_range,
                 self.config.num_hidden_layers, worker.describe(), ", ".join(settings.adapters) or "none")

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.settings.ssl_certfile, self.settings.ssl_keyfile)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"cannot load --ssl-certfile/--ssl-keyfile: {e}") from None
        return ctx

    def _unhealthy(self, reason: str) -> None:
        """A rank failed (the executor says why, from any thread): /health fails from now on
        and every connection closes, so edges replay their sessions on another server."""
        live = list(self._live.values())
        for conn in live:
            if not conn.loop.is_closed():
                conn.loop.call_soon_threadsafe(lambda ws=conn.ws: asyncio.ensure_future(ws.close(1011, "server unhealthy")))
        log.error("closing %d connections: %s", len(live), reason)

    def _expired(self, key: tuple) -> None:
        """The engine freed an idle session (on its thread): its connection forgets it."""
        conn = self._live.get(key[1])
        if conn is not None and not conn.loop.is_closed():
            conn.loop.call_soon_threadsafe(self._forget_expired, key)

    def _forget_expired(self, key: tuple) -> None:
        _, conn_id, sid = key
        conn = self._live.get(conn_id)
        if conn is not None and sid in conn.sessions:
            conn.sessions.discard(sid)
            self._forget_session(conn, sid)

    async def serve(self) -> Server:
        return await serve(
            self._handle,
            self.settings.host,
            self.settings.port,
            ssl=self._ssl,
            process_request=self._http,
            compression=None,  # hidden states do not compress; deflate only costs CPU
            # Frames up to max_message_bytes get a typed error; beyond twice that the
            # websocket library closes the connection (code 1009) before reading it all.
            max_size=2 * self.settings.max_message_bytes,
        )

    def listen_in_process(self, name: str = "server") -> str:
        """Serve edges of this process over an in-process link (`fedsea serve`); returns
        the URL they connect to.  Connections run on the connecting edge's event loop."""
        self._in_process = name
        return transport.listen(name, self._accept)

    def _accept(self, end: transport.LinkEnd) -> None:
        refusal = self._connection_refusal(self._client(end, end.request))
        if refusal is not None:
            raise ConnectionRefusedError(refusal)
        task = asyncio.get_running_loop().create_task(self._handle(end))
        self._links.add(task)
        task.add_done_callback(self._links.discard)

    def close(self) -> None:
        if self._in_process is not None:
            transport.unlisten(self._in_process)
        self.engine.shutdown()
        self.executor.shutdown()
        if self.training is not None:
            self.training.close()

    # ---- HTTP -----------------------------------------------------------------------------

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        s = self.settings
        authorized = not s.api_keys or self._key_id(request) is not None
        if request.path in ("/health", "/metrics") and (authorized or not s.protect_metrics):
            if request.path == "/health":
                failure = self.executor.failure
                return connection.respond(*((HTTPStatus.SERVICE_UNAVAILABLE, f"unhealthy: {failure}\n") if failure
                                            else (HTTPStatus.OK, "ok\n")))
            headers = Headers([("Content-Type", "text/plain; version=0.0.4; charset=utf-8")])
            return Response(200, "OK", headers, self.metrics.render())
        if not authorized:
            self._handshake_refusals.refused("unauthorized", f"{_peer(connection)} without a valid API key")
            return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or invalid API key (Authorization: Bearer ...)\n")
        refusal = (f"server unhealthy: {self.executor.failure}" if self.executor.failure
                   else self._connection_refusal(self._client(connection, request)))
        if refusal is not None:
            self._handshake_refusals.refused("limit", f"{_peer(connection)}: {refusal}")
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, refusal + "\n")
        return None

    def _key_id(self, request: Request) -> int | None:
        """The index of the API key the request presents, if it is one of the server's."""
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":  # a bare key is refused: it is not the documented form
            return None
        for i, key in enumerate(self.settings.api_keys):
            if hmac.compare_digest(given.strip().encode(), key.encode()):
                return i
        return None

    def _client(self, ws: ServerConnection, request: Request) -> int | str:
        """Who connection caps count against: the API key, else the peer's address."""
        key_id = self._key_id(request) if self.settings.api_keys else None
        return key_id if key_id is not None else (ws.remote_address[0] if ws.remote_address else "?")

    def _connection_refusal(self, client: str) -> str | None:
        s = self.settings
        if self._connections >= s.max_connections:
            return f"the server has {self._connections} connections (limit {s.max_connections}); retry later"
        if self._connections_per_client[client] >= s.max_connections_per_key:
            who = "this API key" if s.api_keys else "this address"
            return f"{who} already has {self._connections_per_client[client]} connections (limit {s.max_connections_per_key})"
        return None

    # ---- websocket ------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        client = self._client(ws, ws.request)
        # Checked again here: handshakes that passed _http together may not all fit.
        refusal = self._connection_refusal(client)
        if refusal is not None:
            return await ws.close(1013, "connection limit")
        self._connections += 1
        self._connections_per_client[client] += 1
        conn = _Connection(next(self._ids), ws, self._key_id(ws.request) if self.settings.api_keys else None)
        conn.refusals = RefusalLog(log, conn.peer, self.settings.refusal_log_interval)
        self._live[conn.id] = conn
        self.metrics.connections.inc()
        log.info("edge connected from %s (connection %d)", conn.peer, conn.id)
        try:
            async for data in ws:
                try:
                    await self._on_frame(conn, data)
                except ProtocolError as e:
                    await self._refuse(conn, e)
        except ConnectionClosed:
            pass
        finally:
            self._live.pop(conn.id, None)
            self._connections -= 1
            self._connections_per_client[client] -= 1
            if not self._connections_per_client[client]:
                del self._connections_per_client[client]
            self.metrics.connections.dec()
            for task in conn.tasks:
                task.cancel()
            for sid in conn.sessions:
                self.engine.close(conn.key(sid))
                self._forget_session(conn, sid)
            if self.training is not None:
                self.training.disconnect(conn.id)
            conn.refusals.flush()
            log.info("edge %s disconnected; freed %d sessions", conn.peer, len(conn.sessions))

    async def _refuse(self, conn: _Connection, error: ProtocolError, fatal: bool = False) -> None:
        self.metrics.errors.labels(error.code.value).inc()
        conn.refusals.refused(error.code.value, f"{error}{' (closing)' if fatal else ''}")
        try:
            for message in error.to_messages(fatal):
                await conn.ws.send(encode(message))
            if fatal:
                await conn.ws.close(1008, error.code.value)
        except ConnectionClosed:
            pass

    async def _on_frame(self, conn: _Connection, data: bytes | str) -> None:
        self.metrics.received_bytes.inc(len(data))
        if len(data) > self.settings.max_message_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"message of {len(data)} bytes exceeds the limit of {self.settings.max_message_bytes}")
        message, tensor = decode(data)
        if isinstance(message, Hello):
            return await self._on_hello(conn, message)
        if conn.hello is None:
            raise ProtocolError(ErrorCode.NOT_READY, "send hello first", getattr(message, "sid", None))
        if isinstance(message, (Open, Fork)):
            return self._spawn(conn, self._on_open(conn, message))
        if isinstance(message, Step):
            steps = await self._check_step(conn, message, tensor)
            if steps:
                self._spawn(conn, self._on_step(conn, steps), len(data), [sid for sid, _, _ in steps])
            return
        if isinstance(message, Close):
            return await self._on_close(conn, message)
        if isinstance(message, TRAINING_REQUESTS):
            if self.training is None:
                raise ProtocolError(ErrorCode.DISABLED, "training is disabled on this server (start it with --enable-training)", message.sid)
            return self._spawn(conn, self._on_training(conn, message, tensor), len(data), message.sid)
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{message.type!r} is a server message; an edge may not send it")

    async def _on_training(self, conn: _Connection, message, tensor: torch.Tensor | None) -> None:
        try:
            reply, out = await self.training.handle(conn.id, message, tensor, conn.key_id)
            await conn.ws.send(encode(reply, out))
        except ProtocolError as e:
            e.sid = message.sid
            await self._refuse(conn, e)
        except ConnectionClosed:
            pass

    def _spawn(self, conn: _Connection, coro, nbytes: int = 0, sid: int | list[int] | None = None) -> None:
        """Run a request; `nbytes` of input stay counted against the connection until it is
        answered, so a peer that sends faster than the server answers is refused, not queued."""
        limit = self.settings.max_queued_bytes
        if nbytes and conn.queued_bytes + nbytes > limit:
            coro.close()
            raise ProtocolError(ErrorCode.LIMIT, f"{conn.queued_bytes} bytes of this connection's input are still "
                                                 f"queued (limit {limit}); wait for replies before sending more", sid)
        conn.queued_bytes += nbytes
        task = asyncio.create_task(coro)
        conn.tasks.add(task)

        def done(task):
            conn.tasks.discard(task)
            conn.queued_bytes -= nbytes

        task.add_done_callback(done)

    async def _on_hello(self, conn: _Connection, hello: Hello) -> None:
        expected = self.partition.server_range
        if hello.v != PROTOCOL_VERSION:
            error = ProtocolError(ErrorCode.VERSION, f"edge speaks protocol v{hello.v}, server speaks v{PROTOCOL_VERSION}")
        elif hello.num_layers != self.config.num_hidden_layers or hello.hidden_size != self.config.hidden_size:
            error = ProtocolError(
                ErrorCode.PARTITION_MISMATCH,
                f"edge model has {hello.num_layers} layers of width {hello.hidden_size}; this server serves "
                f"{self.config.num_hidden_layers} layers of width {self.config.hidden_size} (a different model)",
            )
        elif tuple(hello.layers) != expected:
            error = ProtocolError(
                ErrorCode.PARTITION_MISMATCH,
                f"edge expects the server to run layers [{hello.layers[0]}, {hello.layers[1]}) but this server "
                f"runs [{expected[0]}, {expected[1]}) (head={self.partition.head}, tail={self.partition.tail}); "
                f"start the edge with --head {self.partition.head} --tail {self.partition.tail}",
            )
        elif conn.hello is not None:
            error = ProtocolError(ErrorCode.BAD_FRAME, "hello was already sent on this connection")
        else:
            conn.hello = hello
            s = self.settings
            await conn.ws.send(encode(Welcome(
                layers=expected, dtype=hello.dtype, noise_min=s.noise_min, noise_max=s.noise_max,
                max_context=s.engine.max_context, max_sessions=s.max_sessions_per_connection,
                max_message_bytes=s.max_message_bytes, block_size=s.block_size, adapters=list(s.adapters) or None,
                load=self.engine.load,
            )))
            return
        await self._refuse(conn, error, fatal=error.code != ErrorCode.BAD_FRAME)

    async def _on_open(self, conn: _Connection, msg: Open | Fork) -> None:
        s = self.settings
        try:
            if isinstance(msg, Fork):
                if msg.parent not in conn.sessions:
                    raise ProtocolError(ErrorCode.UNKNOWN_SESSION, f"fork of session {msg.parent}, which is not open on this connection", msg.sid)
            elif msg.adapter is not None and msg.adapter not in s.adapters:
                served = ", ".join(s.adapters) or "none"
                raise ProtocolError(ErrorCode.UNKNOWN_ADAPTER, f"this server serves no adapter {msg.adapter!r} (adapters: {served})", msg.sid)
            elif not s.noise_min <= msg.noise <= s.noise_max:
                raise ProtocolError(ErrorCode.NOISE_OUT_OF_BOUNDS, f"noise {msg.noise} is outside the server's bounds [{s.noise_min}, {s.noise_max}]", msg.sid)
            elif len(msg.partial or ()) >= s.block_size:
                raise ProtocolError(ErrorCode.BAD_FRAME, f"open names {len(msg.partial)} partial rows; a block holds {s.block_size}", msg.sid)
            reopen = isinstance(msg, Open) and msg.reopen
            if reopen:
                if msg.sid not in conn.sessions:
                    raise ProtocolError(ErrorCode.UNKNOWN_SESSION, "reopen of a session that is not open on this connection", msg.sid)
            else:
                if msg.sid in conn.sessions:
                    raise ProtocolError(ErrorCode.SESSION_EXISTS, "session id already open on this connection", msg.sid)
                if len(conn.sessions) >= s.max_sessions_per_connection:
                    raise ProtocolError(ErrorCode.LIMIT, f"this connection already has {len(conn.sessions)} sessions (limit {s.max_sessions_per_connection})", msg.sid)
                if conn.key_id is not None and len(self._sessions_per_key[conn.key_id]) >= s.max_sessions_per_key:
                    raise ProtocolError(ErrorCode.LIMIT, f"this API key already has {s.max_sessions_per_key} open sessions", msg.sid)
                conn.sessions.add(msg.sid)
                if conn.key_id is not None:
                    self._sessions_per_key[conn.key_id].add(conn.key(msg.sid))
            key = conn.key(msg.sid)
            if isinstance(msg, Fork):
                opened = self.engine.fork(key, conn.key(msg.parent))
            else:
                root = prefix_root(conn.hello.num_layers, conn.hello.hidden_size, self.partition.server_range,
                                   conn.hello.dtype, msg.adapter)
                opened = self.engine.open(key, msg.adapter, root, [bytes.fromhex(k) for k in msg.prefix or ()], reopen,
                                          [bytes.fromhex(d) for d in msg.partial or ()])
            try:
                cached = await asyncio.wrap_future(opened)
            except BaseException:
                if not reopen:  # a failed reopen leaves the session open (preempted): the edge may close it
                    conn.sessions.discard(msg.sid)
                    self._forget_session(conn, msg.sid)
                raise
            await conn.ws.send(encode(Opened(sid=msg.sid, cached=cached, load=self.engine.load)))
        except ProtocolError as e:
            e.sid = msg.sid
            await self._refuse(conn, e)
        except ConnectionClosed:
            pass

    def _forget_session(self, conn: _Connection, sid: int) -> None:
        if conn.key_id is not None:
            self._sessions_per_key[conn.key_id].discard(conn.key(sid))

    async def _check_step(self, conn: _Connection, msg: Step, tensor: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        """The frame's (sid, pos, hidden states in the server's dtype) that pass the checks;
        each session whose rows do not is told why, and the others go on."""
        hidden = self.config.hidden_size
        if tensor.shape[1] != hidden:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"hidden states must be [tokens, {hidden}], got {list(tensor.shape)}", msg.sids)
        if msg.tensor.dtype != conn.hello.dtype:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"dtype {msg.tensor.dtype} but {conn.hello.dtype} was negotiated", msg.sids)
        # Checked after the cast: 3.4e38 is finite in float32 and Inf in bfloat16.
        tensor = tensor.to(self.shard_dtype)
        finite = torch.isfinite(tensor).all(dim=1)
        steps, start = [], 0
        for (sid, pos, n), rows in zip(msg.rows, msg.split(tensor)):
            ok = finite[start : start + n].all()
            start += n
            if sid not in conn.sessions:
                await self._refuse(conn, ProtocolError(ErrorCode.UNKNOWN_SESSION, "no such session on this connection", sid))
            elif not ok:
                await self._refuse(conn, ProtocolError(
                    ErrorCode.NON_FINITE, f"hidden states contain NaN or Inf (in the server's {self.settings.dtype})", sid))
            else:
                steps.append((sid, pos, rows))
        return steps

    async def _on_step(self, conn: _Connection, steps: list[tuple[int, int, torch.Tensor]]) -> None:
        """Run the steps of one frame in one engine command (so they share a tick) and answer
        with one Output per tick that finished some of them."""
        wire = WIRE_DTYPES[conn.hello.dtype]
        futures = self.engine.step_many([(conn.key(sid), pos, rows) for sid, pos, rows in steps])
        waiting = {asyncio.wrap_future(f): (f, sid, pos) for f, (sid, pos, _) in zip(futures, steps)}
        for w in waiting:  # each outcome is read from the engine's future; the wrapper's is only a wake-up
            w.add_done_callback(lambda w: w.cancelled() or w.exception())
        try:
            while waiting:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                with self.engine.resolving:  # the whole tick's results, not the first few
                    finished = [w for w, (f, _, _) in waiting.items() if f.done()]
                rows, outs = [], []
                for w in finished:
                    fut, sid, pos = waiting.pop(w)
                    error = fut.exception()
                    if error is None:
                        out = fut.result().to("cpu", wire)
                        rows.append((sid, pos, out.shape[0]))
                        outs.append(out)
                    elif isinstance(error, ProtocolError):
                        error.sid = sid
                        await self._refuse(conn, error)
                    else:
                        raise error
                if rows:
                    out = torch.cat(outs) if len(outs) > 1 else outs[0]
                    await conn.ws.send(encode(Output(rows=rows, tensor=tensor_meta(out)), out))
        except ConnectionClosed:
            pass

    async def _on_close(self, conn: _Connection, msg: Close) -> None:
        if msg.sid not in conn.sessions:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, "no such session on this connection", msg.sid)
        conn.sessions.discard(msg.sid)
        self._forget_session(conn, msg.sid)
        await asyncio.wrap_future(self.engine.close(conn.key(msg.sid)))
        await conn.ws.send(encode(Closed(sid=msg.sid, load=self.engine.load)))


async def run_server(settings: ServerSettings) -> None:
    serial()  # this event loop only moves small tensors; the engine thread computes
    runtime = ServerRuntime(settings)
    try:
        async with await runtime.serve() as server:
            # SIGTERM (docker stop, kill) closes connections cleanly, freeing sessions.
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.close)
            log.info("listening on %s://%s:%d", "wss" if settings.tls else "ws", settings.host, settings.port)
            await server.serve_forever()
    finally:
        runtime.close()


class ServerThread:
    """A server runtime on its own event-loop thread: the embedded server of `fedsea
    serve`, and the tests' in-process server.  port=0 picks a free port."""

    def __init__(self, settings: ServerSettings, compute: Callable = run_here):
        self.runtime = ServerRuntime(settings, compute)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedsea-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout=30):
            raise RuntimeError("server runtime did not start")
        if self._error:
            raise self._error

    _error: BaseException | None = None

    def _run(self) -> None:
        serial()
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(self.runtime.serve())
        except BaseException as e:  # e.g. the port is taken
            self._error = e
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"{'wss' if self.runtime.settings.tls else 'ws'}://{self.runtime.settings.host}:{self.port}"

    def stop(self) -> None:
        async def shutdown():
            self._server.close()
            await self._server.wait_closed()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=15)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=15)
        self.runtime.close()

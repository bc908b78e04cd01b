"""The server runtime's network face: one websocket endpoint for edges, plus /health and
/metrics over plain HTTP on the same port.

Each connection is checked once (hello: protocol version and partition) and then carries
any number of sessions.  Every refused message gets a typed Error frame and a log line;
only a failed handshake closes the connection, and nothing a peer sends can take the
process or other sessions down.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import signal
import threading
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus

import torch
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from fedsea_shared import defaults
from fedsea_shared.adapters import load_adapters
from fedsea_shared.models import resolve_model
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
from fedsea_shared.shard import Partition, head_dim, load_config, load_server_shard

from .engine import Engine, EngineSettings
from .kv_pool import KVPool, parse_memory
from .metrics import ServerMetrics
from .model_runner import ModelRunner
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
    dtype: str = "float32"  # compute and KV dtype
    kv_cache_memory: str = "1GiB"  # bytes, or a fraction of free accelerator memory
    block_size: int = 16
    decode_attention: str = "auto"  # gather | flex | auto: flex (reads the pool in place) on CUDA, gather on CPU
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
    training: TrainingSettings = field(default_factory=TrainingSettings)


@dataclass
class _Connection:
    id: int
    ws: ServerConnection
    api_key: str | None = None
    hello: Hello | None = None
    sessions: set[int] = field(default_factory=set)
    tasks: set[asyncio.Task] = field(default_factory=set)

    @property
    def peer(self) -> str:
        return "%s:%s" % tuple(self.ws.remote_address[:2]) if self.ws.remote_address else "?"


class ServerRuntime:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        model_dir = resolve_model(settings.model)
        self.config = load_config(model_dir)
        self.partition = Partition(self.config.num_hidden_layers, settings.head, settings.tail)
        dtype = WIRE_DTYPES[settings.dtype]
        self.shard = load_server_shard(model_dir, self.partition, dtype=dtype, device=settings.device, config=self.config)
        layers = self.partition.server_layers
        per_block = KVPool.bytes_per_block(
            len(layers), settings.block_size, self.config.num_key_value_heads, head_dim(self.config), dtype
        )
        free = torch.cuda.mem_get_info()[0] if settings.device.startswith("cuda") else None
        num_blocks = parse_memory(settings.kv_cache_memory, free) // per_block - 1  # minus the scratch block
        self.pool = KVPool(
            len(layers), num_blocks, settings.block_size, self.config.num_key_value_heads,
            head_dim(self.config), dtype, settings.device,
        )
        self.metrics = ServerMetrics()
        # Merged before training can wrap the shard's linears in LoRA layers.
        adapted = load_adapters(self.shard, settings.model, settings.adapters)
        on_cuda = torch.device(settings.device).type == "cuda"
        attention = settings.decode_attention
        if attention == "auto":
            attention = "flex" if on_cuda else "gather"
        graphs = settings.cuda_graphs and on_cuda and attention == "flex"
        if graphs and settings.max_graph_batch < 1:
            raise ValueError(f"--max-graph-batch must be >= 1 (got {settings.max_graph_batch})")

        def runner(shard):
            return ModelRunner(shard, layers, self.pool, settings.device, attention, graphs,
                               settings.max_graph_batch, settings.engine.max_context)

        self.engine = Engine(runner(self.shard), self.pool, settings.engine, self.metrics,
                             {name: runner(shard) for name, shard in adapted.items()})
        self.training = TrainingService(self.shard, self.partition, settings.device, settings.training)
        self._ids = itertools.count()
        self._sessions_per_key: Counter[str | None] = Counter()
        log.info(
            "server runtime: layers [%d, %d) of %d, KV pool %d blocks x %d tokens (%.1f MiB), "
            "decode attention %s%s, adapters: %s",
            *self.partition.server_range, self.config.num_hidden_layers,
            num_blocks, settings.block_size, self.pool.nbytes / 2**20,
            attention, " + CUDA graphs" if graphs else "", ", ".join(settings.adapters) or "none",
        )

    async def serve(self) -> Server:
        return await serve(
            self._handle,
            self.settings.host,
            self.settings.port,
            process_request=self._http,
            compression=None,  # hidden states do not compress; deflate only costs CPU
            # Frames up to max_message_bytes get a typed error; beyond twice that the
            # websocket library closes the connection (code 1009) before reading it all.
            max_size=2 * self.settings.max_message_bytes,
        )

    def close(self) -> None:
        self.engine.shutdown()
        self.training.close()

    # ---- HTTP -----------------------------------------------------------------------------

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/health":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if request.path == "/metrics":
            headers = Headers([("Content-Type", "text/plain; version=0.0.4; charset=utf-8")])
            return Response(200, "OK", headers, self.metrics.render())
        if self.settings.api_keys and self._api_key(request) is None:
            log.warning("refused a connection without a valid API key")
            return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or invalid API key (Authorization: Bearer ...)\n")
        return None

    def _api_key(self, request: Request) -> str | None:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip().encode()
        for key in self.settings.api_keys:
            if hmac.compare_digest(given, key.encode()):
                return key
        return None

    # ---- websocket ------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        conn = _Connection(next(self._ids), ws, self._api_key(ws.request) if self.settings.api_keys else None)
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
            self.metrics.connections.dec()
            for task in conn.tasks:
                task.cancel()
            for sid in conn.sessions:
                self.engine.close((conn.id, sid))
            self._sessions_per_key[conn.api_key] -= len(conn.sessions)
            self.training.disconnect(conn.id)
            log.info("edge %s disconnected; freed %d sessions", conn.peer, len(conn.sessions))

    async def _refuse(self, conn: _Connection, error: ProtocolError, fatal: bool = False) -> None:
        self.metrics.errors.labels(error.code.value).inc()
        log.warning("refused from %s: %s%s", conn.peer, error, " (closing)" if fatal else "")
        try:
            await conn.ws.send(encode(error.to_message(fatal)))
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
            self._check_step(conn, message, tensor)
            return self._spawn(conn, self._on_step(conn, message, tensor))
        if isinstance(message, Close):
            return await self._on_close(conn, message)
        if isinstance(message, TRAINING_REQUESTS):
            return self._spawn(conn, self._on_training(conn, message, tensor))
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{message.type!r} is a server message; an edge may not send it")

    async def _on_training(self, conn: _Connection, message, tensor: torch.Tensor | None) -> None:
        try:
            reply, out = await self.training.handle(conn.id, message, tensor)
            await conn.ws.send(encode(reply, out))
        except ProtocolError as e:
            e.sid = message.sid
            await self._refuse(conn, e)
        except ConnectionClosed:
            pass

    def _spawn(self, conn: _Connection, coro) -> None:
        task = asyncio.create_task(coro)
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)

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
            if msg.sid in conn.sessions:
                raise ProtocolError(ErrorCode.SESSION_EXISTS, "session id already open on this connection", msg.sid)
            if len(conn.sessions) >= s.max_sessions_per_connection:
                raise ProtocolError(ErrorCode.LIMIT, f"this connection already has {len(conn.sessions)} sessions (limit {s.max_sessions_per_connection})", msg.sid)
            if conn.api_key is not None and self._sessions_per_key[conn.api_key] >= s.max_sessions_per_key:
                raise ProtocolError(ErrorCode.LIMIT, f"this API key already has {s.max_sessions_per_key} open sessions", msg.sid)
            conn.sessions.add(msg.sid)
            self._sessions_per_key[conn.api_key] += 1
            key = (conn.id, msg.sid)
            if isinstance(msg, Fork):
                opened = self.engine.fork(key, (conn.id, msg.parent))
            else:
                root = prefix_root(conn.hello.num_layers, conn.hello.hidden_size, self.partition.server_range,
                                   conn.hello.dtype, msg.adapter)
                opened = self.engine.open(key, msg.adapter, root, [bytes.fromhex(k) for k in msg.prefix or ()])
            try:
                cached = await asyncio.wrap_future(opened)
            except BaseException:
                conn.sessions.discard(msg.sid)
                self._sessions_per_key[conn.api_key] -= 1
                raise
            await conn.ws.send(encode(Opened(sid=msg.sid, cached=cached)))
        except ProtocolError as e:
            e.sid = msg.sid
            await self._refuse(conn, e)
        except ConnectionClosed:
            pass

    def _check_step(self, conn: _Connection, msg: Step, tensor: torch.Tensor) -> None:
        if msg.sid not in conn.sessions:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, "no such session on this connection", msg.sid)
        hidden = self.config.hidden_size
        if tensor.dim() != 2 or tensor.shape[1] != hidden:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"hidden states must be [tokens, {hidden}], got {list(tensor.shape)}", msg.sid)
        if msg.tensor.dtype != conn.hello.dtype:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"dtype {msg.tensor.dtype} but {conn.hello.dtype} was negotiated", msg.sid)
        if not torch.isfinite(tensor).all():
            raise ProtocolError(ErrorCode.NON_FINITE, "hidden states contain NaN or Inf", msg.sid)

    async def _on_step(self, conn: _Connection, msg: Step, tensor: torch.Tensor) -> None:
        try:
            out = await asyncio.wrap_future(self.engine.step((conn.id, msg.sid), msg.pos, tensor))
            out = out.to("cpu", WIRE_DTYPES[conn.hello.dtype])
            await conn.ws.send(encode(Output(sid=msg.sid, pos=msg.pos, tensor=tensor_meta(out)), out))
        except ProtocolError as e:
            e.sid = msg.sid
            await self._refuse(conn, e)
        except ConnectionClosed:
            pass

    async def _on_close(self, conn: _Connection, msg: Close) -> None:
        if msg.sid not in conn.sessions:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, "no such session on this connection", msg.sid)
        conn.sessions.discard(msg.sid)
        self._sessions_per_key[conn.api_key] -= 1
        await asyncio.wrap_future(self.engine.close((conn.id, msg.sid)))
        await conn.ws.send(encode(Closed(sid=msg.sid)))


async def run_server(settings: ServerSettings) -> None:
    runtime = ServerRuntime(settings)
    try:
        async with await runtime.serve() as server:
            # SIGTERM (docker stop, kill) closes connections cleanly, freeing sessions.
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.close)
            log.info("listening on ws://%s:%d", settings.host, settings.port)
            await server.serve_forever()
    finally:
        runtime.close()


class ServerThread:
    """A server runtime on its own event-loop thread: the embedded server of `fedsea
    serve`, and the tests' in-process server.  port=0 picks a free port."""

    def __init__(self, settings: ServerSettings):
        self.runtime = ServerRuntime(settings)
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
        return f"ws://{self.runtime.settings.host}:{self.port}"

    def stop(self) -> None:
        async def shutdown():
            self._server.close()
            await self._server.wait_closed()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=15)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=15)
        self.runtime.close()

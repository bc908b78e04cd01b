"""The edge's end of the websocket: handshake, then many sessions multiplexed on it.

Each session has at most one request in flight, so replies are matched to requests by
session id alone.  The steps that sessions ask for in one event-loop iteration (the decode
loop steps every live generation at once) leave as one Step frame, and the server answers
them with one Output per tick.  A reader task dispatches replies; if the connection drops,
every waiting request fails with `ConnectionLost` and the session objects decide whether
to recover on a new connection.

A broken or hostile server must not hurt the edge: no frame larger than the largest
reply the edge can ask for is read (websockets refuses it from its length field, before
any payload is buffered), and every reply is checked against its request (shape, dtype,
position, finiteness) before it reaches the tail blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time

import torch
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import CloseCode

from fedsea_shared import transport
from fedsea_shared.protocol import (
    MAX_HEADER_BYTES,
    MAX_STEP_SESSIONS,
    WIRE_DTYPES,
    Close,
    Closed,
    Error,
    ErrorCode,
    Fork,
    Hello,
    Load,
    Open,
    Opened,
    Output,
    ProtocolError,
    Step,
    TensorMeta,
    Welcome,
    decode,
    encode,
    step_frame_bytes,
    tensor_meta,
)

log = logging.getLogger("fedsea.edge.connection")

LOGGED_PEER_FAULTS = 10  # per connection; then one line per 1000, so a server cannot flood the log


class ServerError(Exception):
    """The server refused a request; `code` is a protocol ErrorCode value."""

    def __init__(self, code: str, message: str):
        super().__init__(f"server refused: {message} ({code})")
        self.code = code
        self.message = message


class ConnectionLost(ServerError):
    def __init__(self, message: str = "connection to the server runtime was lost"):
        super().__init__("connection_lost", message)


class BadReply(ServerError):
    """The server's reply does not fit the request (or no reply could be read): it is
    broken or hostile, so the request fails rather than being retried or used."""

    def __init__(self, message: str):
        super().__init__("bad_reply", f"the server runtime sent an invalid reply: {message}")


def check_reply(sent: TensorMeta, got: TensorMeta, tensor: torch.Tensor, what: str = "") -> None:
    """A reply's tensor must have the dtype and shape of the request's and be finite."""
    if got != sent:
        raise BadReply(f"asked for {sent.dtype}{sent.shape}{what}, got {got.dtype}{got.shape}")
    if not bool(torch.isfinite(tensor).all()):
        raise BadReply("the tensor holds NaN or Inf")


def max_reply_bytes(hello: Hello, tokens: int) -> int:
    """The largest frame a reply to a step of `tokens` tokens can be: a header (bounded by
    the protocol) and [tokens, hidden_size] at the wire dtype."""
    return 4 + MAX_HEADER_BYTES + tokens * hello.hidden_size * WIRE_DTYPES[hello.dtype].itemsize


def client_ssl(url: str, server_ca: str | None = None) -> ssl.SSLContext | None:
    """TLS for a wss:// URL: the server's certificate is verified against `server_ca` (a
    private CA or a self-signed certificate, PEM) or else the system trust store."""
    if not url.startswith("wss://"):
        if server_ca is not None:
            raise ValueError(f"a server CA was given but {url!r} is not a wss:// URL")
        return None
    try:
        return ssl.create_default_context(cafile=server_ca)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load the server CA {server_ca!r}: {e}") from None


class ServerConnection:
    def __init__(self, ws: ClientConnection | transport.LinkEnd, welcome: Welcome, wire_dtype: str, url: str,
                 max_step_tokens: int | None = None, max_size: int | None = None):
        self.ws = ws
        self.max_size = max_size  # bytes of the largest frame read
        # Rows per Step frame: the server answers a frame's rows in Outputs no larger than
        # the frame, which must fit the frames this edge reads (see connect).
        self.max_frame_rows = max_step_tokens
        self.url = url  # which server runtime (for the client's failover policy and messages)
        self.welcome = welcome
        self.wire_dtype = WIRE_DTYPES[wire_dtype]
        self._sids = itertools.count()
        self._waiting: dict[int, asyncio.Future] = {}
        self._asked: dict[int, tuple[int, TensorMeta]] = {}  # sid -> (pos, rows) of its step in flight
        self._outbox: list[tuple[int, int, torch.Tensor]] = []  # steps asked for this loop iteration
        self._sender: asyncio.Task | None = None
        # Sessions whose request was cancelled (a client went away mid-step): the server
        # still answers it, and that late reply must not be taken for the next request's.
        self._abandoned: set[int] = set()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.closed = False
        self._faults = 0  # undecodable frames and errors from the server, for the log limit
        # This edge's sessions open (or opening) on this server: its own count of the
        # server's load, which no figure the server reports can lower.
        self.sessions: set[int] = set()
        self.load: Load | None = welcome.load  # the server's latest report of its load
        self.load_at = time.monotonic()  # when it came

    @classmethod
    async def connect(
        cls, url: str, hello: Hello, api_key: str | None = None, open_timeout: float = 10,
        max_step_tokens: int | None = None, server_ca: str | None = None,
    ) -> "ServerConnection":
        """`max_step_tokens`: the most tokens one step may carry (the edge's context
        limit: a recovery replays the whole history in one step); frames larger than its
        reply are refused.  None: no limit (fine-tuning, whose replies include adapters)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        # One bound for the whole connection, fixed at connect: websockets computes a
        # frame's limit before it waits for that frame, so changing it per request would
        # apply one frame late.  The exact per-request size is checked in step().
        max_size = None if max_step_tokens is None else max_reply_bytes(hello, max_step_tokens)
        if url.startswith(transport.SCHEME):  # `fedsea serve`: the server runtime is in this process
            ws = transport.connect(url, headers, max_size)
        else:
            try:
                ws = await connect(url, compression=None, max_size=max_size, open_timeout=open_timeout,
                                   additional_headers=headers, ssl=client_ssl(url, server_ca))
            except InvalidStatus as e:
                if e.response.status_code == 401:
                    raise ServerError("unauthorized", "the server runtime refused the API key") from None
                raise
        try:
            await ws.send(encode(hello))
            message, _ = decode(await ws.recv())
        except ProtocolError as e:
            await ws.close()
            raise BadReply(f"undecodable welcome: {e}") from None
        except BaseException:
            await ws.close()
            raise
        if isinstance(message, Error):
            await ws.close()
            raise ServerError(message.code.value, message.message)
        if not isinstance(message, Welcome):
            await ws.close()
            raise ServerError(ErrorCode.BAD_FRAME.value, f"expected welcome, got {message.type}")
        return cls(ws, message, hello.dtype, url, max_step_tokens, max_size)

    def new_sid(self) -> int:
        return next(self._sids)

    async def open(self, sid: int, noise: float, adapter: str | None = None, prefix: list[bytes] | None = None,
                   reopen: bool = False, partial: list[bytes] | None = None) -> int:
        """Open a session (`reopen`: again, after the server preempted it); returns how
        many tokens of `prefix` (block keys), then of `partial` (row digests), the server holds."""
        keys = [k.hex() for k in prefix] if prefix else None
        rows = [d.hex() for d in partial] if partial else None
        open_ = Open(sid=sid, noise=noise, adapter=adapter, prefix=keys, partial=rows, reopen=reopen)
        return await self._open(sid, open_)

    async def fork(self, sid: int, parent: int) -> int:
        """Open `sid` as a copy of session `parent`; returns its length."""
        return await self._open(sid, Fork(sid=sid, parent=parent))

    async def _open(self, sid: int, request: Open | Fork) -> int:
        """Counted as this server's from the moment it is asked for (concurrent opens see
        it), until it is refused or closed (a cancelled open stays counted: the server may
        open it all the same, and its session closes it; a refused reopen leaves it open)."""
        self.sessions.add(sid)
        try:
            message, _ = await self._request(sid, encode(request), Opened)
        except ServerError:
            if not (isinstance(request, Open) and request.reopen):
                self.sessions.discard(sid)
            raise
        self._reported(message.load)
        return message.cached

    def _reported(self, load: Load | None) -> None:
        if load is not None:
            self.load, self.load_at = load, time.monotonic()

    async def step(self, sid: int, pos: int, hidden: torch.Tensor) -> torch.Tensor:
        """The middle blocks' output for session `sid`'s states at [pos, pos + n).  Steps
        asked for in the same event-loop iteration share one frame."""
        hidden = hidden.to(self.wire_dtype)
        _, tensor = await self._request(sid, None, Output, (sid, pos, hidden))
        return tensor

    async def _send_steps(self) -> None:
        """Send the steps queued in this loop iteration, as few frames as the server's
        message limit allows."""
        await asyncio.sleep(0)  # the other sessions woken with the first one queue theirs too
        self._sender = None
        queued, self._outbox = self._outbox, []
        if not queued:  # all cancelled meanwhile
            return
        row_bytes = queued[0][2].shape[1] * queued[0][2].element_size()
        frames: list[list] = [[]]
        held = 0  # rows in the last frame
        for entry in queued:
            rows = held + entry[2].shape[0]
            fits = (len(frames[-1]) < MAX_STEP_SESSIONS and rows <= (self.max_frame_rows or rows)
                    and step_frame_bytes(rows, row_bytes, len(frames[-1]) + 1) <= self.welcome.max_message_bytes)
            if frames[-1] and not fits:
                frames.append([])
                rows = entry[2].shape[0]
            frames[-1].append(entry)
            held = rows
        for entries in frames:
            tensor = torch.cat([e[2] for e in entries]) if len(entries) > 1 else entries[0][2]
            rows = [(sid, pos, t.shape[0]) for sid, pos, t in entries]
            try:
                await self.ws.send(encode(Step(rows=rows, tensor=tensor_meta(tensor)), tensor))
            except Exception as e:  # their requests fail; the connection's other traffic goes on
                for sid, _, _ in entries:
                    self._fail(sid, ConnectionLost() if isinstance(e, ConnectionClosed) else e)

    async def close_session(self, sid: int) -> None:
        try:
            if not self.closed:
                message, _ = await self._request(sid, encode(Close(sid=sid)), Closed)
                self._reported(message.load)
        finally:
            self.sessions.discard(sid)

    async def close(self) -> None:
        self.closed = True
        await self.ws.close()
        self._reader.cancel()

    async def _request(self, sid: int, frame: bytes | None, expect: type, step: tuple | None = None):
        """Send `frame` (or queue `step` for this iteration's Step frame) and wait for the
        reply to session `sid`."""
        if self.closed:
            raise ConnectionLost()
        if sid in self._waiting:
            raise RuntimeError(f"session {sid} already has a request in flight")
        fut = asyncio.get_running_loop().create_future()
        self._waiting[sid] = fut
        sent = False
        try:
            if step is None:
                await self.ws.send(frame)
            else:
                self._asked[sid] = (step[1], tensor_meta(step[2]))
                self._outbox.append(step)
                if self._sender is None:
                    self._sender = asyncio.get_running_loop().create_task(self._send_steps())
            sent = True
            message, tensor = await fut
        except ConnectionClosed:
            raise ConnectionLost() from None
        except asyncio.CancelledError:
            queued = step is not None and any(e is step for e in self._outbox)
            if queued:
                self._outbox = [e for e in self._outbox if e is not step]
            elif sent and (fut.cancelled() or not fut.done()):  # no reply taken: a late one is dropped
                self._abandoned.add(sid)
            raise
        finally:
            self._waiting.pop(sid, None)
            self._asked.pop(sid, None)
        if not isinstance(message, expect):
            raise ServerError(ErrorCode.BAD_FRAME.value, f"expected {expect.__name__}, got {message.type}")
        return message, tensor

    def _fail(self, sid: int, error: Exception) -> None:
        fut = self._waiting.get(sid)
        if fut is not None and not fut.done():
            fut.set_exception(error)

    def _on_output(self, message: Output, tensor: torch.Tensor) -> None:
        """Hand each session its rows of an Output, each checked against what it asked for."""
        for (sid, pos, n), rows in zip(message.rows, message.split(tensor)):
            if sid in self._abandoned:
                self._abandoned.discard(sid)  # the reply to a cancelled request
                continue
            fut, asked = self._waiting.get(sid), self._asked.get(sid)
            if fut is None or fut.done() or asked is None:
                self._log_fault(logging.ERROR, "output for session %s, which asked for none", sid)
                continue
            want_pos, meta = asked
            got = TensorMeta(dtype=message.tensor.dtype, shape=[n, message.tensor.shape[1]])
            try:
                if pos != want_pos:
                    raise BadReply(f"asked for position {want_pos}, got position {pos}")
                check_reply(meta, got, rows)
            except BadReply as e:
                fut.set_exception(e)
                continue
            fut.set_result((message, rows))

    def _log_fault(self, level: int, msg: str, *args) -> None:
        self._faults += 1
        if self._faults <= LOGGED_PEER_FAULTS or self._faults % 1000 == 0:
            log.log(level, msg + " (%d from this connection so far)", *args, self._faults)

    async def _read(self) -> None:
        reason = "connection to the server runtime was lost"
        failure: ServerError | None = None
        try:
            async for data in self.ws:
                try:
                    message, tensor = decode(data)
                except ProtocolError as e:
                    self._log_fault(logging.ERROR, "undecodable frame from server: %s", e)
                    for sid in e.sid if isinstance(e.sid, list) else [e.sid]:
                        self._fail(sid, BadReply(e.message))  # its request would wait forever
                    continue
                sid = getattr(message, "sid", None)
                if sid in self._abandoned and not isinstance(message, Closed):
                    self._abandoned.discard(sid)  # the reply to a cancelled request
                    continue
                if isinstance(message, Output):
                    self._on_output(message, tensor)
                    continue
                fut = self._waiting.get(sid) if sid is not None else None
                if isinstance(message, Error):
                    self._log_fault(logging.WARNING, "server error: %s: %s (session %s)", message.code.value, message.message, sid)
                    if message.fatal:
                        reason = f"server closed the connection: {message.message}"
                    if fut is not None and not fut.done():
                        fut.set_exception(ServerError(message.code.value, message.message))
                elif fut is not None and not fut.done():
                    fut.set_result((message, tensor))
        except ConnectionClosed as e:
            if e.sent is not None and e.sent.code == CloseCode.MESSAGE_TOO_BIG:
                # Not a lost connection to recover from: the server sent more than any request asked for.
                failure = BadReply(f"a frame larger than the {self.max_size} bytes this edge accepts")
        finally:
            self.closed = True
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(failure or ConnectionLost(reason))

"""The edge's end of the websocket: handshake, then many sessions multiplexed on it.

Each session has at most one request in flight, so replies are matched to requests by
session id alone.  A reader task dispatches replies; if the connection drops, every
waiting request fails with `ConnectionLost` and the session objects decide whether to
recover on a new connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl

import torch
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fedsea_shared.protocol import (
    WIRE_DTYPES,
    Close,
    Closed,
    Error,
    ErrorCode,
    Hello,
    Open,
    Opened,
    Output,
    ProtocolError,
    Step,
    Welcome,
    decode,
    encode,
    tensor_meta,
)

log = logging.getLogger("fedsea.edge.connection")


class ServerError(Exception):
    """The server refused a request; `code` is a protocol ErrorCode value."""

    def __init__(self, code: str, message: str):
        super().__init__(f"server refused: {message} ({code})")
        self.code = code
        self.message = message


class ConnectionLost(ServerError):
    def __init__(self, message: str = "connection to the server runtime was lost"):
        super().__init__("connection_lost", message)


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
    def __init__(self, ws: ClientConnection, welcome: Welcome, wire_dtype: str):
        self.ws = ws
        self.welcome = welcome
        self.wire_dtype = WIRE_DTYPES[wire_dtype]
        self._sids = itertools.count()
        self._waiting: dict[int, asyncio.Future] = {}
        # Sessions whose request was cancelled (a client went away mid-step): the server
        # still answers it, and that late reply must not be taken for the next request's.
        self._abandoned: set[int] = set()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.closed = False

    @classmethod
    async def connect(
        cls, url: str, hello: Hello, api_key: str | None = None, open_timeout: float = 10,
        server_ca: str | None = None,
    ) -> "ServerConnection":
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        try:
            ws = await connect(url, compression=None, max_size=None, open_timeout=open_timeout, additional_headers=headers,
                               ssl=client_ssl(url, server_ca))
        except InvalidStatus as e:
            if e.response.status_code == 401:
                raise ServerError("unauthorized", "the server runtime refused the API key") from None
            raise
        try:
            await ws.send(encode(hello))
            message, _ = decode(await ws.recv())
        except BaseException:
            await ws.close()
            raise
        if isinstance(message, Error):
            await ws.close()
            raise ServerError(message.code.value, message.message)
        if not isinstance(message, Welcome):
            await ws.close()
            raise ServerError(ErrorCode.BAD_FRAME.value, f"expected welcome, got {message.type}")
        return cls(ws, message, hello.dtype)

    def new_sid(self) -> int:
        return next(self._sids)

    async def open(self, sid: int, noise: float, adapter: str | None = None) -> None:
        await self._request(sid, encode(Open(sid=sid, noise=noise, adapter=adapter)), Opened)

    async def step(self, sid: int, pos: int, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.wire_dtype)
        frame = encode(Step(sid=sid, pos=pos, tensor=tensor_meta(hidden)), hidden)
        _, tensor = await self._request(sid, frame, Output)
        return tensor

    async def close_session(self, sid: int) -> None:
        if not self.closed:
            await self._request(sid, encode(Close(sid=sid)), Closed)

    async def close(self) -> None:
        self.closed = True
        await self.ws.close()
        self._reader.cancel()

    async def _request(self, sid: int, frame: bytes, expect: type):
        if self.closed:
            raise ConnectionLost()
        if sid in self._waiting:
            raise RuntimeError(f"session {sid} already has a request in flight")
        fut = asyncio.get_running_loop().create_future()
        self._waiting[sid] = fut
        sent = False
        try:
            await self.ws.send(frame)
            sent = True
            message, tensor = await fut
        except ConnectionClosed:
            raise ConnectionLost() from None
        except asyncio.CancelledError:
            if sent and not fut.done():
                self._abandoned.add(sid)
            raise
        finally:
            self._waiting.pop(sid, None)
        if not isinstance(message, expect):
            raise ServerError(ErrorCode.BAD_FRAME.value, f"expected {expect.__name__}, got {message.type}")
        return message, tensor

    async def _read(self) -> None:
        reason = "connection to the server runtime was lost"
        try:
            async for data in self.ws:
                try:
                    message, tensor = decode(data)
                except ProtocolError as e:
                    log.error("undecodable frame from server: %s", e)
                    continue
                sid = getattr(message, "sid", None)
                if sid in self._abandoned and not isinstance(message, Closed):
                    self._abandoned.discard(sid)  # the reply to a cancelled request
                    continue
                fut = self._waiting.get(sid) if sid is not None else None
                if isinstance(message, Error):
                    log.warning("server error: %s: %s (session %s)", message.code.value, message.message, sid)
                    if message.fatal:
                        reason = f"server closed the connection: {message.message}"
                    if fut is not None and not fut.done():
                        fut.set_exception(ServerError(message.code.value, message.message))
                elif fut is not None and not fut.done():
                    fut.set_result((message, tensor))
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionLost(reason))

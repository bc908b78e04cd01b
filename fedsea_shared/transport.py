"""An in-process link with the websocket surface both runtimes use, for `fedsea serve`.

With edge and server in one process, a loopback websocket costs every frame a TCP round
trip and a second event loop; this link passes the same encoded frames between two ends
on one event loop, so the server validates exactly what it would off the wire and the
edge's session, failover and replay code does not know the difference.  A server runtime
`listen()`s under a name; an edge reaches it with the URL `inproc://<name>`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

from websockets.exceptions import ConnectionClosed, ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close, CloseCode

SCHEME = "inproc://"
_NORMAL = (CloseCode.NORMAL_CLOSURE, CloseCode.GOING_AWAY)
_listeners: dict[str, Callable[["LinkEnd"], None]] = {}


@dataclass
class _Request:
    """What a server reads of the opening handshake."""
    headers: dict[str, str] = field(default_factory=dict)
    path: str = "/"


class LinkEnd:
    """One end of an in-process link: send, iterate, recv, close, wait_closed, as a
    websockets connection.  `max_size` bounds the frames this end accepts (larger ones
    close the link with 1009, as the websocket library does)."""

    remote_address = ("in-process", 0)

    def __init__(self, request: _Request, max_size: int | None):
        self.request = request
        self.max_size = max_size
        self.peer: LinkEnd | None = None
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._closed = asyncio.Event()
        self._close: tuple[Close | None, Close | None] | None = None  # (received, sent)

    async def send(self, data: bytes | str) -> None:
        if self._close is not None:
            raise self._error()
        self.peer._inbox.put_nowait(data)

    async def recv(self) -> bytes | str:
        data = await self._inbox.get()
        if isinstance(data, _Closing):
            self._inbox.put_nowait(data)  # later readers see the close too
            raise self._error()
        if self.max_size is not None and len(data) > self.max_size:
            await self.close(CloseCode.MESSAGE_TOO_BIG, "frame too big")
            raise self._error()
        return data

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes | str:
        try:
            return await self.recv()
        except ConnectionClosedOK:
            raise StopAsyncIteration from None

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        if self._close is not None:
            return
        frame = Close(code, reason)
        self._finish(None, frame)
        self.peer._finish(frame, None)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _finish(self, received: Close | None, sent: Close | None) -> None:
        if self._close is None:
            self._close = (received, sent)
            self._inbox.put_nowait(_Closing())
            self._closed.set()

    def _error(self) -> ConnectionClosed:
        received, sent = self._close
        code = (received or sent).code
        kind = ConnectionClosedOK if code in _NORMAL else ConnectionClosedError
        return kind(received, sent)


class _Closing:
    """The end-of-stream marker in an inbox."""


def listen(name: str, accept: Callable[[LinkEnd], None]) -> str:
    """Serve links under `name`: `accept(end)` is called on the connecting edge's event
    loop with the server's end.  Returns the URL edges connect to."""
    _listeners[name] = accept
    return SCHEME + name


def unlisten(name: str) -> None:
    _listeners.pop(name, None)


def connect(url: str, headers: dict[str, str] | None = None, max_size: int | None = None) -> LinkEnd:
    """The edge's end of a new link to the server listening under `url`."""
    accept = _listeners.get(url[len(SCHEME):])
    if accept is None:
        raise ConnectionRefusedError(f"no in-process server runtime at {url}")
    edge = LinkEnd(_Request(), max_size)
    server = LinkEnd(_Request(dict(headers or {})), None)
    edge.peer, server.peer = server, edge
    accept(server)
    return edge

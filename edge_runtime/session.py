"""One sequence's state on the server runtime, with a Petals-style lifecycle:
open -> step ... -> close, and recover after the connection drops.

Every hidden state is noised here, in the one place where hidden states leave the
device.  The session keeps what it sent (already noised) so it can rebuild its server
cache on a fresh connection by replaying it: the server sees the same noised states
again, never new information about the text.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import torch

from fedsea_shared.noise import add_noise, keep_public

from .connection import ConnectionLost, ServerConnection, ServerError

log = logging.getLogger("fedsea.edge.session")

Connector = Callable[[], Awaitable[ServerConnection]]


class InferenceSession:
    def __init__(self, connect: Connector, noise: float, generator: torch.Generator | None, max_retries: int = 2,
                 adapter: str | None = None, public: int = 0):
        self._connect = connect
        self.noise = noise
        self.public = public  # leading positions holding only public template tokens: sent un-noised
        self.adapter = adapter  # the fine-tuned model the server runs for this session
        self.generator = generator
        self.max_retries = max_retries
        self.conn: ServerConnection | None = None
        self.sid: int | None = None
        self.position = 0  # tokens the server holds for this session
        self._sent: list[torch.Tensor] = []

    async def open(self) -> "InferenceSession":
        self.conn = await self._connect()
        sid = self.conn.new_sid()
        try:
            await self.conn.open(sid, self.noise, self.adapter)
        except asyncio.CancelledError:
            self.sid = sid  # the server may open it all the same: close() must free it
            raise
        self.sid = sid
        return self

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Send the next tokens' hidden states (noised), return the middle blocks' output."""
        noised = keep_public(add_noise(hidden, self.noise, self.generator), hidden, self.position, self.public)
        for attempt in range(self.max_retries + 1):
            try:
                out = await self.conn.step(self.sid, self.position, noised)
                break
            except ConnectionLost:
                if attempt == self.max_retries:
                    raise
                log.warning("connection lost at position %d; recovering session", self.position)
                await self.recover()
        self._sent.append(noised.to(self.conn.wire_dtype))
        self.position += hidden.shape[0]
        return out

    async def recover(self) -> None:
        """Reopen on a (new) connection and replay the sent history to rebuild the cache."""
        self.conn = await self._connect()
        self.sid = self.conn.new_sid()
        await self.conn.open(self.sid, self.noise, self.adapter)
        if self._sent:
            await self.conn.step(self.sid, 0, torch.cat(self._sent))

    async def close(self) -> None:
        if self.conn is not None and self.sid is not None and not self.conn.closed:
            try:
                await self.conn.close_session(self.sid)
            except ConnectionLost:
                pass  # the server frees a dropped connection's sessions itself
            except ServerError as e:  # e.g. it had already expired: gone either way
                log.debug("closing session %s: %s", self.sid, e)
        self.sid = None

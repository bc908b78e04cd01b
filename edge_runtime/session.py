"""One sequence's state on the server runtime, with a Petals-style lifecycle:
open -> step ... -> close, and recover after the connection drops.

Every hidden state is noised here, in the one place where hidden states leave the
device, with noise keyed to the token ids that produced it (fedsea_shared.noise).  The
session keeps what it sent (already noised), and never sends a position in a second
version: a replay after a dropped connection, a later turn that reuses a stored prefix
(`prior`) and the n choices forked from one prompt all re-send the stored states.  Those
states also name the prefix to the server's cache (block keys), so a server that still
holds them is not sent them at all.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import torch

from fedsea_shared.noise import NoiseChain, add_keyed_noise, keep_public
from fedsea_shared.prefix import PrefixHasher
from fedsea_shared.protocol import MAX_PREFIX_KEYS

from .connection import ConnectionLost, ServerConnection, ServerError

log = logging.getLogger("fedsea.edge.session")

Connector = Callable[[], Awaitable[ServerConnection]]


class InferenceSession:
    """`chain` is the noise chain positioned after `prior` (the states this edge sent
    before for the same token prefix, or None, with their noise digests); `root` is the
    prefix-key root; `public`: leading positions holding only public template tokens."""

    def __init__(self, connect: Connector, noise: float, chain: NoiseChain, root: bytes,
                 prior: torch.Tensor | None = None, prior_digests: list[bytes] = (), max_retries: int = 2,
                 adapter: str | None = None, public: int = 0):
        self._connect = connect
        self.noise = noise
        self.public = public  # leading positions holding only public template tokens: sent un-noised
        self.adapter = adapter  # the fine-tuned model the server runs for this session
        self.chain = chain
        self.root = root
        self.max_retries = max_retries
        self.conn: ServerConnection | None = None
        self.sid: int | None = None
        self.position = 0  # tokens the server holds for this session
        self._sent: list[torch.Tensor] = [prior] if prior is not None and len(prior) else []
        self.digests: list[bytes] = list(prior_digests)  # the noise digest of each position

    @property
    def sent(self) -> torch.Tensor | None:
        """Every state this session's server sequence holds or will hold, in order."""
        if len(self._sent) > 1:
            self._sent = [torch.cat(self._sent)]
        return self._sent[0] if self._sent else None

    @property
    def length(self) -> int:
        return sum(t.shape[0] for t in self._sent)

    def _unsent(self) -> torch.Tensor:
        """The states from `position` on, touching only the pieces that hold them (a
        decode step sends its one new row without concatenating the history)."""
        need, parts = self.length - self.position, []
        for t in reversed(self._sent):
            if need <= 0:
                break
            parts.append(t[-need:] if t.shape[0] > need else t)
            need -= parts[-1].shape[0]
        return parts[0] if len(parts) == 1 else torch.cat(parts[::-1])

    async def open(self) -> "InferenceSession":
        self.conn = await self._connect()
        sid = self.conn.new_sid()
        try:
            self.position = await self._open(sid)
        except asyncio.CancelledError:
            self.sid = sid  # the server may open it all the same: close() must free it
            raise
        self.sid = sid
        return self

    async def _open(self, sid: int) -> int:
        """Open naming the block keys of what was sent; the server answers what it holds."""
        keys = None
        sent = self.sent
        if sent is not None:
            hasher = PrefixHasher(self.root, self.conn.welcome.block_size)
            hasher.extend(sent)
            # The last state always goes again: its output is what the tail needs next.
            keys = hasher.keys[: min(MAX_PREFIX_KEYS, (sent.shape[0] - 1) // hasher.block_size)]
        cached = await self.conn.open(sid, self.noise, self.adapter, keys or None)
        if cached % self.conn.welcome.block_size or cached > len(keys or ()) * self.conn.welcome.block_size:
            raise ServerError("bad_reply", f"the server claims {cached} cached tokens of a {len(keys or ())}-block prefix")
        return cached

    async def fork(self) -> "InferenceSession":
        """A second server session with this one's tokens, sharing its KV blocks."""
        twin = InferenceSession(self._connect, self.noise, self.chain.fork(), self.root, self.sent,
                                self.digests, self.max_retries, self.adapter, self.public)
        twin.conn = self.conn
        sid = self.conn.new_sid()
        try:
            twin.position = await self.conn.fork(sid, self.sid)
        except asyncio.CancelledError:
            twin.sid = sid
            raise
        twin.sid = sid
        if twin.position != self.position:
            await twin.close()
            raise ServerError("bad_reply", f"a fork of a {self.position}-token session holds {twin.position}")
        return twin

    async def step(self, hidden: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
        """Noise and send the next tokens' hidden states, after any stored states the
        server does not hold yet; return the middle blocks' output for everything sent."""
        digests = self.chain.extend(token_ids)
        noised = keep_public(add_keyed_noise(hidden, self.noise, digests), hidden, self.length, self.public)
        noised = noised.to(self.conn.wire_dtype)
        if noised.shape[0]:
            self._sent.append(noised)
            self.digests += digests
        for attempt in range(self.max_retries + 1):
            try:
                pending = self._unsent()
                out = await self.conn.step(self.sid, self.position, pending)
                break
            except ConnectionLost:
                if attempt == self.max_retries:
                    raise
                log.warning("connection lost at position %d; recovering session", self.position)
                await self.recover()
        self.position += pending.shape[0]
        return out

    async def recover(self) -> None:
        """Reopen on a (new) connection; the next step replays what the server lacks."""
        self.conn = await self._connect()
        self.sid = self.conn.new_sid()
        self.position = 0
        self.position = await self._open(self.sid)

    async def close(self) -> None:
        if self.conn is not None and self.sid is not None and not self.conn.closed:
            try:
                await self.conn.close_session(self.sid)
            except ConnectionLost:
                pass  # the server frees a dropped connection's sessions itself
            except ServerError as e:  # e.g. it had already expired: gone either way
                log.debug("closing session %s: %s", self.sid, e)
        self.sid = None

"""One sequence's state on the server runtime, with a Petals-style lifecycle:
open -> step ... -> close, surviving what a server may do to it meanwhile.

Every hidden state is noised here, in the one place where hidden states leave the
device, with noise keyed to the token ids that produced it (fedsea_shared.noise).  The
session keeps what it sent (already noised), and never sends a position in a second
version: a replay, a later turn that reuses a stored prefix (`prior`) and the n choices
forked from one prompt all re-send the stored states.  Those states also name the prefix
to the server's cache (block keys), so a server that still holds them is not sent them.

A session is the unit of failover: when its connection drops or its server sends an
invalid reply, it reopens on the server the client's policy picks next (edge_runtime.servers)
and replays there (the policy places it by its affinity key, the key of its
conversation's first private block, so a conversation's turns meet their prefix cache);
when its server preempts it (ErrorCode.PREEMPTED), it reopens the same server session
(Open.reopen: it keeps its place in the server's queue), and the server answers what it
still caches.  Either way the step goes on and returns
what it would have: the caller sees a delay.  Replays longer than the server's
`max_message_bytes` go as several Steps at consecutive positions.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Protocol

import torch

from fedsea_shared.noise import NoiseChain, add_keyed_noise, keep_public
from fedsea_shared.prefix import PrefixHasher
from fedsea_shared.protocol import MAX_PARTIAL_ROWS, MAX_PREFIX_KEYS, ErrorCode, max_step_rows

from .connection import BadReply, ConnectionLost, ServerConnection, ServerError
from .servers import NoOtherServer

log = logging.getLogger("fedsea.edge.session")

PREEMPTION_BACKOFF_S = 0.05  # the first wait before reopening a preempted session; doubles, up to 1 s
# Rows per block of the affinity key: the servers' default KV block size.  The key never
# leaves the edge, so it need not follow any one server's --block-size.
AFFINITY_BLOCK = 16


class Connector(Protocol):
    def __call__(self, failed: ServerConnection | None = None, elsewhere: bool = False,
                 affinity: bytes | None = None) -> Awaitable[ServerConnection]:
        """A live connection to the best server now for a session with this affinity key.
        `failed`: a connection this session found broken (its server is banned for a
        while); `elsewhere`: not to that server (it misbehaved), raising NoOtherServer if
        there is no other."""


class InferenceSession:
    """`chain` is the noise chain positioned after `prior` (the states this edge sent
    before for the same token prefix, or None, with their noise digests); `root` is the
    prefix-key root; `wire_dtype`: the dtype states are sent in; `public`: leading positions
    holding only public template tokens.  `max_retries`: failovers per request;
    `max_preemptions`: reopens after preemption."""

    def __init__(self, connect: Connector, noise: float, chain: NoiseChain, root: bytes, wire_dtype: torch.dtype,
                 prior: torch.Tensor | None = None, prior_digests: list[bytes] = (), max_retries: int = 2,
                 adapter: str | None = None, public: int = 0, max_preemptions: int = 10):
        self._connect = connect
        self.noise = noise
        self.wire_dtype = wire_dtype
        self.public = public  # leading positions holding only public template tokens: sent un-noised
        self.adapter = adapter  # the fine-tuned model the server runs for this session
        self.chain = chain
        self.root = root
        self.max_retries = max_retries
        self.max_preemptions = max_preemptions
        self.conn: ServerConnection | None = None
        self.sid: int | None = None  # None: not open on `conn` (yet, or any more)
        self.preempted = False  # `sid` is open but the server took its blocks: reopen it before sending
        self.closed = False  # by its owner: it never opens again
        self.position = 0  # tokens the server holds for this session
        self._sent: list[torch.Tensor] = [prior] if prior is not None and len(prior) else []
        self.length = sum(t.shape[0] for t in self._sent)  # states in `sent`: counted, not summed per step
        self.digests: list[bytes] = list(prior_digests)  # the noise digest of each position

    @property
    def sent(self) -> torch.Tensor | None:
        """Every state this session's server sequence holds or will hold, in order."""
        if len(self._sent) > 1:
            self._sent = [torch.cat(self._sent)]
        return self._sent[0] if self._sent else None

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

    @property
    def affinity(self) -> bytes | None:
        """The key that places this session among servers: the block-key chain
        (fedsea_shared.prefix) over the states kept, through the end of the first block
        holding a private (noised) row, or through the last state if they end before.
        Every turn of a conversation starts with the same states, so has the same key
        (unless its first turn ended inside that block); conversations that share only
        the public template do not.  None before any state is kept."""
        sent = self.sent
        if sent is None:
            return None
        end = min(sent.shape[0], (self.public // AFFINITY_BLOCK + 1) * AFFINITY_BLOCK)
        hasher = PrefixHasher(self.root, AFFINITY_BLOCK)
        hasher.extend(sent[:end])
        return hasher.pending_keys[-1] if hasher.pending else hasher.keys[-1]

    async def open(self, upto: int | None = None) -> "InferenceSession":
        """`upto`: the first position whose output the caller will need (default: the last
        state kept before); the server may hold everything below it.  States kept before
        opening (`keep`) place the session (`affinity`)."""
        self.conn = await self._connect(affinity=self.affinity)
        await self._survive(lambda: self._attach(upto))
        return self

    async def _attach(self, upto: int | None) -> None:
        """Open a server session on `conn` (or reopen the preempted one), naming the block
        keys of the stored states (below `upto`, whose outputs the caller still needs); the
        server answers what it holds."""
        self.position = 0
        if self.preempted:
            try:
                self.position = await self._open(self.sid, upto, reopen=True)
                self.preempted = False
                return
            except ServerError as e:
                if e.code != ErrorCode.UNKNOWN_SESSION.value:
                    raise
                self.preempted = False  # it expired meanwhile: open a new one
        self.sid = None
        sid = self.conn.new_sid()
        try:
            self.position = await self._open(sid, upto)
        except asyncio.CancelledError:
            self.sid = sid  # the server may open it all the same: close() must free it
            raise
        self.sid = sid

    async def _open(self, sid: int, upto: int | None, reopen: bool = False) -> int:
        """Name what this session sent before (below `upto`) as whole blocks, then the rows
        after them; the server answers how much of it it holds."""
        keys, partial, block = [], [], self.conn.welcome.block_size
        sent = self.sent
        if sent is not None:
            # Without `upto` the last state goes again: its output is what the tail needs next.
            usable = sent.shape[0] - 1 if upto is None else min(sent.shape[0], upto)
            hasher = PrefixHasher(self.root, block)
            hasher.extend(sent[:usable])
            keys = hasher.keys[:MAX_PREFIX_KEYS]
            if len(keys) == len(hasher.keys):
                partial = hasher.pending[:MAX_PARTIAL_ROWS]
        cached = await self.conn.open(sid, self.noise, self.adapter, keys or None, reopen, partial or None)
        whole = cached % block == 0 and cached <= len(keys) * block
        if not (whole or (partial and cached == len(keys) * block + len(partial))):
            raise BadReply(f"the server claims {cached} cached tokens of {len(keys)} blocks and {len(partial)} rows")
        return cached

    async def fork(self) -> "InferenceSession":
        """A second server session with this one's tokens, sharing its KV blocks."""
        twin = InferenceSession(self._connect, self.noise, self.chain.fork(), self.root, self.wire_dtype, self.sent,
                                self.digests, self.max_retries, self.adapter, self.public, self.max_preemptions)
        twin.conn = self.conn
        sid = self.conn.new_sid()
        try:
            twin.position = await self.conn.fork(sid, self.sid)
        except asyncio.CancelledError:
            twin.sid = sid
            raise
        except ServerError as e:
            if e.code != ErrorCode.PREEMPTED.value:
                raise
            # This session lost its blocks meanwhile: the twin opens on its own and re-sends.
            await twin._survive(lambda: twin._attach(None))
            return twin
        twin.sid = sid
        if twin.position != self.position:
            await twin.close()
            raise BadReply(f"a fork of a {self.position}-token session holds {twin.position}")
        return twin

    def keep(self, hidden: torch.Tensor, token_ids: list[int]) -> None:
        """Noise the next tokens' hidden states and keep them for the next step to send."""
        digests = self.chain.extend(token_ids)
        noised = keep_public(add_keyed_noise(hidden, self.noise, digests), hidden, self.length, self.public)
        noised = noised.to(self.wire_dtype)
        if noised.shape[0]:
            self._sent.append(noised)
            self.length += noised.shape[0]
            self.digests += digests

    async def step(self, hidden: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
        """Noise and send the next tokens' hidden states (none: send only what was kept),
        after any stored states the server does not hold yet; return the middle blocks'
        output for everything this call sends (what the server lacked, then the new tokens)."""
        self.keep(hidden, token_ids)
        start = self.position

        async def send() -> torch.Tensor:
            if self.closed:
                raise ServerError("closed", "the session was closed")
            if self.sid is None or self.preempted:  # reopen after a failover or preemption
                await self._attach(start)
            return await self._send(start)

        return await self._survive(send)

    async def _send(self, start: int) -> torch.Tensor:
        """Send the states from `position` on, in frames the server accepts; the outputs
        from `start` on."""
        first, outputs = self.position, []
        pending = self._unsent()
        rows = max_step_rows(self.conn.welcome.max_message_bytes, pending.shape[1] * pending.element_size())
        for lo in range(0, pending.shape[0], rows):
            part = pending[lo : lo + rows]
            outputs.append(await self.conn.step(self.sid, self.position, part))
            self.position += part.shape[0]
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return out[start - first :]

    async def _survive(self, action: Callable[[], Awaitable]):
        """Run `action` (an open or a send) until it succeeds, reopening this session
        where it can go on: on another server after a lost connection or an invalid reply
        (at most max_retries times), on the same one after a preemption (max_preemptions)."""
        failovers = preemptions = 0
        while True:
            try:
                return await action()
            except ServerError as e:
                if e.code == ErrorCode.PREEMPTED.value:
                    preemptions += 1
                    if preemptions > self.max_preemptions:
                        raise ServerError(e.code, f"the server preempted this session {preemptions} times in a row "
                                                  f"({e.message}); giving up") from e
                    log.info("session preempted at position %d; reopening it", self.position)
                    self.preempted = True
                    # Reopened at once, it would take up its cached prefix while the pool
                    # is still full: give the pool time to turn over first.
                    await asyncio.sleep(min(PREEMPTION_BACKOFF_S * 2 ** (preemptions - 1), 1.0))
                elif isinstance(e, (ConnectionLost, BadReply)):
                    failovers += 1
                    if failovers > self.max_retries:
                        raise
                    log.warning("%s at position %d (%s); reopening the session", e.message, self.position, self.conn.url)
                    try:
                        self.conn = await self._connect(self.conn, elsewhere=isinstance(e, BadReply),
                                                        affinity=self.affinity)
                    except NoOtherServer:
                        raise e from None
                    self.sid, self.preempted = None, False
                else:
                    raise

    async def close(self) -> None:
        self.closed = True
        if self.conn is not None and self.sid is not None and not self.conn.closed:
            try:
                await self.conn.close_session(self.sid)
            except ConnectionLost:
                pass  # the server frees a dropped connection's sessions itself
            except ServerError as e:  # e.g. it had already expired: gone either way
                log.debug("closing session %s: %s", self.sid, e)
        self.sid, self.preempted = None, False

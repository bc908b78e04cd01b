"""Which server runtime an edge (re)connects to, among several replicas of the same model
and cut.  Plain bookkeeping: the client reports failures and each server's load and asks
for an order; connecting and replaying are the client's and the session's business.

A session goes to the least loaded server, with conversation affinity: its affinity key
(the key of the conversation's first private block, edge_runtime.session) ranks the
servers by rendezvous hashing, and it goes to the first of them whose load is within
`slack` sessions of the least loaded one, so a conversation's next turn finds its prefix
where its first turn left it, and different conversations spread (the public chat
template, the same in every prompt, is left out of the key, or it would pin everyone to
one server).  A server's load is the larger of the edge's own count of its sessions there
and what the server last reported (`Load`, in Welcome/Opened/Closed, ignored after
`LOAD_TTL_S`): a server that claims to be idle draws no more than the edge's own count
allows.  A server reporting steps waiting for KV blocks is full: the others go first.

A server that failed (unreachable, refused the handshake, dropped a connection, sent an
invalid reply) is banned for a while; each further failure within `forget_s` doubles the
ban (backoff), up to `max_ban_s`.  Banned servers are still tried last, soonest ban end
first: a client with one server keeps retrying it, as a client without failover did.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from fedsea_shared.protocol import Load

LOAD_TTL_S = 5.0  # a server's report of its load older than this is stale (the edge's own count still holds)
BALANCE_SLACK = 1  # sessions a conversation's server may hold over the least loaded one and still get it


def rendezvous(key: bytes, urls: list[str]) -> list[str]:
    """`urls` by highest random weight for `key`: every edge ranks them alike, and removing
    one server moves only the keys that ranked it first."""
    return sorted(urls, key=lambda u: hashlib.blake2b(key + u.encode(), digest_size=8).digest(), reverse=True)


@dataclass(frozen=True)
class Occupancy:
    """A server's load as the edge sees it: its own sessions there, and the server's report."""

    own: int = 0
    reported: Load | None = None

    @property
    def sessions(self) -> int:
        return max(self.own, self.reported.sessions if self.reported is not None else 0)

    @property
    def full(self) -> bool:
        return self.reported is not None and self.reported.waiting > 0


class ServerList:
    def __init__(self, urls: list[str], ban_s: float = 2.0, max_ban_s: float = 60.0,
                 forget_s: float = 120.0, clock: Callable[[], float] = time.monotonic, slack: int = BALANCE_SLACK):
        if not urls:
            raise ValueError("no server runtime URL given")
        if len(set(urls)) != len(urls):
            raise ValueError(f"a server runtime URL is listed twice: {urls}")
        self.urls = list(urls)
        self.ban_s, self.max_ban_s, self.forget_s = ban_s, max_ban_s, forget_s
        self.slack = slack
        # Sessions opened on each server, by whether it was their conversation's first
        # rendezvous choice ("home") or another ("away": that one was banned or loaded).
        self.opens: Counter[tuple[str, str]] = Counter()
        self._clock = clock
        self._failures: dict[str, int] = {}  # failures in a row (none for forget_s resets it)
        self._last_failure: dict[str, float] = {}
        self._banned_until: dict[str, float] = {}

    def banned(self, url: str) -> bool:
        return self._banned_until.get(url, 0.0) > self._clock()

    def order(self, avoid: str | None = None, affinity: bytes | None = None,
              load: Callable[[str], Occupancy] | None = None) -> list[str]:
        """The servers to try now, best first; `avoid` is left out (a server that just
        misbehaved).  With `load`, the unbanned ones go by load (see the module's doc),
        `affinity`'s rendezvous choice first where its load allows; without it, in the
        order given."""
        urls = [u for u in self.urls if u != avoid]
        free = [u for u in urls if not self.banned(u)]
        banned = sorted((u for u in urls if self.banned(u)), key=self._banned_until.__getitem__)
        if load is None or not free:
            return free + banned
        occupancy = {u: load(u) for u in free}
        ranked = rendezvous(affinity, free) if affinity is not None else free
        by_load = sorted(ranked, key=lambda u: (occupancy[u].full, occupancy[u].sessions))
        least = occupancy[by_load[0]]
        pick = next(u for u in ranked
                    if occupancy[u].full <= least.full and occupancy[u].sessions <= least.sessions + self.slack)
        return [pick] + [u for u in by_load if u != pick] + banned

    def opened(self, url: str, affinity: bytes) -> None:
        """A session with this affinity key opens on `url` (for the metrics)."""
        self.opens[url, "home" if url == rendezvous(affinity, self.urls)[0] else "away"] += 1

    def failed(self, url: str) -> None:
        now = self._clock()
        if now - self._last_failure.get(url, -float("inf")) > self.forget_s:
            self._failures[url] = 0
        self._failures[url] = self._failures.get(url, 0) + 1
        self._last_failure[url] = now
        self._banned_until[url] = now + min(self.max_ban_s, self.ban_s * 2 ** (self._failures[url] - 1))


class NoOtherServer(Exception):
    """Failover was asked for and every other server is the one to avoid."""

"""Which server runtime an edge (re)connects to, among several serving the same model and
cut (Petals-style client policy).  Plain bookkeeping: the client reports failures and asks
for an order; connecting and replaying are the client's and the session's business.

Servers are preferred in the order given.  A server that failed (unreachable, refused the
handshake, dropped a connection, sent an invalid reply) is banned for a while; each
further failure within `forget_s` doubles the ban (backoff), up to `max_ban_s`.  Banned
servers are still tried last, soonest ban end first: a client with one server keeps
retrying it, as a client without failover did.
"""

from __future__ import annotations

import time
from typing import Callable


class ServerList:
    def __init__(self, urls: list[str], ban_s: float = 2.0, max_ban_s: float = 60.0,
                 forget_s: float = 120.0, clock: Callable[[], float] = time.monotonic):
        if not urls:
            raise ValueError("no server runtime URL given")
        if len(set(urls)) != len(urls):
            raise ValueError(f"a server runtime URL is listed twice: {urls}")
        self.urls = list(urls)
        self.ban_s, self.max_ban_s, self.forget_s = ban_s, max_ban_s, forget_s
        self._clock = clock
        self._failures: dict[str, int] = {}  # failures in a row (none for forget_s resets it)
        self._last_failure: dict[str, float] = {}
        self._banned_until: dict[str, float] = {}

    def banned(self, url: str) -> bool:
        return self._banned_until.get(url, 0.0) > self._clock()

    def order(self, avoid: str | None = None) -> list[str]:
        """The servers to try now, best first; `avoid` is left out (a server that just misbehaved)."""
        urls = [u for u in self.urls if u != avoid]
        free = [u for u in urls if not self.banned(u)]
        return free + sorted((u for u in urls if self.banned(u)), key=self._banned_until.__getitem__)

    def failed(self, url: str) -> None:
        now = self._clock()
        if now - self._last_failure.get(url, -float("inf")) > self.forget_s:
            self._failures[url] = 0
        self._failures[url] = self._failures.get(url, 0) + 1
        self._last_failure[url] = now
        self._banned_until[url] = now + min(self.max_ban_s, self.ban_s * 2 ** (self._failures[url] - 1))


class NoOtherServer(Exception):
    """Failover was asked for and every other server is the one to avoid."""

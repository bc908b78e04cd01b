"""Per-tenant resource policy of the server runtime: how much of the KV pool one tenant may
hold, and how often one connection's refusals may write to the log.

A tenant is an API key, or one connection when the server runs without keys (an address
is no identity for the KV pool: many edges may share one NAT).  Both classes are pure
bookkeeping, so the engine and the websocket layer only call them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Callable, Hashable


class BlockQuota:
    """KV blocks a tenant may hold at once.  `reserve` is called before a step grows a
    session and charges the blocks the session will hold after it; the charge only grows
    until the session is released (a rolled-back step keeps its blocks in the table too),
    so the charge is never below what the session really holds.  A step the quota does not
    admit waits (server_runtime.scheduler); only one that could never fit is refused.
    Engine thread only."""

    def __init__(self, limit: int, owner_of: Callable[[Hashable], Hashable]):
        if limit < 1:
            raise ValueError(f"a KV quota needs at least one block, got {limit}")
        self.limit = limit
        self.owner_of = owner_of
        self._charged: dict[Hashable, int] = {}  # session key -> blocks charged
        self._held: Counter[Hashable] = Counter()  # owner -> blocks charged

    def reserve(self, key: Hashable, blocks: int) -> str | None:
        """Charge session `key` for holding `blocks` blocks; None if within the quota,
        else the reason it is refused (nothing is charged then)."""
        owner = self.owner_of(key)
        extra = blocks - self._charged.get(key, 0)
        if extra <= 0:
            return None
        if self._held[owner] + extra > self.limit:
            return f"this tenant holds {self._held[owner]} KV blocks and this step needs {extra} more; its quota is {self.limit}"
        self._charged[key] = blocks
        self._held[owner] += extra
        return None

    def room(self, key: Hashable) -> int:
        """Blocks session `key` may be charged for now (its own charge included)."""
        return self.limit - self._held[self.owner_of(key)] + self._charged.get(key, 0)

    def charged(self, key: Hashable) -> int:
        """Blocks session `key` is charged for."""
        return self._charged.get(key, 0)

    def release(self, key: Hashable) -> None:
        blocks = self._charged.pop(key, 0)
        if blocks:
            owner = self.owner_of(key)
            self._held[owner] -= blocks
            if not self._held[owner]:
                del self._held[owner]


class RefusalLog:
    """Rate-limited warnings for one connection: the first refusal of each `interval` is
    logged in full, later ones are only counted, and a summary line reports them at the
    next logged refusal or when the connection ends (a peer sending bad frames in a loop
    cannot fill the disk)."""

    def __init__(self, log: logging.Logger, peer: str, interval: float):
        self.log = log
        self.peer = peer
        self.interval = interval
        self._quiet_until = 0.0
        self._since = 0.0
        self._counted: Counter[str] = Counter()

    def refused(self, code: str, message: str) -> None:
        now = time.monotonic()
        if now < self._quiet_until:
            self._counted[code] += 1
            return
        self.flush()
        self.log.warning("refused from %s: %s", self.peer, message)
        self._quiet_until = now + self.interval
        self._since = now

    def flush(self) -> None:
        if self._counted:
            codes = ", ".join(f"{code} x{n}" for code, n in self._counted.most_common())
            self.log.warning("refused %d more from %s in %.0fs (%s)", sum(self._counted.values()), self.peer,
                             time.monotonic() - self._since, codes)
            self._counted.clear()

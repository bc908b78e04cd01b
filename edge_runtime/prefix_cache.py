"""The edge's memory of recent conversations: for each recent token sequence, the states
it sent (noised) with their noise digests, and its head/tail K/V.

A chat's turn k starts with turn k-1's whole sequence, so the longest stored prefix of a
new prompt lets the edge skip its head and tail work for those tokens and re-send (or,
when the server still holds them, only name) the very same noised states.  Bounded by a
byte budget; least recently used entries go first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

import torch

from .model import SequenceCache


@dataclass
class Prefix:
    ids: list[int]  # token ids of positions [0, L)
    sent: torch.Tensor  # [L, hidden] the noised states sent for them (wire dtype)
    digests: list[bytes]  # their noise digests
    cache: SequenceCache  # head and tail K/V of [0, L) (the buffers may be longer)

    @property
    def nbytes(self) -> int:
        return self.sent.nbytes + self.cache.nbytes + 40 * len(self.ids)


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixStore:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the edge cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[Hashable, int], Prefix] = OrderedDict()
        self._ids = 0
        self.nbytes = 0
        self.query_tokens = 0
        self.hit_tokens = 0

    def lookup(self, scope: Hashable, ids: list[int]) -> tuple[int, Prefix | None]:
        """The stored entry sharing the longest prefix with `ids`, and that length."""
        self.query_tokens += len(ids)
        best, best_len, best_key = None, 0, None
        for key, entry in self._entries.items():
            if key[0] == scope:
                n = _common(entry.ids, ids)
                if n > best_len:
                    best, best_len, best_key = entry, n, key
        if best_key is not None:
            self._entries.move_to_end(best_key)
        self.hit_tokens += best_len
        return best_len, best

    def insert(self, scope: Hashable, entry: Prefix) -> None:
        if entry.nbytes > self.max_bytes:
            return
        for key, old in list(self._entries.items()):  # an entry it extends is redundant
            if key[0] == scope and len(old.ids) <= len(entry.ids) and entry.ids[: len(old.ids)] == old.ids:
                self._drop(key)
        self._ids += 1
        self._entries[(scope, self._ids)] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key) -> None:
        self.nbytes -= self._entries.pop(key).nbytes

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self.nbytes,
                "query_tokens": self.query_tokens, "hit_tokens": self.hit_tokens}

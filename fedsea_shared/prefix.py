"""Block keys of a session's prefix, over the hidden states the server receives.

A full block of `block_size` tokens is named by blake2b(parent key || the block's bytes at
the wire dtype); the first block's parent is a root naming the model cut, wire dtype and
adapter.  A key thus names a whole prefix, not just one block.  The server computes the
chain over what it receives (to find a cached prefix); the edge computes the same chain
over what it sent (to ask for it), which is why this code is shared.
"""

from __future__ import annotations

import hashlib

import torch

KEY_BYTES = 16


def prefix_root(num_layers: int, hidden_size: int, layers: tuple[int, int], dtype: str, adapter: str | None) -> bytes:
    tag = f"fedsea-prefix-v1|{num_layers}|{hidden_size}|{layers[0]},{layers[1]}|{dtype}|{adapter or ''}"
    return hashlib.blake2b(tag.encode(), digest_size=KEY_BYTES).digest()


class PrefixHasher:
    """Running block-key chain of one sequence; feed it rows as they are sent/received."""

    def __init__(self, root: bytes, block_size: int):
        self.block_size = block_size
        self.parent = root
        self.keys: list[bytes] = []  # one per full block
        self._partial = bytearray()
        self._partial_rows = 0

    def extend(self, hidden: torch.Tensor) -> list[bytes]:
        """Fold in the next rows ([n, hidden], wire dtype); return the keys of blocks it completed."""
        data = hidden.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
        row = len(data) // hidden.shape[0] if hidden.shape[0] else 0
        new, i = [], 0
        while i < hidden.shape[0]:
            take = min(self.block_size - self._partial_rows, hidden.shape[0] - i)
            self._partial += data[i * row : (i + take) * row]
            self._partial_rows += take
            i += take
            if self._partial_rows == self.block_size:
                self.parent = hashlib.blake2b(self.parent + bytes(self._partial), digest_size=KEY_BYTES).digest()
                self.keys.append(self.parent)
                new.append(self.parent)
                self._partial.clear()
                self._partial_rows = 0
        return new

    def adopt(self, keys: list[bytes]) -> None:
        """Start from a prefix of len(keys) full blocks named by `keys` (a cache hit)."""
        if self.keys or self._partial_rows:
            raise RuntimeError("adopt() is only valid on an empty hasher")
        self.keys = list(keys)
        if keys:
            self.parent = keys[-1]

    def copy(self) -> "PrefixHasher":
        twin = PrefixHasher(self.parent, self.block_size)
        twin.keys, twin._partial, twin._partial_rows = list(self.keys), bytearray(self._partial), self._partial_rows
        return twin

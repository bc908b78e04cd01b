"""Block keys of a session's prefix, over the hidden states the server receives.

Every row (one token's state, at the wire dtype) has a digest, blake2b(row bytes); a run
of r rows after a parent key is named by blake2b(parent || their r digests).  A full
block of `block_size` rows is named that way (its block key), and so is each of its
proper prefixes (its partial keys, r < block_size): the server caches a block under its
key and its partial keys, so a session can take up a prefix that ends inside a block (a
chat template, a turn that ended mid-block).  The first block's parent is a root naming
the model cut, wire dtype and adapter, so a key names a whole prefix, not just one block.
The server computes the chain over what it receives (to find and name cached prefixes);
the edge computes the same chain over what it sent (to ask for them), which is why this
code is shared.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

KEY_BYTES = 16


def prefix_root(num_layers: int, hidden_size: int, layers: tuple[int, int], dtype: str, adapter: str | None) -> bytes:
    tag = f"fedsea-prefix-v2|{num_layers}|{hidden_size}|{layers[0]},{layers[1]}|{dtype}|{adapter or ''}"
    return hashlib.blake2b(tag.encode(), digest_size=KEY_BYTES).digest()


def run_key(parent: bytes, digests: list[bytes]) -> bytes:
    """The key of the rows with these digests, right after the prefix `parent` names."""
    return hashlib.blake2b(parent + b"".join(digests), digest_size=KEY_BYTES).digest()


@dataclass(frozen=True)
class Block:
    """A full block the chain completed: its key and the keys of its first 1, 2, ...,
    block_size - 1 rows."""

    key: bytes
    partial_keys: tuple[bytes, ...]


class PrefixHasher:
    """Running block-key chain of one sequence; feed it rows as they are sent/received.
    The key of the run of rows after the last full block is kept up to date row by row
    (one digest per row, not a rehash of the run: the server files a key per decode step)."""

    def __init__(self, root: bytes, block_size: int):
        self.root = root
        self.block_size = block_size
        self.parent = root
        self.keys: list[bytes] = []  # one per full block
        self.pending: list[bytes] = []  # digests of the rows after the last full block
        self.pending_keys: list[bytes] = []  # the key of each run of them: their first 1, 2, ... rows
        self._run = hashlib.blake2b(root, digest_size=KEY_BYTES)

    def extend(self, hidden: torch.Tensor) -> list[Block]:
        """Fold in the next rows ([n, hidden], wire dtype); return the blocks they completed."""
        data = hidden.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
        row = len(data) // hidden.shape[0] if hidden.shape[0] else 0
        done = []
        for i in range(hidden.shape[0]):
            self._append(hashlib.blake2b(data[i * row : (i + 1) * row], digest_size=KEY_BYTES).digest())
            if len(self.pending) == self.block_size:
                block = Block(self.pending_keys[-1], tuple(self.pending_keys[:-1]))
                self.keys.append(block.key)
                self._restart(block.key)
                done.append(block)
        return done

    def partial_keys(self, fresh: int) -> list[bytes]:
        """The keys of the runs of rows after the last full block that end in its last
        `fresh` rows (the ones a step just added)."""
        return self.pending_keys[len(self.pending_keys) - fresh :] if fresh else []

    def adopt(self, keys: list[bytes], pending: list[bytes] = ()) -> None:
        """Start from a cached prefix: len(keys) full blocks named by `keys`, then rows with
        the digests `pending` (fewer than a block)."""
        if self.keys or self.pending:
            raise RuntimeError("adopt() is only valid on an empty hasher")
        if len(pending) >= self.block_size:
            raise ValueError(f"{len(pending)} pending rows fill a block of {self.block_size}")
        self.keys = list(keys)
        if keys:
            self._restart(keys[-1])
        for d in pending:
            self._append(d)

    def copy(self) -> "PrefixHasher":
        twin = PrefixHasher(self.root, self.block_size)
        twin.parent, twin.keys = self.parent, list(self.keys)
        twin.pending, twin.pending_keys, twin._run = list(self.pending), list(self.pending_keys), self._run.copy()
        return twin

    def _append(self, digest: bytes) -> None:
        self.pending.append(digest)
        self._run.update(digest)
        self.pending_keys.append(self._run.copy().digest())

    def _restart(self, parent: bytes) -> None:
        self.parent = parent
        self.pending, self.pending_keys = [], []
        self._run = hashlib.blake2b(parent, digest_size=KEY_BYTES)

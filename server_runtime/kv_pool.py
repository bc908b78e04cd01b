"""Paged KV cache for the middle blocks (vLLM's PagedAttention layout).

One preallocated pool of fixed-size blocks per layer, sized by a memory budget.  A
session owns a `BlockTable`: the list of blocks holding its tokens, in order, grown one
block at a time as it generates.  Nothing is reserved for a session's future length, so
a 256-token chat costs 256 tokens of cache, not a max_length reservation.

Storage is flat per layer: slot s = block * block_size + offset holds one token's K (and
V) for every KV head, so writing a batch's new tokens is one index_copy per layer
(`write`, `read`).  An attention backend may bring its own per-layer layout instead
(`layer_shape`, e.g. vLLM's [blocks, kv_heads, block_size, head_dim]) and then writes
and reads the tensors itself; the pool only copies and clears whole blocks.  One
extra block, never allocated, is scratch space: rows that only pad a batch to a compiled
size write and read there, so they never touch a session's cache.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from fedsea_shared.prefix import Block


class OutOfBlocks(Exception):
    pass


class BlockPool:
    """Which blocks are free, who holds each (reference counts) and which hold a cached
    prefix (key -> block, and each partial key of the block -> block: a prefix ending
    inside it).  A block whose count drops to 0 goes back to the free list, or, if it is
    cached, to the evictable LRU: it keeps its contents for a later hit and is only reused,
    least recently released first, when the free list runs dry."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block; raise --kv-cache-memory")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._by_key: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._by_partial_key: dict[bytes, int] = {}
        self._partial_keys_of: dict[int, list[bytes]] = {}
        self._keyed: set[int] = set()  # blocks any key names: kept, when released, for a later hit
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take (free, or cached and unreferenced)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._keyed)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"need {n} blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:  # evict the least recently used cached block nobody holds
                block, _ = self._evictable.popitem(last=False)
                self._forget(block)
                self.evictions += 1
            self._refs[block] = 1
            out.append(block)
        return out

    def share(self, block: int) -> None:
        if self._refs[block] == 0:
            self._evictable.pop(block)
        self._refs[block] += 1

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._keyed:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def cache(self, block: int, key: bytes, partial_keys: list[bytes]) -> None:
        """Name a full, held block by its prefix key and the keys of the prefixes that end
        inside it (first writer wins)."""
        if key not in self._by_key and block not in self._key_of:
            self._by_key[key] = block
            self._key_of[block] = key
            self._keyed.add(block)
        for k in partial_keys:
            self.cache_partial(block, k)

    def cache_partial(self, block: int, key: bytes) -> None:
        """Name the rows a held block starts with (it may be partly filled: its holder
        writes only after them) by their prefix key (first writer wins)."""
        if key not in self._by_partial_key:
            self._by_partial_key[key] = block
            self._partial_keys_of.setdefault(block, []).append(key)
            self._keyed.add(block)

    def _forget(self, block: int) -> None:
        """Drop every key naming an evicted block."""
        self._keyed.discard(block)
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._by_key[key]
        for k in self._partial_keys_of.pop(block, ()):
            del self._by_partial_key[k]

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `keys` (not yet shared)."""
        blocks = []
        for key in keys:
            block = self._by_key.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def lookup_partial(self, key: bytes) -> int | None:
        """The cached block whose first rows hold the prefix `key` names (not yet shared)."""
        return self._by_partial_key.get(key)

    def stats(self) -> dict[str, int]:
        return {
            "blocks": self.num_blocks, "free": len(self._free), "evictable": len(self._evictable),
            "used": self.num_blocks - self.num_free, "cached": self.num_cached, "evictions": self.evictions,
        }


@dataclass
class BlockTable:
    """The blocks of one session and how many token slots of them are filled."""

    block_size: int
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0

    def blocks_needed(self, new_tokens: int) -> int:
        total = -(-(self.num_tokens + new_tokens) // self.block_size)
        return max(0, total - len(self.blocks))

    def slots(self, start: int, end: int) -> torch.Tensor:
        """Flat slot indices of token positions [start, end)."""
        pos = torch.arange(start, end)
        table = torch.tensor(self.blocks, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size


class KVPool:
    """The K/V storage and the allocation interface the scheduler and engine call
    (grow, free, fork, share_prefix, cache_blocks); the `BlockPool` behind it keeps the
    counts and the cache map, so callers only ever see block tables.  Allocation only
    records the block copies it needs (`pending_copies`): the model runner makes them."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        layer_shape: tuple[int, ...] | None = None,  # a backend's layout of one layer; None: flat slots
    ):
        self.block_size = block_size
        self.allocator = BlockPool(num_blocks)
        self.scratch_block = num_blocks
        shape = (num_layers, *(layer_shape or ((num_blocks + 1) * block_size, num_kv_heads, head_dim)))
        if math.prod(shape[1:]) != (num_blocks + 1) * block_size * num_kv_heads * head_dim:
            raise ValueError(f"a layer of shape {shape[1:]} does not hold {num_blocks + 1} blocks")
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # (source, destination) block copies allocation decided on and the next tick makes
        # (`take_copies`, `copy_blocks`), before any K/V of it is written: in the order
        # recorded, so a copy of a copy reads its source filled.  On a tensor-parallel
        # server every rank makes them in its own pool.
        self.pending_copies: list[tuple[int, int]] = []

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def grow(self, table: BlockTable, new_tokens: int) -> None:
        """Make `table` writable for `new_tokens` more tokens (all or nothing): new blocks,
        and a private copy of a partly filled last block it shares with a fork."""
        need = table.blocks_needed(new_tokens)
        partial = table.num_tokens % self.block_size
        shared = new_tokens > 0 and partial and self.allocator.refs(table.blocks[-1]) > 1
        fresh = self.allocator.allocate(need + (1 if shared else 0))
        if shared:
            old, copy = table.blocks[-1], fresh.pop()
            self.pending_copies.append((old, copy))  # the whole block: its unwritten tail is as clean as the original's
            self.allocator.release([old])
            table.blocks[-1] = copy
        table.blocks.extend(fresh)

    def shrink(self, table: BlockTable) -> None:
        """Give back the blocks past the table's tokens (a rolled-back step grew them)."""
        keep = -(-table.num_tokens // self.block_size)
        self.allocator.release(table.blocks[keep:])
        del table.blocks[keep:]

    def free(self, table: BlockTable) -> None:
        self.allocator.release(table.blocks)
        table.blocks = []
        table.num_tokens = 0

    def fork(self, table: BlockTable) -> BlockTable:
        """A new table sharing all of `table`'s blocks (copy on first write)."""
        for block in table.blocks:
            self.allocator.share(block)
        return BlockTable(self.block_size, list(table.blocks), table.num_tokens)

    def share_prefix(self, table: BlockTable, keys: list[bytes]) -> int:
        """Point an empty table at the cached blocks of the longest held prefix of `keys`;
        return how many of the keys it holds."""
        blocks = self.allocator.lookup(keys)
        for block in blocks:
            self.allocator.share(block)
        table.blocks, table.num_tokens = blocks, len(blocks) * self.block_size
        return len(blocks)

    def share_partial(self, table: BlockTable, key: bytes, rows: int) -> bool:
        """Extend a table that ends on a block boundary by the first `rows` tokens of the
        cached block whose partial key is `key`, in a private copy of that block (the
        session writes its own tokens after them); False if none is cached or no block is
        free for the copy."""
        source = self.allocator.lookup_partial(key)
        if source is None or table.num_tokens % self.block_size:
            return False
        self.allocator.share(source)  # so the allocation below cannot evict it
        try:
            (copy,) = self.allocator.allocate(1)
        except OutOfBlocks:
            self.allocator.release([source])
            return False
        # The whole block: its slots past `rows` hold the other session's K/V (finite,
        # never attended to: the session's length masks them) until this one writes there.
        self.pending_copies.append((source, copy))
        self.allocator.release([source])
        table.blocks.append(copy)
        table.num_tokens += rows
        return True

    def cache_blocks(self, table: BlockTable, first: int, blocks: list[Block]) -> None:
        """Record that the table's full blocks first, first+1, ... hold the prefixes `blocks` name."""
        for i, block in enumerate(blocks):
            self.allocator.cache(table.blocks[first + i], block.key, block.partial_keys)

    def cache_partial(self, table: BlockTable, keys: list[bytes]) -> None:
        """Record that the table's partly filled last block starts with the prefixes `keys` name."""
        block = table.blocks[table.num_tokens // self.block_size]
        for key in keys:
            self.allocator.cache_partial(block, key)

    def _by_block(self, t: torch.Tensor) -> torch.Tensor:
        """[layers, blocks, block elements]: a view of any layout whose blocks are contiguous."""
        return t.view(t.shape[0], self.scratch_block + 1, -1)

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks, source to destination, in every layer, in order."""
        for source, destination in copies:
            for t in (self.k, self.v):
                self._by_block(t)[:, destination] = self._by_block(t)[:, source]

    def clear_blocks(self, blocks: torch.Tensor) -> None:
        """Zero these blocks in every layer."""
        for t in (self.k, self.v):
            self._by_block(t).index_fill_(1, blocks, 0)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(0, slots, v.to(self.v.dtype))

    def read(self, layer: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots' K and V, in `dtype` (the pool may store them narrower)."""
        return self.k[layer].index_select(0, slots).to(dtype), self.v[layer].index_select(0, slots).to(dtype)


def parse_memory(text: str, total_free: int | None = None) -> int:
    """'2GiB', '512MiB', '1e9' (bytes) or '0.5' (a fraction of free accelerator memory)."""
    s = text.strip()
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    for suffix, mult in units.items():
        if s.lower().endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    value = float(s)
    if 0 < value <= 1:
        if total_free is None:
            raise ValueError(f"--kv-cache-memory {text}: a fraction needs an accelerator; give bytes, e.g. 2GiB")
        return int(value * total_free)
    return int(value)

"""Paged KV cache for the middle blocks (vLLM's PagedAttention layout).

One preallocated pool of fixed-size blocks per layer, sized by a memory budget.  A
session owns a `BlockTable`: the list of blocks holding its tokens, in order, grown one
block at a time as it generates.  Nothing is reserved for a session's future length, so
a 256-token chat costs 256 tokens of cache, not a max_length reservation.

Storage is flat per layer: slot s = block * block_size + offset holds one token's K (and
V) for every KV head, so writing a batch's new tokens is one index_copy per layer.  One
extra block, never allocated, is scratch space: rows that only pad a batch to a compiled
size write and read there, so they never touch a session's cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch


class OutOfBlocks(Exception):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block; raise --kv-cache-memory")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


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
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.scratch_block = num_blocks
        shape = (num_layers, (num_blocks + 1) * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def grow(self, table: BlockTable, new_tokens: int) -> None:
        """Give `table` enough blocks for `new_tokens` more tokens (all or nothing)."""
        need = table.blocks_needed(new_tokens)
        if need:
            table.blocks.extend(self.allocator.allocate(need))

    def free(self, table: BlockTable) -> None:
        self.allocator.release(table.blocks)
        table.blocks = []
        table.num_tokens = 0

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer].index_select(0, slots), self.v[layer].index_select(0, slots)


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

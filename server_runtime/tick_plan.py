"""What one tick computes, as plain data: the boundary between the scheduler's chunks
and the model runner (and the attention backends behind it).

A tick is a flat batch of sequences, each a run of new tokens appended to one session's
context: a decode row is a sequence of one new token, a prefill chunk one of many.  The
plan lists, in the chunks' order, where each sequence's rows start in the batch
(`query_start`, vLLM's cu_seqlens_q / query_start_loc), its context length with the new
tokens (`seq_lens`), its block table, and per token its position and the pool slot its
K/V goes to (`slot_mapping`, slot = block * block_size + offset).  It is built once per
tick; every layer of every backend reads the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scheduler import Chunk


@dataclass
class TickPlan:
    block_size: int
    query_start: list[int]  # sequence i's new tokens are rows [query_start[i], query_start[i + 1])
    seq_lens: list[int]  # tokens of context per sequence, its new ones included
    block_tables: list[list[int]]  # each sequence's blocks, in order
    positions: torch.Tensor  # [tokens] long: absolute position of each new token
    slot_mapping: torch.Tensor  # [tokens] long: pool slot each new token's K/V is written to
    entered_blocks: list[int]  # blocks this tick writes first (fresh from the free list)

    @classmethod
    def from_chunks(cls, chunks: list[Chunk], block_size: int, device: torch.device) -> "TickPlan":
        query_start, seq_lens, tables, positions, entered = [0], [], [], [], []
        for c in chunks:
            lo, hi = c.positions
            blocks = c.session.table.blocks
            query_start.append(query_start[-1] + hi - lo)
            seq_lens.append(hi)
            tables.append(list(blocks))
            positions.append(torch.arange(lo, hi))
            entered += blocks[-(-lo // block_size):-(-hi // block_size)]
        pos = torch.cat(positions)
        table_of_token = torch.cat([torch.full((hi - lo,), i) for i, (lo, hi) in
                                    enumerate(zip(query_start, query_start[1:]))])
        flat_tables = torch.tensor([b for t in tables for b in t], dtype=torch.long)
        first_block = torch.tensor([0] + [len(t) for t in tables], dtype=torch.long).cumsum(0)
        blocks = flat_tables[first_block[table_of_token] + pos // block_size]
        slots = blocks * block_size + pos % block_size
        return cls(block_size, query_start, seq_lens, tables, pos.to(device), slots.to(device), entered)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def rows(self, i: int) -> tuple[int, int]:
        """The batch rows [from, to) of sequence i's new tokens."""
        return self.query_start[i], self.query_start[i + 1]

    def is_decode(self, i: int) -> bool:
        """One new token: the decode kernels find its context from the block table."""
        return self.query_start[i + 1] - self.query_start[i] == 1

    @property
    def all_decode(self) -> bool:
        return self.query_start[-1] == self.num_seqs

    def context_slots(self, i: int) -> torch.Tensor:
        """Flat pool slots of sequence i's whole context (new tokens last)."""
        pos = torch.arange(self.seq_lens[i])
        table = torch.tensor(self.block_tables[i], dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def padded_block_table(self) -> torch.Tensor:
        """[seqs, widest table] int32, 0 past a table's end (kernels read only seq_lens' blocks)."""
        width = max(len(t) for t in self.block_tables)
        return torch.tensor([t + [0] * (width - len(t)) for t in self.block_tables], dtype=torch.int32)

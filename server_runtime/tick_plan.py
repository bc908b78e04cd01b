"""What one tick computes, as plain data: the boundary between the scheduler's chunks
and the model runner (and the attention backends behind it).

A tick is a flat batch of sequences, each a run of new tokens appended to one session's
context: a decode row is a sequence of one new token, a prefill chunk one of many.  The
plan lists, in the chunks' order, where each sequence's rows start in the batch
(`query_start`, vLLM's cu_seqlens_q / query_start_loc), its context length with the new
tokens (`seq_lens`), its block table, and per token its position and the pool slot its
K/V goes to (`slot_mapping`, slot = block * block_size + offset), the input rows
(`hidden`) and the whole-block copies allocation decided on (copy on write, a cached
prefix's partial block).  It is built once per tick; every layer of every backend reads
the same plan, and a tensor-parallel server sends it to every rank as plain data (`pack`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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
    hidden: torch.Tensor  # [tokens, hidden_size]: the input rows, sequences back to back
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (source, destination), made first
    model: str | None = None  # the adapter these rows run (None: the base model)

    @classmethod
    def from_chunks(cls, chunks: list[Chunk], block_size: int, block_copies: list[tuple[int, int]] = (),
                    model: str | None = None) -> "TickPlan":
        """The plan of the scheduler's chunks (of one model), on the CPU."""
        query_start = [0]
        for c in chunks:
            query_start.append(query_start[-1] + c.end - c.start)
        hidden = torch.cat([c.hidden for c in chunks]) if len(chunks) > 1 else chunks[0].hidden
        return cls.build(block_size, query_start, [c.positions[1] for c in chunks],
                         [list(c.session.table.blocks) for c in chunks], hidden, list(block_copies), model)

    @classmethod
    def build(cls, block_size: int, query_start: list[int], seq_lens: list[int], tables: list[list[int]],
              hidden: torch.Tensor, block_copies: list[tuple[int, int]], model: str | None = None) -> "TickPlan":
        """Positions, slots and entered blocks follow from the rows, lengths and tables."""
        positions, entered = [], []
        for (a, b), hi, blocks in zip(zip(query_start, query_start[1:]), seq_lens, tables):
            lo = hi - (b - a)
            positions.append(torch.arange(lo, hi))
            entered += blocks[-(-lo // block_size):-(-hi // block_size)]
        pos = torch.cat(positions)
        table_of_token = torch.cat([torch.full((b - a,), i) for i, (a, b) in
                                    enumerate(zip(query_start, query_start[1:]))])
        flat_tables = torch.tensor([b for t in tables for b in t], dtype=torch.long)
        first_block = torch.tensor([0] + [len(t) for t in tables], dtype=torch.long).cumsum(0)
        blocks = flat_tables[first_block[table_of_token] + pos // block_size]
        slots = blocks * block_size + pos % block_size
        return cls(block_size, query_start, seq_lens, tables, pos, slots, entered, hidden, block_copies, model)

    def to(self, device: torch.device, dtype: torch.dtype) -> "TickPlan":
        """The plan with its tensors where (and its rows in the dtype) the runner computes."""
        return replace(self, positions=self.positions.to(device), slot_mapping=self.slot_mapping.to(device),
                       hidden=self.hidden.to(device, dtype))

    def pack(self) -> torch.Tensor:
        """The plan's plain data as one int64 tensor (`unpack` rebuilds the plan on another
        rank from it and the rows): [sequences, copies, query_start, seq_lens, table lengths,
        tables, copies]."""
        n = self.num_seqs
        return torch.tensor([n, len(self.block_copies), *self.query_start, *self.seq_lens,
                             *map(len, self.block_tables), *(b for t in self.block_tables for b in t),
                             *(b for c in self.block_copies for b in c)], dtype=torch.long)

    @classmethod
    def unpack(cls, packed: torch.Tensor, block_size: int, hidden: torch.Tensor) -> "TickPlan":
        data = packed.tolist()
        n, copies = data[0], data[1]
        at = 2
        query_start, at = data[at: at + n + 1], at + n + 1
        seq_lens, at = data[at: at + n], at + n
        lengths, at = data[at: at + n], at + n
        tables = []
        for length in lengths:
            tables.append(data[at: at + length])
            at += length
        pairs = list(zip(data[at: at + 2 * copies: 2], data[at + 1: at + 2 * copies: 2]))
        return cls.build(block_size, query_start, seq_lens, tables, hidden, pairs)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def rows(self, i: int) -> tuple[int, int]:
        """The batch rows [from, to) of sequence i's new tokens."""
        return self.query_start[i], self.query_start[i + 1]

    def split(self, out: torch.Tensor) -> list[torch.Tensor]:
        """The tick's output rows, one tensor per sequence."""
        return [out[a:b] for a, b in map(self.rows, range(self.num_seqs))]

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

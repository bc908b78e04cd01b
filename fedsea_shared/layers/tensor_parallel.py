"""Tensor parallelism of decoder blocks over a torch.distributed process group, as
Megatron-LM and vLLM do it (vLLM's ColumnParallelLinear / RowParallelLinear).

Each of N ranks holds a share of every block: its query heads (N divides the heads), the
KV heads those read (a share of them, or, where ranks outnumber KV heads, the one KV
head its query heads share: replicated), the same rows of gate/up and the matching
columns of o_proj and down_proj.  The column-parallel products (q/k/v, gate/up) need no
communication; each row-parallel one (o_proj, down_proj) yields a partial sum that one
all-reduce completes: two all-reduces per block.  A rank's block is an ordinary
`DecoderBlock` built from `TensorSplit.rank_config` (fewer heads, a narrower MLP), so
every kernel, weight format and attention backend runs on it unchanged;
`TensorSplit.slice_of` says which part of each checkpoint tensor a rank reads.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from transformers import PretrainedConfig

# (dimension, which range) of each block tensor a rank reads a part of; others it reads whole.
_COLUMN_PARALLEL = {"self_attn.q_proj": "q", "self_attn.k_proj": "kv", "self_attn.v_proj": "kv",
                    "mlp.gate_proj": "ff", "mlp.up_proj": "ff"}
_ROW_PARALLEL = {"self_attn.o_proj": "q", "mlp.down_proj": "ff"}


@dataclass(frozen=True)
class TensorSplit:
    """Rank `rank` of `world`'s share of a model's blocks: [start, stop) ranges of query
    heads, KV heads and MLP rows."""

    rank: int
    world: int
    head_dim: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ff_rows: tuple[int, int]

    @classmethod
    def of(cls, config: PretrainedConfig, rank: int, world: int) -> "TensorSplit":
        heads, kv, ff = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
        d = getattr(config, "head_dim", None) or config.hidden_size // heads
        if heads % world or ff % world:
            raise ValueError(f"--tensor-parallel {world} must divide the model's {heads} attention heads and its "
                             f"MLP width {ff}")
        per = heads // world
        if world <= kv:
            if kv % world:
                raise ValueError(f"--tensor-parallel {world} must divide the model's {kv} KV heads (or be a "
                                 f"multiple of them)")
            kv_per = kv // world
            kv_range = (rank * kv_per, (rank + 1) * kv_per)
        else:
            if world % kv:
                raise ValueError(f"--tensor-parallel {world} must be a multiple of the model's {kv} KV heads "
                                 f"(or divide them)")
            # More ranks than KV heads: each holds a copy of the one its query heads read.
            shared = (rank * per) // (heads // kv)
            kv_range = (shared, shared + 1)
        f = ff // world
        return cls(rank, world, d, (rank * per, (rank + 1) * per), kv_range, (rank * f, (rank + 1) * f))

    def rank_config(self, config: PretrainedConfig) -> PretrainedConfig:
        """The config a rank's blocks are built from: its heads and MLP rows, the model's width."""
        local = copy.deepcopy(config)
        local.num_attention_heads = self.q_heads[1] - self.q_heads[0]
        local.num_key_value_heads = self.kv_heads[1] - self.kv_heads[0]
        local.intermediate_size = self.ff_rows[1] - self.ff_rows[0]
        local.head_dim = self.head_dim  # no longer hidden_size // heads
        return local

    def _range(self, which: str) -> tuple[int, int]:
        d = self.head_dim
        return {"q": (self.q_heads[0] * d, self.q_heads[1] * d), "kv": (self.kv_heads[0] * d, self.kv_heads[1] * d),
                "ff": self.ff_rows}[which]

    def slice_of(self, name: str) -> tuple[int, int, int] | None:
        """(dimension, start, stop) of the checkpoint tensor `name` this rank holds; None:
        the whole tensor (norms; a row-parallel layer's bias, added on rank 0 only)."""
        module, _, kind = name.rpartition(".")
        part = module.split(".", 3)[-1] if module.startswith("model.layers.") else module
        if part in _COLUMN_PARALLEL:
            return (0, *self._range(_COLUMN_PARALLEL[part]))
        if part in _ROW_PARALLEL and kind == "weight":
            return (1, *self._range(_ROW_PARALLEL[part]))
        return None


class AllReduceStats:
    """Time spent in, and bytes sent to, one rank's all-reduces since the last `take`."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.bytes = 0
        self.calls = 0

    def take(self) -> tuple[float, int, int]:
        out = (self.seconds, self.bytes, self.calls)
        self.seconds, self.bytes, self.calls = 0.0, 0, 0
        return out


class RowParallel(nn.Module):
    """A row-parallel linear: this rank's columns of the weight times its share of the
    input, summed over the ranks by one all-reduce.  The bias is added by rank 0 alone
    (`shard_blocks` drops it elsewhere)."""

    def __init__(self, linear: nn.Module, group, stats: AllReduceStats):
        super().__init__()
        self.linear = linear
        self.group = group
        self.stats = stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        t0 = time.perf_counter()
        dist.all_reduce(out, group=self.group)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.bytes += out.nbytes
        self.stats.calls += 1
        return out


def shard_blocks(blocks: nn.Module, split: TensorSplit, group, stats: AllReduceStats) -> None:
    """Wrap every block's o_proj and down_proj of a rank's shard (loaded with `slice_of`)
    in `RowParallel`; ranks other than 0 drop those layers' biases."""
    for block in blocks.layers.values():
        for owner, name in ((block.self_attn, "o_proj"), (block.mlp, "down_proj")):
            linear = getattr(owner, name)
            if split.rank and linear.bias is not None:
                linear.bias = None
            setattr(owner, name, RowParallel(linear, group, stats))

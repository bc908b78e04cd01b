"""One rank's share of the server's model: it loads its middle blocks (all of them, or a
tensor-parallel rank's slice), settles the kernels they run on, sizes its KV pool and picks
its dtype, and runs a `TickPlan` through them.

The choices that could come out differently per rank (the linear kernel, timed at
start-up; block ops and attention backends, which depend on what builds or is installed
here; the decode attention; the KV pool's block count, from each device's free memory)
are made on rank 0 and sent to the others (`Choices`), so every rank runs the same
kernels over the same number of blocks.  The executor (executor.py) owns the process
group and the traffic of a tick; a worker only computes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fedsea_shared.adapters import load_adapters
from fedsea_shared.architectures import check_context
from fedsea_shared.layers.linear import NO_DENSE_WEIGHTS, loaded_format
from fedsea_shared.layers.tensor_parallel import AllReduceStats, TensorSplit, shard_blocks
from fedsea_shared.models import is_gguf, resolve_model
from fedsea_shared.protocol import WIRE_DTYPES
from fedsea_shared.shard import (Partition, apply_linear_kernel, fuse_projections, head_dim, load_config,
                                 load_server_shard, make_block_ops, resolve_weights, use_block_ops,
                                 warm_linear_kernels)

from .attention_backends import pool_layer_shape, resolve_backend
from .kv_pool import KVPool, parse_memory
from .model_runner import ModelRunner
from .tick_plan import TickPlan

log = logging.getLogger("fedsea.server.worker")


@dataclass
class RankGroup:
    """A tensor-parallel rank: its place, and the process group its ticks' collectives
    run in (created with the tick timeout, so a hung peer fails a collective)."""

    rank: int
    world: int
    group: object  # torch.distributed ProcessGroup


@dataclass
class Choices:
    """What every rank must run alike, decided on rank 0."""

    linear_kernel: str
    block_ops: str
    attention_backend: str
    decode_attention: str
    cuda_graphs: bool
    kv_dtype: str
    num_blocks: int


class Worker:
    def __init__(self, settings, ranks: RankGroup | None = None):
        """`settings`: the server's (app.ServerSettings); `ranks`: this rank's place in a
        tensor-parallel group, None for a server of one rank."""
        s = self.settings = settings
        self.ranks = ranks
        model_dir = resolve_model(s.model)
        self.config = load_config(model_dir)
        check_context(self.config, s.engine.max_context, "--max-context")
        self.partition = Partition(self.config.num_hidden_layers, s.head, s.tail)
        self.layers = self.partition.server_layers
        self.dtype = WIRE_DTYPES[s.dtype]
        self.device = rank_device(s.device, ranks.rank if ranks else None)
        self.split = TensorSplit.of(self.config, ranks.rank, ranks.world) if ranks else None
        if ranks and s.adapters:
            raise ValueError("a tensor-parallel server serves no adapters yet (--adapter): their merged weights "
                             "would need slicing as well")
        self.weights = resolve_weights(s.weights, self.device, "server", is_gguf(model_dir), self.config.dtype)
        self.shard = load_server_shard(model_dir, self.partition, dtype=self.dtype, device=self.device,
                                       config=self.config, weights=self.weights, split=self.split)
        local = self.shard.config  # this rank's heads
        self.choices = self._share(self._choose() if not ranks or ranks.rank == 0 else None)
        c = self.choices
        if ranks and ranks.rank and c.linear_kernel != NO_DENSE_WEIGHTS:  # rank 0's choice, for the same formats
            apply_linear_kernel(self.shard, c.linear_kernel, self.device)
        self.pool = KVPool(
            len(self.layers), c.num_blocks, s.block_size, local.num_key_value_heads, head_dim(local), WIRE_DTYPES[c.kv_dtype],
            self.device, pool_layer_shape(c.attention_backend, c.num_blocks + 1, s.block_size,
                                          local.num_key_value_heads, head_dim(local), self.device),
        )
        # Merged before training can wrap the shard's linears in LoRA layers.
        adapted = load_adapters(self.shard, s.model, s.adapters)
        if not s.enable_training:  # the training shard shares the per-projection weights
            fuse_projections([self.shard, *adapted.values()])
        self.block_ops = make_block_ops(c.block_ops, self.device, self.dtype, vllm=c.attention_backend == "vllm")
        for shard in (self.shard, *adapted.values()):
            use_block_ops(shard, self.block_ops)
        self.all_reduces = AllReduceStats()
        if ranks:
            shard_blocks(self.shard.model, self.split, ranks.group, self.all_reduces)

        def runner(shard):
            return ModelRunner(shard, self.layers, self.pool, self.device, c.decode_attention, c.cuda_graphs,
                               s.max_graph_batch, s.engine.max_context, c.attention_backend, self.block_ops.kernels,
                               may_fall_back=ranks is None)

        self.runners: dict[str | None, ModelRunner] = {None: runner(self.shard)}
        self.runners.update({name: runner(shard) for name, shard in adapted.items()})

    def _choose(self) -> Choices:
        s, device = self.settings, self.device
        linear_kernel = apply_linear_kernel(self.shard, s.linear_kernel, device)
        backend = resolve_backend(s.attention_backend, device, self.dtype, s.block_size, head_dim(self.config))
        block_ops = make_block_ops(s.block_ops, device, self.dtype, vllm=backend == "vllm").name
        on_cuda = device.type == "cuda"
        attention = s.decode_attention if s.decode_attention != "auto" else "flex" if on_cuda else "gather"
        # A CUDA graph would capture the all-reduces too: tensor-parallel ticks run eagerly.
        graphs = s.cuda_graphs and on_cuda and attention == "flex" and backend == "torch" and self.ranks is None
        if graphs and s.max_graph_batch < 1:
            raise ValueError(f"--max-graph-batch must be >= 1 (got {s.max_graph_batch})")
        # The shard's own formats, not --weights: a GGUF's ("file") may be all float32.
        converts = backend == "torch" and attention == "gather"
        kv_dtype = resolve_kv_dtype(s.kv_dtype, s.dtype, loaded_format(self.shard), converts)
        return Choices(linear_kernel, block_ops, backend, attention, graphs, kv_dtype, self._num_blocks(kv_dtype))

    def _num_blocks(self, kv_dtype: str) -> int:
        """Blocks of --kv-cache-memory in `kv_dtype` (per rank: each holds its KV heads of
        every block), as many as the rank with the least memory can hold."""
        s, local = self.settings, self.shard.config
        per_block = KVPool.bytes_per_block(len(self.layers), s.block_size, local.num_key_value_heads,
                                           head_dim(local), WIRE_DTYPES[kv_dtype])
        return self._kv_memory() // per_block - 1  # minus the scratch block

    def _kv_memory(self) -> int:
        """The KV pool's bytes: --kv-cache-memory, the least any rank's memory allows."""
        s = self.settings
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        if free is not None and s.enable_training:
            free = max(0, free - s.training.memory)  # a fraction of free memory leaves training its budget
        memory = parse_memory(s.kv_cache_memory, free)
        if self.ranks:
            least = torch.tensor([memory], device=comm_device(self.device))
            dist.all_reduce(least, op=dist.ReduceOp.MIN)
            memory = int(least.item())
        return memory

    def _share(self, choices: Choices | None) -> Choices:
        """Rank 0's choices, on every rank."""
        if self.ranks is None:
            return choices
        if self.ranks.rank:
            self._kv_memory()  # rank 0 sizes the pool in _choose: take part in its all-reduce
        box = [choices]
        dist.broadcast_object_list(box, src=0, device=comm_device(self.device))
        return box[0]

    def warm(self) -> None:
        """Build the linear kernels of the shapes serving runs, on the calling thread."""
        warm_linear_kernels(self.shard)

    def execute(self, plan: TickPlan) -> torch.Tensor:
        return self.runners[plan.model].execute(plan)

    def describe(self) -> str:
        c = self.choices
        attention = "vllm" if c.attention_backend == "vllm" else f"torch ({c.decode_attention} decode)"
        ranks = f", tensor-parallel rank {self.ranks.rank} of {self.ranks.world}" if self.ranks else ""
        return (f"KV pool {c.num_blocks} blocks x {self.settings.block_size} tokens in {c.kv_dtype} "
                f"({self.pool.nbytes / 2**20:.1f} MiB), "
                f"attention {attention}{' + CUDA graphs' if c.cuda_graphs else ''}, weights {self.weights}, "
                f"linear {c.linear_kernel}, block ops {self.block_ops.name}{ranks}")


# Weight formats whose products already round K and V to bfloat16 (the int8/int4 CPU kernels
# take bf16 activations) or come from bf16 weights: a bfloat16 pool halves the KV memory,
# so a GiB holds twice the tokens, for little further rounding.
BF16_PRODUCTS = ("bfloat16", "int8", "int4")


def resolve_kv_dtype(kv_dtype: str, compute: str, weights: str, converts: bool) -> str:
    """The KV pool's dtype.  `converts`: the attention path reads K/V in another dtype than
    it computes in (the torch backend's gather decode and prefill do; flex attention, CUDA
    graphs and vLLM's kernels take the pool as they compute).  auto: bfloat16 for weights
    in `BF16_PRODUCTS` with a float32 compute dtype where the path converts, float16 for
    float16 weights likewise, else the compute dtype."""
    if kv_dtype not in ("auto", *WIRE_DTYPES):
        raise ValueError(f"--kv-dtype must be auto or one of {', '.join(WIRE_DTYPES)}, not {kv_dtype!r}")
    if kv_dtype == "auto":
        narrow = "float16" if weights == "float16" else "bfloat16" if weights in BF16_PRODUCTS else compute
        return narrow if converts and compute == "float32" else compute
    if kv_dtype != compute and not converts:
        raise ValueError(f"--kv-dtype {kv_dtype} with --dtype {compute} needs the torch attention backend with "
                         f"gather decode (--attention-backend torch --decode-attention gather)")
    return kv_dtype


def rank_device(device: str, rank: int | None) -> torch.device:
    """A tensor-parallel rank's own GPU where the server runs on CUDA: the local rank's
    (torchrun) or its rank's; `rank` None: a server of one rank."""
    d = torch.device(device)
    if rank is None or d.type != "cuda" or d.index is not None:
        return d
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))


def comm_device(device: torch.device) -> torch.device:
    """Where a collective's tensors live: NCCL's on the GPU, gloo's on the CPU."""
    return device if device.type == "cuda" else torch.device("cpu")

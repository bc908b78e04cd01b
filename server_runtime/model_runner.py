"""Runs one scheduled tick through the middle blocks as a single flat batch.

All chunks' tokens are concatenated into one [tokens, hidden] tensor, so every linear
layer runs once per tick for all sessions.  The tick comes as plain data (`TickPlan`:
the rows, positions, slot mapping, block tables, query starts, sequence lengths, block
copies);
the attention backend (attention_backends.py: torch or vllm) builds its metadata from
it once and then, per layer, writes the new K/V into the paged pool and attends.
A tick of decode rows only goes to `DecodeGraphs` when the runner has them (CUDA, the
torch backend with flex decode attention).

If the compiled path fails (a kernel that does not build on this device), the runner
logs it, falls back to gather + SDPA for good and reruns the tick: re-running rewrites
the same K/V, so no session is corrupted and the server keeps serving.  The block copies
and clears run before the blocks, once, so a rerun finds the pool as the first try did.
"""

from __future__ import annotations

import logging

import torch

from fedsea_shared import defaults
from fedsea_shared.shard import ModelShard

from .attention_backends import AttentionBackend, TorchAttention, make_attention_backend
from .decode_graphs import DecodeGraphs, graph_safe_rope
from .kv_pool import KVPool
from .paged_attention import FlexPagedAttention, GatherAttention, KernelFailure
from .scheduler import Chunk
from .tick_plan import TickPlan

log = logging.getLogger("fedsea.server.runner")


class ModelRunner:
    def __init__(self, shard: ModelShard, layers: range, pool: KVPool, device: str | torch.device = "cpu",
                 decode_attention: str = "gather", decode_graphs: bool = False,
                 max_graph_batch: int = 64, max_context: int = defaults.MAX_CONTEXT, attention_backend: str = "torch",
                 kernels=None, may_fall_back: bool = True):
        """`kernels`: the fused CPU kernels' library (the shard's `BlockOps.kernels`), which
        the torch backend's gather decode uses for short contexts; None: torch's ops only.
        `may_fall_back`: whether a kernel failure switches this runner to gather + SDPA (a
        tensor-parallel rank may not: its peers would wait in a tick it reruns)."""
        self.shard = shard
        self.layers = layers
        self.pool = pool
        self.device = torch.device(device)
        self.dtype = next(shard.parameters()).dtype
        self.may_fall_back = may_fall_back
        self.scale = shard.model.layers[str(layers[0])].self_attn.scale
        self.backend: AttentionBackend = make_attention_backend(
            attention_backend, pool, self.scale, shard.config.num_attention_heads, decode_attention, kernels)
        self.graphs = self._decode_graphs(max_graph_batch, max_context) if decode_graphs else None

    def _decode_graphs(self, max_batch: int, max_context: int) -> DecodeGraphs | None:
        if not (isinstance(self.backend, TorchAttention) and isinstance(self.backend.decode, FlexPagedAttention)):
            raise ValueError("decode graphs need the torch backend's flex decode attention (it reads the pool in place)")
        if not graph_safe_rope(self.shard.config):
            log.warning("dynamic RoPE cannot run inside a CUDA graph: decode graphs off")
            return None
        graphs = DecodeGraphs(self.shard, self.layers, self.pool, self.backend.decode, max_batch, max_context,
                              self.device)
        if graphs.capture:
            try:
                with torch.inference_mode():
                    graphs.capture_all()
            except KernelFailure:
                self._fall_back()
                return None
        return graphs

    def run(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """Run the scheduler's chunks (and the block copies the pool has pending); one
        output per chunk."""
        plan = TickPlan.from_chunks(chunks, self.pool.block_size, self.pool.take_copies())
        return plan.split(self.execute(plan))

    @torch.inference_mode()
    def execute(self, plan: TickPlan) -> torch.Tensor:
        """The middle blocks' output rows of a tick's plan, [tokens, hidden_size]."""
        plan = plan.to(self.device, self.dtype)
        if plan.block_copies:
            self.pool.copy_blocks(plan.block_copies)
        if self.backend.needs_clean_blocks and plan.entered_blocks:
            # Fresh blocks from the free list may hold a closed session's NaN: zero them,
            # in every layer, before anything reads them.
            self.pool.clear_blocks(torch.tensor(plan.entered_blocks, device=self.device))
        try:
            return self._run(plan)
        except KernelFailure:
            if not self.may_fall_back:
                raise
            self._fall_back()
            return self._run(plan)

    def _fall_back(self) -> None:
        log.exception("flex decode attention failed on %s; falling back to gather + SDPA "
                      "(pass --decode-attention gather to start that way)", self.device)
        self.backend, self.graphs = TorchAttention(self.pool, self.scale, GatherAttention(self.pool.block_size, self.scale)), None

    def _run(self, plan: TickPlan) -> torch.Tensor:
        if plan.all_decode and self.graphs is not None and self.graphs.fits(plan.num_seqs):
            return self.graphs.run(plan.hidden, plan.positions, plan.slot_mapping, plan.block_tables, plan.seq_lens)
        metadata = self.backend.build(plan)
        first_layer = self.layers[0]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.backend.attend(layer - first_layer, q, k, v, metadata)

        return self.shard.run_blocks(self.layers, plan.hidden, plan.positions, attend)

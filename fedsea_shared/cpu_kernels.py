"""Fused fp32 CPU kernels for a decoder block's small ops (cpu_kernels.c), built on first use.

At a decode step's one to sixteen rows a block's norms, rotary embedding, SiLU-and-mul and
attention are microseconds of arithmetic behind tens of torch ops that cost ~3-8 us each
to dispatch (docs/performance.md).  vLLM ships such kernels, but only in its own venv; these
need nothing but the machine's C compiler: the source is compiled once per machine and
source version into the fedsea cache (about 0.3 s) and loaded with ctypes.  Without a
compiler, or on anything but float32 CPU tensors, the torch ops run instead (`NativeOps`
falls back per call; `load` logs why once).
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .models import cache_dir
from .shard import BlockOps

log = logging.getLogger("fedsea.kernels")

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# -march=native: the library is built on the machine that runs it (the cache key names
# the CPU).  No -ffast-math: sums keep their order and NaN stays NaN.
CFLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC"]

_p, _i, _f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "fs_rms_norm": [_p, _i, _p, _p, _i, _i, _f],
    "fs_add_rms_norm": [_p, _i, _p, _i, _p, _p, _p, _i, _i, _f],
    "fs_rope": [_p, _i, _i, _i, _p, _p, _i],
    "fs_silu_mul": [_p, _i, _p, _i, _i],
    "fs_paged_decode_attention": [_p, _p, _p, _p, _i, _p, _i, _i, _i, _i, _i, _f, _p],
    "fs_paged_decode_attention_bf16": [_p, _p, _p, _p, _i, _p, _i, _i, _i, _i, _i, _f, _p],
}
# The decode attention for each cache dtype it reads (the query and output stay float32).
DECODE_ATTENTION = {torch.float32: "fs_paged_decode_attention", torch.bfloat16: "fs_paged_decode_attention_bf16"}
MAX_ROPE_DIM = 512  # fs_rope's stack buffer


def _cpu_key() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return platform.machine() + "\n" + "\n".join(lines)


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes starting together build once
        if target.is_file():
            return
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], check=True, capture_output=True,
                           text=True, timeout=120)
            os.replace(tmp, target)
        except subprocess.CalledProcessError as e:
            raise OSError(f"{compiler} failed: {e.stderr.strip()[-500:]}") from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library, building it first if needed; None (logged once) where it
    cannot be built or loaded here."""
    source = SOURCE.read_bytes()
    digest = hashlib.blake2b(source + " ".join(CFLAGS).encode() + _cpu_key().encode(), digest_size=12).hexdigest()
    target = cache_dir() / "kernels" / f"cpu_kernels-{digest}.so"
    try:
        if not target.is_file():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("fused CPU kernels unavailable, using torch's ops: %s", e)
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int if name in DECODE_ATTENTION.values() else None
    return lib


# Above this many rows (a long prompt chunk) torch's ops, which use every core, are as fast
# or faster: at 300 rows the fused add+norm took 84 us against 62, SiLU-and-mul 215 against
# 183, on the 2-core machine of docs/performance.md.
MAX_ROWS = 64


class NativeOps(BlockOps):
    """BlockOps on the fused kernels.  A block takes them through `for_rows`, which hands
    back torch's ops for what they do not take: tensors that feed autograd, other dtypes,
    long prompt chunks.  The shard is float32 on the CPU (`make_block_ops`), and the
    tensors a block passes are rows of its own products (innermost dimension contiguous)."""

    name = "native"

    def __init__(self, lib: ctypes.CDLL):
        self.lib = self.kernels = lib
        self.torch = BlockOps()

    def for_rows(self, x: torch.Tensor) -> BlockOps:
        if x.shape[0] > MAX_ROWS or x.dtype is not torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
            return self.torch
        return self

    def rms_norm(self, x, weight, eps):
        out = torch.empty(x.shape)
        self.lib.fs_rms_norm(x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
        return out

    def add_rms_norm(self, x, delta, weight, eps):
        total, out = torch.empty(x.shape), torch.empty(x.shape)
        self.lib.fs_add_rms_norm(x.data_ptr(), x.stride(0), delta.data_ptr(), delta.stride(0), weight.data_ptr(),
                                 total.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
        return total, out

    def rope(self, q, k, cos, sin):
        rows, heads, d = q.shape
        if d > MAX_ROPE_DIM or d % 2 or q.stride(1) != d or k.stride(1) != d:
            return self.torch.rope(q, k, cos, sin)
        # In place: q and k are views of the block's fresh q/k/v product, read by nothing
        # else; side by side in its rows (q's heads, then k's), they are one call.
        cos, sin = cos.contiguous(), sin.contiguous()
        if k.data_ptr() == q.data_ptr() + heads * d * 4 and k.stride(0) == q.stride(0):
            self.lib.fs_rope(q.data_ptr(), q.stride(0), heads + k.shape[1], d, cos.data_ptr(), sin.data_ptr(), rows)
        else:
            for x in (q, k):
                self.lib.fs_rope(x.data_ptr(), x.stride(0), x.shape[1], d, cos.data_ptr(), sin.data_ptr(), rows)
        return q, k

    def silu_mul(self, gate_up):
        n = gate_up.shape[1] // 2
        out = torch.empty(gate_up.shape[0], n)
        self.lib.fs_silu_mul(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), gate_up.shape[0], n)
        return out


# The fused decode attention runs where a tick's decode rows (the server) or a generated
# token's sequence (the edge) hold at most this many context tokens; beyond, SDPA on every
# core.  The whole tick of the server's middle blocks, the two interleaved
# (docs/performance.md): about 1 ms faster from 1 x 60 up to 8 x 30 and 2 x 120 tokens, level
# at 300-500 in all, 2-2.5 ms slower at ~1000 (one thread reads K/V that the weights have
# pushed out of cache at a quarter of the machine's bandwidth).
MAX_DECODE_CONTEXT = 320


def decode_attention_fits(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                          device: torch.device) -> bool:
    """Whether the fused decode attention takes this model's caches: float32 or bfloat16 on
    the CPU (the kernels run only where the shard computes in float32: make_block_ops),
    head_dim a multiple of 16, at most 8 query heads per KV head."""
    return (dtype in DECODE_ATTENTION and device.type == "cpu" and head_dim % 16 == 0
            and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= 8)


def paged_decode_attention(lib: ctypes.CDLL, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           tables: torch.Tensor, lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """One new token per row over its paged context, reading only positions < its length.

    q: [rows, heads, d]; k_cache, v_cache: [slots, kv_heads, d] contiguous; tables: [rows,
    width] int64 blocks in order; lens: [rows] int64 -> [rows, heads * d].  The caller checks
    the inputs (`decode_attention_fits`, contiguous, every table long enough for its length)."""
    rows, heads, d = q.shape
    q = q.contiguous()
    out = torch.empty(rows, heads * d, dtype=q.dtype)
    kernel = getattr(lib, DECODE_ATTENTION[k_cache.dtype])
    status = kernel(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.shape[1],
                    lens.data_ptr(), rows, heads, k_cache.shape[1], d, block_size, scale, out.data_ptr())
    if status == -1:
        raise MemoryError("fused decode attention: out of memory for its scores")
    if status != 0:
        raise ValueError("fused decode attention takes head_dim % 16 == 0 and at most 8 query heads per KV head")
    return out

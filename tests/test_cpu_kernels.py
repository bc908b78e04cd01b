"""The fused CPU kernels (fedsea_shared/cpu_kernels.c) against torch's ops, one by one:
odd sizes, strided rows, NaN, contexts in blocks out of order next to slots full of
garbage, and the fallbacks (autograd, long chunks, no compiler)."""

from __future__ import annotations

import pytest
import torch

from fedsea_shared import cpu_kernels
from fedsea_shared.shard import BlockOps, make_block_ops, rotate

TORCH = BlockOps()


@pytest.fixture(scope="module")
def native():
    ops = make_block_ops("native", "cpu", torch.float32)
    assert ops.name == "native"
    return ops


def rotary(rows: int, d: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin [rows, 1, d], as ModelShard.rotary_tables makes them."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    angles = (torch.arange(start, start + rows).float()[:, None] * inv[None])
    emb = torch.cat([angles, angles], -1)
    sin = emb.sin()
    return emb.cos()[:, None], torch.cat([-sin[:, : d // 2], sin[:, d // 2:]], -1)[:, None]


@pytest.mark.parametrize("rows, hidden", [(1, 576), (3, 128), (64, 100), (7, 17)])
def test_norms_match_torch(native, rows, hidden):
    g = torch.Generator().manual_seed(rows)
    wide = torch.randn(rows, hidden + 9, generator=g) * 3
    x = wide[:, 5 : 5 + hidden]  # rows of a wider tensor: a stride that is not the width
    delta, w = torch.randn(rows, hidden, generator=g), torch.randn(hidden, generator=g)
    ops = native.for_rows(x)
    assert ops is native
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), TORCH.rms_norm(x, w, 1e-5))
    total, normed = ops.add_rms_norm(x, delta, w, 1e-6)
    want_total, want_normed = TORCH.add_rms_norm(x, delta, w, 1e-6)
    assert torch.equal(total, want_total)
    torch.testing.assert_close(normed, want_normed)


def test_silu_mul_matches_torch_over_exp_range(native):
    gate = torch.cat([torch.linspace(-120, 120, 3001), torch.tensor([0.0, -0.0, 1e-30, float("nan")])])
    gate_up = torch.cat([gate, torch.randn_like(gate)])[None].repeat(3, 1)  # [rows, gate then up]
    got, want = native.silu_mul(gate_up), TORCH.silu_mul(gate_up)
    assert torch.isnan(got[:, -1]).all()
    torch.testing.assert_close(got[:, :-1], want[:, :-1], rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("heads, kv_heads, d", [(9, 3, 64), (4, 2, 32), (2, 1, 6)])
def test_rope_rotates_q_and_k_in_place_as_torch(native, heads, kv_heads, d):
    rows = 5
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d)
    cos, sin = rotary(rows, d, start=40)
    q, k, _ = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)
    q, k = q.view(rows, heads, d), k.view(rows, kv_heads, d)
    want_q, want_k = rotate(q.clone(), cos, sin), rotate(k.clone(), cos, sin)
    got_q, got_k = native.rope(q, k, cos, sin)
    assert got_q.data_ptr() == q.data_ptr()  # in place, in the product's buffer
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)
    # q and k not side by side (separate tensors): rotated one call each, same result.
    q2, k2 = qkv[:, : heads * d].clone().view(rows, heads, d), torch.randn(rows, kv_heads, d)
    want_k2 = rotate(k2.clone(), cos, sin)
    _, got_k2 = native.rope(q2, k2, cos, sin)
    torch.testing.assert_close(got_k2, want_k2)


def test_for_rows_hands_autograd_and_long_chunks_to_torch(native):
    x = torch.randn(3, 8, requires_grad=True)
    assert native.for_rows(x) is not native
    with torch.no_grad():
        assert native.for_rows(x) is native
    assert native.for_rows(torch.randn(cpu_kernels.MAX_ROWS + 1, 8)) is not native
    assert native.for_rows(torch.randn(2, 8, dtype=torch.bfloat16)) is not native


def reference_attention(q, k_cache, v_cache, tables, lens, block_size, scale):
    out = []
    for r, n in enumerate(lens.tolist()):
        pos = torch.arange(n)
        slots = tables[r][pos // block_size] * block_size + pos % block_size
        k, v = k_cache[slots], v_cache[slots]  # [n, kv_heads, d]
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[r], k) * scale, -1)
        out.append(torch.einsum("hn,nhd->hd", p, v).reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, d, block_size", [(9, 3, 64, 16), (4, 2, 32, 16), (8, 1, 16, 4)])
def test_paged_decode_attention_reads_only_each_rows_own_slots(heads, kv_heads, d, block_size, cache_dtype):
    lib = cpu_kernels.load()
    g = torch.Generator().manual_seed(d)
    blocks = 40
    k_cache = torch.full((blocks * block_size, kv_heads, d), float("nan"), dtype=cache_dtype)
    v_cache = torch.full_like(k_cache, float("inf"))
    lens = torch.tensor([1, block_size, block_size + 1, 3 * block_size - 1, 5 * block_size], dtype=torch.long)
    order = torch.randperm(blocks, generator=g)  # blocks out of order
    width = int(-(-lens.max() // block_size))
    tables = torch.zeros(len(lens), width, dtype=torch.long)
    used = 0
    for r, n in enumerate(lens.tolist()):
        own = order[used : used + -(-n // block_size)]
        used += len(own)
        tables[r, : len(own)] = own
        pos = torch.arange(n)
        slots = own[pos // block_size] * block_size + pos % block_size
        k_cache[slots] = torch.randn(n, kv_heads, d, generator=g).to(cache_dtype)
        v_cache[slots] = torch.randn(n, kv_heads, d, generator=g).to(cache_dtype)
    q = torch.randn(len(lens), heads, d, generator=g)
    got = cpu_kernels.paged_decode_attention(lib, q, k_cache, v_cache, tables, lens, block_size, d**-0.5)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()  # the NaN/Inf past each row's length is never read
    # A bfloat16 cache is read widened, exactly: the float32 products of the same values.
    expected = reference_attention(q, k_cache.float(), v_cache.float(), tables, lens, block_size, d**-0.5)
    torch.testing.assert_close(got, expected)


def test_paged_decode_attention_refuses_shapes_it_does_not_take():
    lib = cpu_kernels.load()
    assert not cpu_kernels.decode_attention_fits(9, 3, 60, torch.float32, torch.device("cpu"))
    assert not cpu_kernels.decode_attention_fits(18, 2, 64, torch.float32, torch.device("cpu"))
    assert not cpu_kernels.decode_attention_fits(9, 3, 64, torch.float16, torch.device("cpu"))
    q, cache = torch.randn(1, 9, 60), torch.randn(16, 3, 60)
    with pytest.raises(ValueError, match="head_dim"):
        cpu_kernels.paged_decode_attention(lib, q, cache, cache, torch.zeros(1, 1, dtype=torch.long),
                                           torch.tensor([4]), 16, 0.1)


def test_without_a_compiler_the_ops_are_torchs(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSEA_CACHE", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    cpu_kernels.load.cache_clear()
    try:
        assert cpu_kernels.load() is None
        assert make_block_ops("auto", "cpu", torch.float32).name == "torch"
        with pytest.raises(ValueError, match="do not run here"):
            make_block_ops("native", "cpu", torch.float32)
    finally:
        cpu_kernels.load.cache_clear()
    assert make_block_ops("auto", "cpu", torch.bfloat16).name == "torch"
    with pytest.raises(ValueError, match="block ops must be one of"):
        make_block_ops("fast", "cpu", torch.float32)

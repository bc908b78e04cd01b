"""Decode attention over the paged pool: the gather and in-place (FlexAttention) kernels,
batch padding onto the scratch block, and the static decode-graph path, each checked
against plain per-session attention on the tiny model (CPU; the graphs themselves are
captured only on CUDA, over this same code)."""

from __future__ import annotations

import random
import threading
from concurrent.futures import Future

import pytest
import torch
import torch.nn.functional as F

from fedsea_shared.shard import Partition, load_server_shard
from server_runtime.kv_pool import BlockTable, KVPool
from server_runtime.model_runner import ModelRunner
from server_runtime.paged_attention import (
    BATCH_BUCKETS, DecodeRows, FlexPagedAttention, GatherAttention, padded_batch,
)
from server_runtime.scheduler import Chunk, Session, StepWork

BLOCK = 4


def test_padded_batch_ladder():
    assert [padded_batch(n) for n in (1, 3, 8, 9, 33, 256, 257, 300)] == [1, 4, 8, 16, 48, 256, 320, 320]
    assert all(padded_batch(b) == b for b in BATCH_BUCKETS)


def reference(q, pool, tables, lengths, scale):
    out = []
    for i, (blocks, n) in enumerate(zip(tables, lengths)):
        slots = BlockTable(BLOCK, list(blocks)).slots(0, n)
        k, v = pool.read(0, slots, pool.k.dtype)
        o = F.scaled_dot_product_attention(q[i][:, None], k.transpose(0, 1), v.transpose(0, 1),
                                           scale=scale, enable_gqa=True)
        out.append(o[:, 0].reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["gather", "flex"])
def test_decode_attention_matches_per_session_attention(kind):
    torch.manual_seed(0)
    pool = KVPool(num_layers=1, num_blocks=40, block_size=BLOCK, num_kv_heads=2, head_dim=16, dtype=torch.float32)
    pool.k.normal_()
    pool.v.normal_()
    # Lengths on and off block boundaries, a one-token context, blocks out of order.
    lengths = [1, 4, 5, 12, 30]
    blocks = random.Random(0).sample(range(40), 40)
    tables = []
    for n in lengths:
        tables.append([blocks.pop() for _ in range(-(-n // BLOCK))])
    scale = 16**-0.5
    kernel = GatherAttention(BLOCK, scale) if kind == "gather" else FlexPagedAttention(pool, scale)
    rows = len(lengths) if kind == "gather" else padded_batch(len(lengths))  # 5 -> 8: 3 padding rows
    q = torch.randn(rows, 4, 16)
    plan = kernel.plan(DecodeRows.build(tables, lengths, pool, rows, torch.device("cpu")))
    out = kernel.attend(plan, q, pool.k[0], pool.v[0])
    assert out.shape == (rows, 64)
    torch.testing.assert_close(out[: len(lengths)], reference(q, pool, tables, lengths, scale), atol=1e-5, rtol=1e-5)


def test_a_lone_row_reads_its_context_up_to_its_length_only():
    """One decode row (a lone stream) takes the gather kernel's unmasked path: the
    unwritten tail of its last block holds NaN, which must not reach it."""
    torch.manual_seed(1)
    pool = KVPool(num_layers=1, num_blocks=8, block_size=BLOCK, num_kv_heads=2, head_dim=16, dtype=torch.float32)
    pool.k.normal_()
    pool.v.normal_()
    tables, lengths = [[5, 2]], [BLOCK + 1]
    for t in (pool.k, pool.v):
        t[0, 2 * BLOCK + 1 : 3 * BLOCK] = float("nan")
    kernel = GatherAttention(BLOCK, 16**-0.5)
    q = torch.randn(1, 4, 16)
    out = kernel.attend(kernel.plan(DecodeRows.build(tables, lengths, pool, 1, torch.device("cpu"))), q, pool.k[0], pool.v[0])
    torch.testing.assert_close(out, reference(q, pool, tables, lengths, 16**-0.5), atol=1e-5, rtol=1e-5)


def tick(runner, sessions, hidden_size, steps):
    """Run one tick: `steps` maps session index -> tokens to append; returns outputs."""
    chunks = []
    for i, n in steps.items():
        s = sessions[i]
        runner.pool.grow(s.table, n)
        work = StepWork(s, torch.randn(n, hidden_size), s.table.num_tokens, Future())
        chunks.append(Chunk(work, 0, n))
    outputs = runner.run(chunks)
    for c in chunks:
        c.session.table.num_tokens = c.positions[1]
    return outputs


@pytest.fixture(scope="module")
def tiny_shard(tiny_model_dir):
    return load_server_shard(tiny_model_dir, Partition(6, 2, 2))


def test_runner_paths_agree_and_padding_never_touches_sessions(tiny_shard):
    """The same ticks (prefill, mixed, decode-only at batch sizes that pad) through the
    gather runner, the flex runner and the flex runner with static decode graphs give
    the same outputs and the same cache; padding rows write only to the scratch block."""
    layers = Partition(6, 2, 2).server_layers
    config = tiny_shard.config
    variants = {"gather": dict(decode_attention="gather"), "flex": dict(decode_attention="flex"),
                "graphs": dict(decode_attention="flex", decode_graphs=True, max_graph_batch=8)}
    results = {}
    for name, kw in variants.items():
        torch.manual_seed(1)
        pool = KVPool(len(layers), 64, BLOCK, config.num_key_value_heads, 16, torch.float32)
        scratch = slice(pool.scratch_block * BLOCK, (pool.scratch_block + 1) * BLOCK)
        pool.k[:, scratch] = 7.0  # a sentinel: padding rows (zero hidden) overwrite it with zeros
        runner = ModelRunner(tiny_shard, layers, pool, **kw)
        sessions = [Session(i, BlockTable(BLOCK)) for i in range(6)]
        outs = [tick(runner, sessions, config.hidden_size, {i: 3 + 2 * i for i in range(5)})]  # prefill
        outs.append(tick(runner, sessions, config.hidden_size, {0: 1, 1: 1, 5: 9}))  # mixed
        for _ in range(5):  # decode only: 5 rows pad to 8
            outs.append(tick(runner, sessions, config.hidden_size, {i: 1 for i in range(5)}))
        outs.append(tick(runner, sessions, config.hidden_size, {i: 1 for i in range(6)}))  # 6 -> 8
        used = sorted(b for s in sessions for b in s.table.blocks)
        assert pool.scratch_block not in used
        assert type(runner.backend.decode).__name__ == {"gather": "GatherAttention"}.get(name, "FlexPagedAttention")
        assert (runner.graphs is not None) == (name == "graphs")  # no silent fallback
        results[name] = (torch.cat([o for tick_out in outs for o in tick_out]), pool, used, sessions)
    base_out, base_pool, used, sessions = results["gather"]
    for name in ("flex", "graphs"):
        out, pool, _, _ = results[name]
        torch.testing.assert_close(out, base_out, atol=2e-5, rtol=1e-4, msg=f"{name} outputs differ")
        for s in sessions:  # every written token of every session: identical K/V
            slots = s.table.slots(0, s.table.num_tokens)
            torch.testing.assert_close(pool.k[:, slots], base_pool.k[:, slots], atol=2e-5, rtol=1e-4)
    # Padding rows wrote to the scratch block's first slot, and no row wrote a free block.
    scratch = base_pool.scratch_block * BLOCK
    assert (results["graphs"][1].k[:, scratch] == 0).all() and (base_pool.k[:, scratch] == 7).all()
    free = [b for b in range(base_pool.scratch_block) if b not in used]
    for name, (_, pool, _, _) in results.items():
        free_slots = torch.tensor([b * BLOCK + i for b in free for i in range(BLOCK)])
        assert (pool.k[:, free_slots] == 0).all(), name


def test_flex_compiles_every_batch_size_on_the_engine_thread():
    """Each padded batch size is its own compiled kernel.  Dynamo's recompile limit (8,
    per thread) must not send the larger buckets to the unfused fallback, which
    materializes every score: all 10 sizes below must compile, on a non-main thread as
    the engine's worker is."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    pool = KVPool(num_layers=1, num_blocks=8, block_size=BLOCK, num_kv_heads=1, head_dim=16, dtype=torch.float32)
    pool.k.normal_()
    kernel = FlexPagedAttention(pool, 0.25)
    before = len(_debug_get_cache_entry_list(flex_attention.__code__))
    errors = []

    def run():
        try:
            for rows in BATCH_BUCKETS[:10]:
                plan = kernel.plan(DecodeRows.build([[3]], [2], pool, rows, torch.device("cpu")))
                kernel.attend(plan, torch.randn(rows, 2, 16), pool.k[0], pool.v[0])
        except Exception as e:  # surfaced below
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not errors
    assert len(_debug_get_cache_entry_list(flex_attention.__code__)) - before == 10  # compiled kernels


def test_a_failing_flex_kernel_falls_back_to_gather(tiny_shard, monkeypatch, caplog):
    """A compiled kernel that does not build on a device must not take the server down:
    the runner logs it, switches to gather for good, and the tick's result is right."""
    layers = Partition(6, 2, 2).server_layers
    config = tiny_shard.config
    outputs = {}
    for name in ("gather", "flex"):
        torch.manual_seed(2)
        pool = KVPool(len(layers), 32, BLOCK, config.num_key_value_heads, 16, torch.float32)
        runner = ModelRunner(tiny_shard, layers, pool, decode_attention=name, decode_graphs=name == "flex")
        if name == "flex":
            def broken(*args, **kwargs):
                raise RuntimeError("no kernel for this device")
            monkeypatch.setattr(runner.backend.decode, "_flex", broken)
        sessions = [Session(i, BlockTable(BLOCK)) for i in range(3)]
        out = tick(runner, sessions, config.hidden_size, {0: 5, 1: 2, 2: 7})
        out += tick(runner, sessions, config.hidden_size, {0: 1, 1: 1, 2: 1})
        outputs[name] = torch.cat(out)
    assert isinstance(runner.backend.decode, GatherAttention) and runner.graphs is None
    assert "falling back to gather" in caplog.text
    torch.testing.assert_close(outputs["flex"], outputs["gather"])


def test_other_errors_do_not_switch_kernels(tiny_shard, monkeypatch):
    """Only a kernel failure switches to gather; any other error (here a transient
    out-of-memory in the model) propagates and the flex path stays."""
    layers = Partition(6, 2, 2).server_layers
    pool = KVPool(len(layers), 32, BLOCK, tiny_shard.config.num_key_value_heads, 16, torch.float32)
    runner = ModelRunner(tiny_shard, layers, pool, decode_attention="flex")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("transient")

    monkeypatch.setattr(runner.backend.decode, "_flex", out_of_memory)
    sessions = [Session(0, BlockTable(BLOCK))]
    tick(runner, sessions, tiny_shard.config.hidden_size, {0: 3})
    with pytest.raises(torch.OutOfMemoryError):
        tick(runner, sessions, tiny_shard.config.hidden_size, {0: 1})
    assert isinstance(runner.backend.decode, FlexPagedAttention)


def test_startup_capture_writes_only_the_scratch_block(tiny_shard):
    """capture_all runs every bucket with all rows padding (on a CPU uncaptured): the
    sessions' part of the pool is untouched."""
    from server_runtime.decode_graphs import DecodeGraphs

    layers = Partition(6, 2, 2).server_layers
    pool = KVPool(len(layers), 16, BLOCK, tiny_shard.config.num_key_value_heads, 16, torch.float32)
    pool.k.fill_(3.0)
    graphs = DecodeGraphs(tiny_shard, layers, pool, FlexPagedAttention(pool, 0.25), max_batch=5,
                          max_context=64, device=torch.device("cpu"))
    graphs.capture_all()  # buckets 8, 4, 2, 1
    scratch = pool.scratch_block * BLOCK
    assert (pool.k[:, :scratch] == 3.0).all()
    assert (pool.k[:, scratch] != 3.0).any()


def test_stale_nan_in_freed_blocks_never_reaches_a_session(tiny_shard):
    """Blocks come back from the free list holding whatever their last session wrote, NaN
    and Inf included (issue 10, failure 3): masked slots must contribute exactly zero, so
    through either kernel a pool full of NaN gives a clean pool's outputs."""
    layers = Partition(6, 2, 2).server_layers
    config = tiny_shard.config

    def run(kind: str, fill: float) -> torch.Tensor:
        torch.manual_seed(2)
        # The pool shape and 5-row decode ticks of the test above: flex reuses its kernels.
        pool = KVPool(len(layers), 64, BLOCK, config.num_key_value_heads, 16, torch.float32)
        pool.k.fill_(fill)
        pool.v.fill_(fill)
        runner = ModelRunner(tiny_shard, layers, pool, decode_attention=kind)
        sessions = [Session(i, BlockTable(BLOCK)) for i in range(5)]
        outs = tick(runner, sessions, config.hidden_size, {i: 1 + 3 * i for i in range(5)})  # block tails unwritten
        for _ in range(3):  # decode rows of unequal widths: page-table padding too
            outs += tick(runner, sessions, config.hidden_size, {i: 1 for i in range(5)})
        return torch.cat(outs)

    clean = run("gather", 0.0)
    torch.testing.assert_close(run("gather", float("nan")), clean, atol=0, rtol=0)
    flex = run("flex", float("nan"))
    assert torch.isfinite(flex).all()
    torch.testing.assert_close(flex, clean, atol=2e-5, rtol=1e-4)

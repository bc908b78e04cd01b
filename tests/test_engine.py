"""The paged, batching server engine: block accounting under faults, chunked prefill,
admission and back-pressure, batching exactness, observability."""

from __future__ import annotations

import asyncio
import random
import time
import urllib.request
from concurrent.futures import Future

import pytest
import torch

from edge_runtime import AsyncEdgeClient, ServerError
from fedsea_shared.protocol import ProtocolError
from server_runtime.engine import EngineSettings
from server_runtime.kv_pool import BlockPool, BlockTable, KVPool, OutOfBlocks, parse_memory
from conftest import metric

HIDDEN = 64


def test_block_table_maps_positions_to_slots():
    table = BlockTable(block_size=4, blocks=[7, 2, 9])
    assert table.slots(0, 3).tolist() == [28, 29, 30]
    assert table.slots(3, 9).tolist() == [31, 8, 9, 10, 11, 36]
    table.num_tokens = 9
    assert table.blocks_needed(3) == 0 and table.blocks_needed(4) == 1


def test_pool_grows_all_or_nothing_and_frees():
    pool = KVPool(num_layers=1, num_blocks=3, block_size=4, num_kv_heads=1, head_dim=2, dtype=torch.float32)
    a, b = BlockTable(4), BlockTable(4)
    pool.grow(a, 9)  # 3 blocks
    assert len(a.blocks) == 3 and pool.allocator.num_free == 0
    with pytest.raises(OutOfBlocks):
        pool.grow(b, 1)
    assert b.blocks == []
    pool.free(a)
    assert pool.allocator.num_free == 3


def test_parse_memory():
    assert parse_memory("2GiB") == 2 * 2**30
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1e6") == 1_000_000
    assert parse_memory("0.5", total_free=1000) == 500
    with pytest.raises(ValueError):
        parse_memory("0.5")
    with pytest.raises(ValueError):
        BlockPool(0)


def wait(fut: Future, timeout: float = 30):
    return fut.result(timeout=timeout)


def test_random_open_step_abort_returns_every_block(start_server, tiny_model_dir):
    """100 random session lifecycles, many aborted mid-prefill (chunked prefill with a
    small token budget makes 'mid-prefill' real); the pool ends where it started."""
    server = start_server(tiny_model_dir, engine=EngineSettings(token_budget=8))
    engine = server.runtime.engine
    rng = random.Random(0)
    pending: list[Future] = []
    for i in range(100):
        key = (0, i)
        wait(engine.open(key))
        steps = rng.randint(0, 3)
        pos = 0
        for _ in range(steps):
            n = rng.choice([1, 1, 5, 40])
            fut = engine.step(key, pos, torch.randn(n, HIDDEN))
            if rng.random() < 0.3:  # abort while the step may still be running
                pending.append(fut)
                break
            wait(fut)
            pos += n
        if rng.random() < 0.2:
            continue  # left open: freed below like a dropped connection would
        wait(engine.close(key))
    for i in range(100):
        engine.close((0, i))
    wait(engine.close((0, -1)))  # commands run in order: all closes above are done
    for fut in pending:
        if fut.done() and fut.exception() is not None:
            assert isinstance(fut.exception(), ProtocolError)
    deadline = time.monotonic() + 10  # /metrics is published after the command's tick
    while (metric(server, "fedsea_sessions"), metric(server, "fedsea_kv_blocks_used")) != (0, 0):
        assert time.monotonic() < deadline, "sessions or KV blocks left after every session closed"
        time.sleep(0.05)


async def test_edge_disconnect_mid_prefill_frees_blocks(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir, engine=EngineSettings(token_budget=4))
    allocator = server.runtime.pool.allocator
    initial = allocator.num_free
    for _ in range(5):
        client = AsyncEdgeClient(server.url, model=str(tiny_model_dir), noise=0.0)
        long_prompt = list(range(100, 400))
        task = asyncio.create_task(client.generate([{"role": "user", "content": str(long_prompt)}], max_tokens=4))
        while allocator.num_free == initial:  # the prefill has started writing blocks
            await asyncio.sleep(0.005)
        task.cancel()
        await (await client.connection()).ws.close()  # the edge vanishes
        await client.aclose()
    for _ in range(200):
        if allocator.num_free == initial:
            break
        await asyncio.sleep(0.05)
    assert allocator.num_free == initial


def test_chunked_prefill_matches_one_shot(start_server, tiny_model_dir):
    hidden = torch.randn(40, HIDDEN)
    outputs = []
    for budget in (512, 7):
        engine = start_server(tiny_model_dir, engine=EngineSettings(token_budget=budget)).runtime.engine
        wait(engine.open((0, 0)))
        prefill = wait(engine.step((0, 0), 0, hidden))
        decode = wait(engine.step((0, 0), 40, hidden[:1]))
        outputs.append(torch.cat([prefill, decode]))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["gather", "flex"])
def test_decode_batched_with_others_matches_alone(start_server, tiny_model_dir, attention):
    """One tick packing 16 sessions' decode rows (padded contexts) and a prefill gives
    each session what it gets alone, with either decode attention kernel."""
    engine = start_server(tiny_model_dir, decode_attention=attention).runtime.engine
    torch.manual_seed(0)
    prompts = [torch.randn(random.Random(i).randint(3, 30), HIDDEN) for i in range(16)]
    token = torch.randn(1, HIDDEN)
    alone = []
    for i, p in enumerate(prompts):
        wait(engine.open((1, i)))
        wait(engine.step((1, i), 0, p))
        alone.append(wait(engine.step((1, i), len(p), token)))
    for i, p in enumerate(prompts):
        wait(engine.open((2, i)))
        wait(engine.step((2, i), 0, p))
    futures = [engine.step((2, i), len(p), token) for i, p in enumerate(prompts)]
    futures.append(engine.step((1, 0), len(prompts[0]) + 1, torch.randn(9, HIDDEN)))  # a prefill chunk too
    batched = [wait(f) for f in futures[:16]]
    for a, b in zip(alone, batched):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    kernel = type(engine.executor.worker.runners[None].backend.decode).__name__
    assert kernel == {"gather": "GatherAttention", "flex": "FlexPagedAttention"}[attention]  # no fallback


def test_full_pool_makes_new_sessions_wait_then_fail_with_capacity(start_server, tiny_model_dir):
    # 8 KiB per block for the tiny model's 2 middle layers: 5 blocks, one of them the
    # scratch block, leave 4 = 64 tokens.
    server = start_server(tiny_model_dir, kv_cache_memory="40KiB", kv_quota=1.0,  # one tenant may fill it
                          engine=EngineSettings(wait_timeout=0.5, admission_free_blocks=1))
    engine = server.runtime.engine
    assert server.runtime.pool.allocator.num_blocks == 4
    wait(engine.open((0, 0)))
    wait(engine.open((0, 1)))
    first = wait(engine.step((0, 0), 0, torch.randn(60, HIDDEN)))  # all 4 blocks
    with pytest.raises(ProtocolError) as info:
        wait(engine.step((0, 1), 0, torch.randn(20, HIDDEN)))
    assert info.value.code.value == "capacity"
    with pytest.raises(ProtocolError) as info:
        wait(engine.open((0, 2)))  # waits 0.5 s for a free block, then gives up
    assert info.value.code.value == "capacity"
    # The running session is intact: it still decodes within its last block.
    out = wait(engine.step((0, 0), 60, first[:1]))
    assert out.shape == (1, HIDDEN) and torch.isfinite(out).all()
    wait(engine.close((0, 0)))
    wait(engine.open((0, 3)))  # capacity came back


def test_a_long_prompt_on_an_idle_server_is_not_timed_out(start_server, tiny_model_dir):
    """The capacity timeout counts time blocked on KV blocks, not time queued: a prompt
    that needs hundreds of chunked ticks on an idle server finishes (issue 14)."""
    server = start_server(tiny_model_dir, kv_cache_memory="520KiB", kv_quota=1.0,  # 64 blocks of 8 KiB
                          engine=EngineSettings(token_budget=4, wait_timeout=0.05))
    engine = server.runtime.engine
    wait(engine.open((0, 0)))
    out = wait(engine.step((0, 0), 0, torch.randn(900, HIDDEN)))  # 225 ticks, far past 0.05 s
    assert out.shape == (900, HIDDEN)


def test_a_failed_step_gives_back_the_blocks_it_grew(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir, kv_cache_memory="40KiB", kv_quota=1.0,  # 4 blocks of 16 tokens
                          engine=EngineSettings(token_budget=16, wait_timeout=0.3))
    engine = server.runtime.engine
    wait(engine.open((0, 0)))
    wait(engine.open((0, 1)))
    wait(engine.step((0, 0), 0, torch.randn(30, HIDDEN)))  # 2 blocks
    with pytest.raises(ProtocolError) as info:  # grows 2 blocks chunk by chunk, then is stuck
        wait(engine.step((0, 1), 0, torch.randn(60, HIDDEN)))
    assert info.value.code.value == "capacity"
    for _ in range(100):  # the gauge is published after the failure
        if metric(server, "fedsea_kv_blocks_used") == 2:
            break
        time.sleep(0.02)
    assert metric(server, "fedsea_kv_blocks_used") == 2
    out = wait(engine.step((0, 1), 0, torch.randn(20, HIDDEN)))  # rolled back to position 0, room again
    assert out.shape == (20, HIDDEN)


async def test_capacity_error_reaches_the_edge(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir, kv_cache_memory="40KiB", kv_quota=1.0, engine=EngineSettings(wait_timeout=0.3))
    client = AsyncEdgeClient(server.url, model=str(tiny_model_dir), noise=0.0)
    with pytest.raises(ServerError) as info:
        await client.generate([{"role": "user", "content": "word " * 80}], max_tokens=2)
    assert info.value.code == "capacity"
    await client.aclose()


def test_idle_sessions_are_freed(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir, engine=EngineSettings(idle_timeout=0.2))
    engine, allocator = server.runtime.engine, server.runtime.pool.allocator
    initial = allocator.num_free
    wait(engine.open((0, 0)))
    wait(engine.step((0, 0), 0, torch.randn(20, HIDDEN)))
    assert allocator.num_free < initial
    for _ in range(60):
        if allocator.num_free == initial:
            break
        time.sleep(0.05)
    assert allocator.num_free == initial
    with pytest.raises(ProtocolError) as info:
        wait(engine.step((0, 0), 20, torch.randn(1, HIDDEN)))
    assert info.value.code.value == "unknown_session"


def test_health_and_metrics_endpoints(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir)
    engine = server.runtime.engine
    wait(engine.open((0, 0)))
    wait(engine.step((0, 0), 0, torch.randn(20, HIDDEN)))
    base = f"http://127.0.0.1:{server.port}"
    with urllib.request.urlopen(base + "/health") as r:
        assert r.status == 200
    with urllib.request.urlopen(base + "/metrics") as r:
        text = r.read().decode()
    metrics = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert metrics["fedsea_sessions"] == 1
    assert metrics["fedsea_kv_blocks_used"] == 2  # 20 tokens in blocks of 16
    assert metrics["fedsea_tokens_total"] == 20
    assert metrics["fedsea_step_latency_seconds_count"] == 1
    assert "fedsea_queue_wait_seconds_bucket" in text and "fedsea_tokens_per_tick_bucket" in text

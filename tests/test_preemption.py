"""Preemption by recompute (issue 14, item 1): a full KV pool takes blocks from the newest
session, whose edge reopens it and replays; running sessions finish as if alone, and
`capacity` reaches only steps that could never fit."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

import pytest
import torch
from fake_server import FakeServer

from edge_runtime import AsyncEdgeClient, ServerError
from fedsea_shared.protocol import ProtocolError
from server_runtime.engine import EngineSettings
from conftest import eventually, metric

HIDDEN = 64
BLOCK = 8 * 2**10  # KV bytes of one 16-token block: the tiny model's 2 middle layers


def wait(fut: Future, timeout: float = 30):
    return fut.result(timeout=timeout)


def test_a_prompt_needing_most_of_the_pool_succeeds_on_an_idle_server(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir, kv_cache_memory=f"{65 * BLOCK}", kv_quota=1.0,  # 64 blocks
                          engine=EngineSettings(token_budget=32, wait_timeout=0.05))
    engine = server.runtime.engine
    wait(engine.open((0, 0)))
    out = wait(engine.step((0, 0), 0, torch.randn(1000, HIDDEN)))  # 63 of the 64 blocks, in 32 ticks
    assert out.shape == (1000, HIDDEN) and torch.isfinite(out).all()


def test_the_newest_session_is_preempted_for_an_older_one(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir, kv_cache_memory=f"{5 * BLOCK}", kv_quota=1.0)  # 4 blocks
    engine = server.runtime.engine
    wait(engine.open((0, 0)))
    wait(engine.open((0, 1)))
    old = wait(engine.step((0, 0), 0, torch.randn(32, HIDDEN)))  # 2 blocks, full
    wait(engine.step((0, 1), 0, torch.randn(32, HIDDEN)))  # the other 2
    # The older session grows: the newer one's blocks go to it ...
    assert wait(engine.step((0, 0), 32, old[:1])).shape == (1, HIDDEN)
    assert metric(server, "fedsea_preemptions_total") == 1
    # ... and the newer one's next step tells its edge to reopen, which finds what is still cached.
    with pytest.raises(ProtocolError) as info:
        wait(engine.step((0, 1), 32, torch.randn(1, HIDDEN)))
    assert info.value.code.value == "preempted"
    # A new session waits instead of taking blocks from the running one, and a step
    # larger than the whole pool is refused at once.
    wait(engine.open((0, 2)))
    with pytest.raises(ProtocolError) as info:
        wait(engine.step((0, 2), 0, torch.randn(65, HIDDEN)))
    assert info.value.code.value == "capacity" and "whole pool" in info.value.message
    waiting = engine.step((0, 2), 0, torch.randn(40, HIDDEN))  # 3 blocks: 1 is free
    assert wait(engine.step((0, 0), 33, old[:1])).shape == (1, HIDDEN)  # the running one is not preempted
    assert not waiting.done()
    wait(engine.close((0, 0)))
    assert wait(waiting).shape == (40, HIDDEN)  # capacity came back
    assert metric(server, "fedsea_preemptions_total") == 1


def test_a_preempted_session_keeps_its_place(start_server, tiny_model_dir):
    """First come, first served across a preemption: the reopened session starts before a
    newer one that would fit, and once running it is not the one that gives way to it."""
    server = start_server(tiny_model_dir, kv_cache_memory=f"{5 * BLOCK}", kv_quota=1.0)  # 4 blocks
    engine = server.runtime.engine
    wait(engine.open((0, 0)))
    wait(engine.open((0, 1)))
    old = wait(engine.step((0, 0), 0, torch.randn(32, HIDDEN)))
    wait(engine.step((0, 1), 0, torch.randn(32, HIDDEN)))
    wait(engine.step((0, 0), 32, old[:1]))  # takes (0, 1)'s blocks
    with pytest.raises(ProtocolError):
        wait(engine.step((0, 1), 32, torch.randn(1, HIDDEN)))
    with pytest.raises(ProtocolError) as info:  # only a preempted session may be reopened
        wait(engine.open((0, 0), reopen=True))
    assert info.value.code.value == "session_exists"
    assert wait(engine.open((0, 1), reopen=True)) == 0
    replay = engine.step((0, 1), 0, torch.randn(32, HIDDEN))  # 2 blocks; 1 is free
    wait(engine.open((0, 2)))
    newer = engine.step((0, 2), 0, torch.randn(16, HIDDEN))  # 1 block: would fit now
    wait(engine.step((0, 0), 33, old[:1]))  # a tick ran: neither started
    assert not replay.done() and not newer.done()
    wait(engine.close((0, 0)))
    wait(replay)
    wait(newer)
    # (0, 1) grows into the last free block; (0, 2), newer, then finds the pool full and
    # gives way itself instead of taking the older session's blocks.
    wait(engine.step((0, 1), 32, torch.randn(1, HIDDEN)))
    with pytest.raises(ProtocolError) as info:
        wait(engine.step((0, 2), 16, torch.randn(1, HIDDEN)))
    assert info.value.code.value == "preempted"
    assert wait(engine.step((0, 1), 33, torch.randn(15, HIDDEN))).shape == (15, HIDDEN)
    assert metric(server, "fedsea_preemptions_total") == 2


CHATS = [[{"role": "user", "content": "Tell me about the sea."}], [{"role": "user", "content": "hello there"}]]


async def test_a_preempted_generation_finishes_with_the_same_greedy_tokens(start_server, tiny_model_dir):
    """Two generations of ~95 tokens each on a pool of 128 tokens: the second is preempted
    (perhaps more than once), replays, and both give what they give alone."""
    roomy = start_server(tiny_model_dir, kv_quota=1.0)
    tight = start_server(tiny_model_dir, kv_cache_memory=f"{9 * BLOCK}", kv_quota=1.0)  # 8 blocks
    params = dict(max_tokens=60, temperature=0)
    alone = AsyncEdgeClient(roomy.url, model=str(tiny_model_dir), noise=0.0, edge_cache_memory=0)
    expected = [(await alone.generate(chat, **params)).token_ids for chat in CHATS]
    await alone.aclose()
    assert all(len(e) == 60 for e in expected)  # no early EOS: the pool really overflows

    client = AsyncEdgeClient(tight.url, model=str(tiny_model_dir), noise=0.0, edge_cache_memory=0)
    first = client.stream(CHATS[0], **params)
    got = [[(await anext(first)).token_id], []]  # the first one is running ...
    second = asyncio.create_task(client.generate(CHATS[1], **params))  # ... before the second starts
    async for event in first:
        got[0].append(event.token_id)
    got[1] = (await second).token_ids
    await client.aclose()
    assert got == expected
    assert metric(tight, "fedsea_preemptions_total") >= 1
    await eventually(lambda: metric(tight, "fedsea_kv_blocks_used") == 0, what="freeing the KV blocks")


async def test_a_server_that_preempts_forever_is_a_clear_error(tiny_model_dir):
    async with FakeServer() as fake:
        fake.mode = "preempted"
        client = AsyncEdgeClient(fake.url, model=str(tiny_model_dir), noise=0.0)
        try:
            with pytest.raises(ServerError) as info:  # a bound, not a timing check: it must not loop forever
                await asyncio.wait_for(client.generate(CHATS[1], max_tokens=3), 30)
            assert info.value.code == "preempted" and "giving up" in info.value.message
            fake.mode = "echo"
            assert (await client.generate(CHATS[1], max_tokens=3)).completion_tokens == 3  # the edge still serves
        finally:
            await client.aclose()


SYSTEM = {"role": "system", "content": "You are a helpful assistant who writes short stories about places, "
                                        "with care for detail and a calm voice."}
OVERCOMMITTED = [[SYSTEM, {"role": "user", "content": f"Story {i}: a walk by the {topic}."}]
                 for i, topic in enumerate(["sea", "river", "hills", "city", "forest", "lake", "road", "park"] * 3)]


async def test_an_overcommitted_pool_finishes_every_generation(start_server, tiny_model_dir):
    """24 generations at once on a pool that holds about two, all sharing the blocks of one
    system prompt (the edge names its cached prefix): sessions are preempted again and
    again, and still every one ends with the tokens it gives on a roomy server.  Before
    preempted sessions kept their place and only preemptions that free blocks were made,
    waiting sessions holding just the shared prefix were preempted for nothing at every
    full pool, and some gave up after 10 in a row."""
    roomy = start_server(tiny_model_dir, kv_quota=1.0)
    tight = start_server(tiny_model_dir, kv_cache_memory=f"{9 * BLOCK}", kv_quota=1.0)  # 8 blocks
    params = dict(max_tokens=50, temperature=0)
    runs = []
    for server in (roomy, tight):
        client = AsyncEdgeClient(server.url, model=str(tiny_model_dir), noise=0.0)
        try:
            await client.generate(OVERCOMMITTED[0], **params)  # the edge caches the shared prefix
            runs.append([g.token_ids for g in await asyncio.gather(*(client.generate(c, **params) for c in OVERCOMMITTED))])
        finally:
            await client.aclose()
    assert runs[1] == runs[0]
    assert metric(tight, "fedsea_preemptions_total") >= len(OVERCOMMITTED)
    await eventually(lambda: metric(tight, "fedsea_kv_blocks_used") == 0, what="freeing the KV blocks")

"""Replicas (issue 28, item 1): an edge given several servers spreads sessions over all of
them by load, keeps a conversation's turns on the server of its first turn (rendezvous
hashing on its first private block), survives a server dying mid-stream, and is not
fooled by a server's claims about its load; and quotas that queue (item 4): a tenant over
its KV quota waits instead of getting 429s, while the quota still protects other tenants."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson
import pytest
from fake_server import FakeServer

from edge_runtime import AsyncEdgeClient, EdgeClient
from edge_runtime.servers import Occupancy, ServerList, rendezvous
from fedsea_shared.protocol import Load
from gateway import GatewaySettings, GatewayThread
from test_failover import slow_down
from conftest import metric
from test_server_security import pool_of


NO_EOS = {t: -100.0 for t in (0, 1, 2)}  # the tiny model's special tokens: every chat runs to max_tokens


def chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Conversation {i}: what do you know about island number {i * 7}?"}]


def load(sessions: int, waiting: int = 0) -> Load:
    return Load(sessions=sessions, waiting=waiting, free_blocks=10, blocks=10)


def gateway_metric(gw, name: str) -> dict[str, float]:
    """A gateway metric's value by its label set (the text between the braces)."""
    values = {}
    for line in httpx.get(f"{gw.url.removesuffix('/v1')}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            values[labels] = float(value)
    return values


def test_the_policy_prefers_the_conversations_server_within_the_slack_and_distrusts_idle_claims():
    servers = ServerList(["a", "b", "c"])
    key = b"conversation"
    home, second, third = rendezvous(key, ["a", "b", "c"])
    occupancy = {"a": Occupancy(), "b": Occupancy(), "c": Occupancy()}
    assert servers.order(affinity=key, load=occupancy.get)[0] == home
    occupancy[home] = Occupancy(own=1)  # one session over the least loaded: within the slack
    assert servers.order(affinity=key, load=occupancy.get)[0] == home
    occupancy[home] = Occupancy(own=2)  # two over: the next in the conversation's ranking
    assert servers.order(affinity=key, load=occupancy.get)[0] == second
    occupancy[home] = Occupancy(own=0, reported=load(5))  # other edges' sessions count too
    assert servers.order(affinity=key, load=occupancy.get)[0] == second
    occupancy[home] = Occupancy(own=0, reported=load(0, waiting=3))  # full: the others first, however idle
    assert servers.order(affinity=key, load=occupancy.get)[-1] == home
    occupancy[home] = Occupancy(own=4, reported=load(0))  # claims idle: the edge's own count holds
    assert Occupancy(own=4, reported=load(0)).sessions == 4
    assert servers.order(affinity=key, load=occupancy.get)[0] != home
    servers.failed(second)
    occupancy[home] = Occupancy()
    assert servers.order(affinity=key, load=occupancy.get) == [home, third, second]  # banned: last


async def _hold_streams(client: AsyncEdgeClient, chats: list, tokens: int, held: asyncio.Event, release: asyncio.Event):
    """Stream every chat at once; each stops after its first token until `release`."""
    started = [0]

    async def one(messages):
        ids = []
        async for event in client.stream(messages, max_tokens=tokens, temperature=0):
            ids.append(event.token_id)
            if len(ids) == 1:
                started[0] += 1
                if started[0] == len(chats):
                    held.set()
                await release.wait()
        return ids

    return await asyncio.gather(*(one(m) for m in chats))


async def test_24_concurrent_chats_spread_evenly_over_3_servers(start_server, tiny_model_dir):
    servers = [start_server(tiny_model_dir) for _ in range(3)]
    client = AsyncEdgeClient([s.url for s in servers], model=str(tiny_model_dir), noise=0.0)
    held, release = asyncio.Event(), asyncio.Event()
    try:
        streams = asyncio.ensure_future(_hold_streams(client, [chat(i) for i in range(24)], 3, held, release))
        await asyncio.wait_for(held.wait(), 120)
        sessions = [await asyncio.to_thread(metric, s, "fedsea_sessions") for s in servers]
        release.set()
        assert all(len(ids) == 3 for ids in await streams)
    finally:
        await client.aclose()
    assert sum(sessions) == 24 and all(abs(n - 8) <= 2 for n in sessions), sessions


def test_a_conversations_turns_stay_on_the_server_of_its_first_turn(start_server, tiny_model_dir):
    servers = [start_server(tiny_model_dir) for _ in range(3)]
    gw = GatewayThread(GatewaySettings.of(server_url=[s.url for s in servers], model=str(tiny_model_dir), port=0))
    try:
        gw.wait_ready()
        messages = []
        for turn in range(8):
            messages.append({"role": "user", "content": f"Turn {turn} of our talk about the islands: go on."})
            body = {"model": gw.settings.edge.model_id, "messages": messages, "max_tokens": 8, "temperature": 0}
            r = httpx.post(f"{gw.url}/chat/completions", json=body, timeout=60)
            assert r.status_code == 200
            messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
            tokens = [metric(s, "fedsea_tokens_total") for s in servers]
            if turn == 0:
                home = next(s for s, t in zip(servers, tokens) if t)
                others = [s for s in servers if s is not home]
            assert all(metric(s, "fedsea_tokens_total") == 0 for s in others), f"turn {turn} left its server"
        # Turns 2..8 found their prefix in that server's cache.
        assert metric(home, "fedsea_prefix_cache_hit_tokens_total") > 7 * 16
        opens = gateway_metric(gw, "fedsea_gateway_server_opens")
        assert opens[f'affinity="home",server="{home.url}"'] == 8
        assert sum(opens.values()) == 8
        sessions = gateway_metric(gw, "fedsea_gateway_server_sessions")
        assert set(sessions) == {f'server="{s.url}"' for s in servers}
    finally:
        gw.stop()


def test_killing_a_server_mid_stream_loses_no_stream(start_server, tiny_model_dir):
    servers = [start_server(tiny_model_dir) for _ in range(3)]
    gw = GatewayThread(GatewaySettings.of(server_url=[s.url for s in servers], model=str(tiny_model_dir), port=0, noise=0.0))
    chats = [chat(i) for i in range(6)]
    try:
        gw.wait_ready()

        def body(messages, stream=False):
            return {"model": gw.settings.edge.model_id, "messages": messages, "max_tokens": 24, "temperature": 0,
                    "stream": stream}

        expected = [httpx.post(f"{gw.url}/chat/completions", json=body(m), timeout=60).json()["choices"][0]["message"]["content"]
                    for m in chats]
        for s in servers:
            slow_down(s, after_ticks=0, seconds=0.03)
        streaming = threading.Barrier(len(chats) + 1, timeout=60)

        def stream(messages) -> str:
            text, events = "", 0
            with httpx.stream("POST", f"{gw.url}/chat/completions", json=body(messages, True), timeout=60) as r:
                for line in r.iter_lines():
                    if not line or line == "data: [DONE]":
                        continue
                    text += orjson.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                    events += 1
                    if events == 3:
                        streaming.wait()
            return text

        with ThreadPoolExecutor(len(chats)) as pool:
            texts = pool.map(stream, chats)
            streaming.wait()  # every stream is under way: the busiest server dies
            busiest = max(servers, key=lambda s: metric(s, "fedsea_sessions"))
            assert metric(busiest, "fedsea_sessions") >= 1
            busiest.stop()
            texts = list(texts)
        assert texts == expected
    finally:
        gw.stop()


async def test_a_server_claiming_to_be_idle_draws_no_more_than_its_share(tiny_model_dir):
    async with FakeServer() as liar, FakeServer() as honest, FakeServer() as other:
        fakes = [liar, honest, other]
        for fake in fakes:
            fake.mode = "hold"
        liar.load = {"sessions": 0, "waiting": 0, "free_blocks": 100, "blocks": 100}
        for fake in (honest, other):
            fake.load = lambda f: {"sessions": f.open_sessions, "waiting": 0, "free_blocks": 100, "blocks": 100}
        client = AsyncEdgeClient([f.url for f in fakes], model=str(tiny_model_dir), noise=0.0)
        try:
            tasks = []
            for i in range(24):  # one after another: every report is fresh when the next one is placed
                tasks.append(asyncio.ensure_future(client.generate(chat(i), max_tokens=1, temperature=0)))
                for _ in range(600):  # open, its prompt's step held
                    if sum(f.open_sessions for f in fakes) == i + 1:
                        break
                    await asyncio.sleep(0.02)
            held = [f.open_sessions for f in fakes]
            for fake in fakes:
                fake.release.set()
            await asyncio.gather(*tasks)
        finally:
            await client.aclose()
    assert sum(held) == 24 and held[0] <= 8 + 2, held


@pytest.mark.parametrize("where", ["welcome", "opened"])
async def test_a_malformed_load_figure_is_a_logged_protocol_error(start_server, tiny_model_dir, caplog, where):
    real = start_server(tiny_model_dir)
    async with FakeServer() as broken:
        bad = {"sessions": -1, "waiting": "lots", "free_blocks": 7, "blocks": 3}
        broken.load = bad if where == "welcome" else lambda f: bad if f.open_sessions else None
        alone = AsyncEdgeClient(real.url, model=str(tiny_model_dir), noise=0.0)
        expected = [(await alone.generate(chat(i), max_tokens=4, temperature=0)).token_ids for i in range(6)]
        await alone.aclose()
        client = AsyncEdgeClient([broken.url, real.url], model=str(tiny_model_dir), noise=0.0)
        try:
            with caplog.at_level(logging.WARNING, logger="fedsea.edge"):
                got = await asyncio.gather(*(client.generate(chat(i), max_tokens=4, temperature=0) for i in range(6)))
            assert [c.token_ids for c in got] == expected  # all served by the real server in the end
            assert client.servers.banned(broken.url)
        finally:
            await client.aclose()
    assert any("load" in r.getMessage() for r in caplog.records)


def test_8_chats_over_the_default_kv_quota_queue_and_complete_while_another_tenant_runs(start_server, tiny_model_dir):
    """40 blocks, a tenant may hold 20 (the default --kv-quota 0.5): 8 chats of 6 blocks
    each (~47 prompt tokens and 40 generated) from one gateway (one tenant) wait for their turn instead of failing; another
    tenant (its own connection) runs alongside, and the gateway never holds past its quota."""
    server = start_server(tiny_model_dir, kv_cache_memory=pool_of(40))
    gw = GatewayThread(GatewaySettings.of(server_url=server.url, model=str(tiny_model_dir), port=0, noise=0.0,
                                       edge_cache_memory=0))
    other = EdgeClient(server.url, model=str(tiny_model_dir), noise=0.0, edge_cache_memory=0)
    chats = [chat(i) for i in range(8)]
    try:
        gw.wait_ready()

        def body(messages):
            return {"model": gw.settings.edge.model_id, "messages": messages, "max_tokens": 40, "temperature": 0,
                    "logit_bias": {str(t): -100 for t in NO_EOS}}

        def ask(messages):
            return httpx.post(f"{gw.url}/chat/completions", json=body(messages), timeout=120)

        used, running = [], threading.Event()
        running.set()

        def watch():
            while running.is_set():
                used.append(metric(server, "fedsea_kv_blocks_used"))

        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(len(chats) + 1) as pool:
            mine = pool.submit(lambda: other.generate(chat(99), max_tokens=40, temperature=0, logit_bias=NO_EOS).text)
            replies = list(pool.map(ask, chats))
            theirs = mine.result()
        running.clear()
        watcher.join()
        assert [r.status_code for r in replies] == [200] * 8, [r.text for r in replies if r.status_code != 200]
        texts = [r.json()["choices"][0]["message"]["content"] for r in replies]
        assert all(r.json()["usage"]["completion_tokens"] == 40 for r in replies)
        # Each one alone gives the same text: waiting and preemption changed nothing.
        assert texts == [ask(m).json()["choices"][0]["message"]["content"] for m in chats]
        assert theirs == other.generate(chat(99), max_tokens=40, temperature=0, logit_bias=NO_EOS).text
        assert metric(server, "fedsea_preemptions_total") > 0  # the gateway's chats did queue
        assert max(used) <= 20 + 6  # the gateway's quota, and the other tenant's chat
    finally:
        other.close()
        gw.stop()

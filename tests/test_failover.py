"""Failover between server runtimes of the same model and cut (issue 14, item 2): a
session whose server dies or misbehaves replays its stored states to another and goes on
with the same text; replays go in Steps under the server's message limit."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
from fake_server import FakeServer

from edge_runtime import AsyncEdgeClient
from edge_runtime.servers import ServerList
from gateway import GatewaySettings, GatewayThread
from conftest import metric
from fedsea_shared.protocol import Step, decode

USER = [{"role": "user", "content": "Tell me about the sea."}]


def test_server_list_orders_bans_and_backs_off():
    now = [0.0]
    servers = ServerList(["a", "b", "c"], ban_s=1.0, max_ban_s=4.0, forget_s=10.0, clock=lambda: now[0])
    assert servers.order() == ["a", "b", "c"]
    servers.failed("a")
    assert servers.order() == ["b", "c", "a"]  # banned: tried last, not never
    assert servers.order(avoid="b") == ["c", "a"]
    now[0] = 1.5
    assert servers.order() == ["a", "b", "c"]  # the 1 s ban is over
    servers.failed("a")
    servers.failed("b")
    now[0] = 2.0
    assert servers.order() == ["c", "b", "a"]  # a's second failure in a row: 2 s; b's first: 1 s, ends first
    now[0] = 20.0
    servers.failed("a")  # 10 s without failures: a starts from the short ban again
    now[0] = 21.5
    assert not servers.banned("a")


def serving(servers: list) -> list:
    """`servers` with the ones serving a stream now (holding sessions) first: the edge places
    a conversation by its affinity key, not by the order of the list."""
    return sorted(servers, key=lambda s: metric(s, "fedsea_sessions"), reverse=True)


def slow_down(server, after_ticks: int, seconds: float) -> None:
    """Make `server` take `seconds` per tick after its first `after_ticks` (the stream is
    still going when it is killed)."""
    executor = server.runtime.executor
    real, ticks = executor.execute, [0]

    def execute(plan):
        ticks[0] += 1
        if ticks[0] > after_ticks:
            time.sleep(seconds)
        return real(plan)

    executor.execute = execute


def test_a_gateway_stream_survives_its_server_dying(start_server, tiny_model_dir):
    servers = [start_server(tiny_model_dir), start_server(tiny_model_dir)]
    gw = GatewayThread(GatewaySettings.of(server_url=[s.url for s in servers], model=str(tiny_model_dir), port=0, noise=0.0))
    try:
        gw.wait_ready()
        body = {"model": gw.settings.edge.model_id, "messages": USER, "max_tokens": 30, "temperature": 0}
        expected = httpx.post(f"{gw.url}/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"]
        served = [metric(s, "fedsea_tokens_total") > 0 for s in servers]
        assert sum(served) == 1  # one server served the conversation: the next request goes there too
        first, second = servers if served[0] else servers[::-1]
        slow_down(first, after_ticks=3, seconds=0.05)
        text, events = "", []
        with httpx.stream("POST", f"{gw.url}/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                events.append(line)
                if line != "data: [DONE]":
                    text += orjson.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                if len(events) == 3:
                    first.stop()  # the server of the stream dies mid-stream
        assert events[-1] == "data: [DONE]"
        assert text == expected
        assert metric(second, "fedsea_tokens_total") > 0  # the rest came from the other server
        r = httpx.post(f"{gw.url}/chat/completions", json=body, timeout=60)  # and it serves new requests
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected
    finally:
        gw.stop()


async def test_a_replay_larger_than_the_message_limit_goes_in_chunks(start_server, record, tiny_model_dir):
    """Servers accepting Steps of 5 hidden states: the prompt, and the replay to the other
    server after the first one died, each go as several Steps, and the output is unchanged."""
    roomy = start_server(tiny_model_dir)
    limit = 4 + 256 + 5 * 64 * 4
    tight = [start_server(tiny_model_dir, max_message_bytes=limit) for _ in range(2)]
    relays = [record(t) for t in tight]
    frames = [r.frames for r in relays]
    alone = AsyncEdgeClient(roomy.url, model=str(tiny_model_dir), noise=0.0)
    expected = (await alone.generate(USER, max_tokens=12, temperature=0)).token_ids
    await alone.aclose()
    for server in tight:  # slowed down from the start, so the stream is still going when it dies
        slow_down(server, after_ticks=0, seconds=0.1)
    client = AsyncEdgeClient([r.url for r in relays], model=str(tiny_model_dir), noise=0.0, edge_cache_memory=0)
    got = []
    async for event in client.stream(USER, max_tokens=12, temperature=0):
        got.append(event.token_id)
        if len(got) == 1:
            dying = (await asyncio.to_thread(serving, tight))[0]
        if len(got) == 8:  # 43 states held: the other server, holding none, gets them all again
            await asyncio.to_thread(dying.stop)
    await client.aclose()
    assert got == expected
    frames = frames if dying is tight[0] else frames[::-1]
    sizes = [[len(f) for f in fs] for fs in frames]
    assert max(max(s) for s in sizes) <= limit
    steps_of_5 = [sum(n > 4 * 64 * 4 + 256 for n in s) for s in sizes]
    assert steps_of_5[0] >= 7 and steps_of_5[1] >= 8  # 7 of the 36-state prompt, 8 of the 43-state replay
    survivor = tight[1] if dying is tight[0] else tight[0]
    assert 'code="too_large"' not in (await asyncio.to_thread(_metrics_text, survivor))


def _metrics_text(server) -> str:
    return httpx.get(f"http://127.0.0.1:{server.port}/metrics").text


async def test_a_misbehaving_server_is_banned_and_the_others_serve(start_server, tiny_model_dir):
    real = start_server(tiny_model_dir)
    async with FakeServer() as hostile:
        hostile.mode = "wrong_shape"
        alone = AsyncEdgeClient(real.url, model=str(tiny_model_dir), noise=0.0)
        client = AsyncEdgeClient([hostile.url, real.url], model=str(tiny_model_dir), noise=0.0)
        try:
            # Conversations go where their affinity key (their first private block, here
            # their first words) sends them: each has even odds of meeting the hostile server
            # first (20 all missing it: one in a million).
            for i in range(20):
                chat = [{"role": "user", "content": f"{i} times, tell me about the sea."}]
                expected = (await alone.generate(chat, max_tokens=6, temperature=0)).token_ids
                assert (await client.generate(chat, max_tokens=6, temperature=0)).token_ids == expected
                if client.servers.banned(hostile.url):
                    break
            assert client.servers.banned(hostile.url)
            assert (await client.connection()).url == real.url  # new sessions go to the good one
        finally:
            await client.aclose()
            await alone.aclose()


async def test_a_replay_after_failover_sends_the_very_bytes_of_the_first_sending(start_server, record, tiny_model_dir):
    """With noise on: the states replayed to the second server after the first died are
    byte for byte those the first received (fresh noise on a replay would hand the
    servers two versions to average)."""
    servers = [start_server(tiny_model_dir) for _ in range(2)]
    relays = [record(s) for s in servers]
    frames = [r.frames for r in relays]
    for server in servers:  # slowed down from the start, so the stream is still going when it dies
        slow_down(server, after_ticks=0, seconds=0.1)
    client = AsyncEdgeClient([r.url for r in relays], model=str(tiny_model_dir), noise=0.5, edge_cache_memory=0)
    got = 0
    async for _ in client.stream(USER, max_tokens=12, temperature=0):
        got += 1
        if got == 1:
            dying = (await asyncio.to_thread(serving, servers))[0]
        if got == 6:
            await asyncio.to_thread(dying.stop)
    await client.aclose()
    assert got == 12
    frames = frames if dying is servers[0] else frames[::-1]

    def rows(fs):
        out = {}
        for m, t in (decode(f) for f in fs):
            if isinstance(m, Step):
                for (_, pos, n), part in zip(m.rows, m.split(t)):
                    for i in range(n):
                        out[pos + i] = part[i].numpy().tobytes()
        return out

    first, second = rows(frames[0]), rows(frames[1])
    shared = sorted(set(first) & set(second))
    assert len(shared) >= 20  # the prompt and the first tokens' states went again
    assert all(first[p] == second[p] for p in shared)

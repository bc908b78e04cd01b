"""`fedsea serve`'s in-process link between edge and server runtime: the same frames and
answers as over a websocket, the server's metrics in the gateway's, and the websocket's
failure behaviour (closed ends, oversized frames) where the edge relies on it."""

from __future__ import annotations

import asyncio
import itertools
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from edge_runtime.client import AsyncEdgeClient
from edge_runtime.connection import BadReply
from fedsea_shared import transport
from gateway import GatewaySettings, GatewayThread
from server_runtime.app import ServerRuntime, ServerSettings

USER = [{"role": "user", "content": "Tell me a story about a lighthouse keeper named Ada."}]
_names = itertools.count()


def _gauge(gw: GatewayThread, name: str) -> float:
    for family in text_string_to_metric_families(httpx.get(gw.url.removesuffix("/v1") + "/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture
def in_process(tiny_model_dir):
    """A gateway whose server runtime runs in this process behind the in-process link."""
    runtime = ServerRuntime(ServerSettings(model=str(tiny_model_dir), port=0))
    url = runtime.listen_in_process(f"test-{next(_names)}")
    gw = GatewayThread(GatewaySettings.of(server_url=url, model=str(tiny_model_dir), port=0,
                                       server_metrics=runtime.metrics.render)).wait_ready()
    yield gw
    gw.stop()
    runtime.close()


def test_answers_equal_the_websocket_path(in_process, start_server, tiny_model_dir):
    """Greedy text and top logprobs over the link equal those over a websocket, also for
    concurrent streams (their steps share frames and ticks)."""
    ws = GatewayThread(GatewaySettings.of(server_url=start_server(tiny_model_dir).url, model=str(tiny_model_dir),
                                       port=0)).wait_ready()
    try:
        def answers(gw):
            client = openai.OpenAI(base_url=gw.url, api_key="unused", max_retries=0)

            async def many():
                aclient = openai.AsyncOpenAI(base_url=gw.url, api_key="unused", max_retries=0)
                rs = await asyncio.gather(*[aclient.chat.completions.create(
                    model=tiny_model_dir.name, messages=[{"role": "user", "content": f"Count to {i}."}],
                    max_tokens=12, temperature=0, seed=1) for i in range(4)])
                return [r.choices[0].message.content for r in rs]

            one = client.chat.completions.create(model=tiny_model_dir.name, messages=USER, max_tokens=16, temperature=0,
                                                 logprobs=True, top_logprobs=3)
            top = [[(t.token, round(t.logprob, 3)) for t in c.top_logprobs] for c in one.choices[0].logprobs.content]
            return one.choices[0].message.content, top, asyncio.run(many())

        assert answers(in_process) == answers(ws)
    finally:
        ws.stop()


def test_server_metrics_are_in_the_gateways_and_sessions_are_freed(in_process, tiny_model_dir):
    client = openai.OpenAI(base_url=in_process.url, api_key="unused", max_retries=0)
    before = _gauge(in_process, "fedsea_tokens_total")
    r = client.chat.completions.create(model=tiny_model_dir.name, messages=USER, max_tokens=5, n=2)
    assert r.usage.completion_tokens == 10
    assert _gauge(in_process, "fedsea_tokens_total") > before + 10  # prompt rows and decode steps
    deadline = time.monotonic() + 20
    while _gauge(in_process, "fedsea_sessions") != 0:
        assert time.monotonic() < deadline, "the server runtime kept the request's sessions"
        time.sleep(0.02)
    assert _gauge(in_process, "fedsea_connections") == 1


def test_no_server_under_that_name_is_a_clear_wait(tiny_model_dir):
    gw = GatewayThread(GatewaySettings.of(server_url="inproc://nobody", model=str(tiny_model_dir), port=0))
    try:
        deadline = time.monotonic() + 60
        while "no in-process server runtime at inproc://nobody" not in gw.backend.problem:
            assert time.monotonic() < deadline, gw.backend.problem
            time.sleep(0.05)
        r = httpx.get(gw.url.removesuffix("/v1") + "/health")
        assert r.status_code == 503 and "inproc://nobody" in r.json()["detail"]
    finally:
        gw.stop()


async def test_link_ends_behave_like_websockets():
    accepted: list[transport.LinkEnd] = []
    url = transport.listen("link-test", accepted.append)
    try:
        edge = transport.connect(url, {"Authorization": "Bearer k"}, max_size=8)
        server = accepted[0]
        assert server.request.headers["Authorization"] == "Bearer k"
        await edge.send(b"hello")
        assert await server.recv() == b"hello"
        await server.send(b"a frame over eight bytes")  # too big for the edge: closed with 1009
        with pytest.raises(ConnectionClosed) as e:
            await edge.recv()
        assert e.value.sent.code == 1009
        with pytest.raises(ConnectionClosed):
            await server.send(b"x")
        with pytest.raises(ConnectionClosed):  # the server's loop ends, as on an abnormal closure
            async for _ in server:
                pass

        edge = transport.connect(url)
        server = accepted[1]
        await edge.close()
        await server.wait_closed()
        with pytest.raises(ConnectionClosedOK):
            await server.recv()
    finally:
        transport.unlisten("link-test")
    with pytest.raises(ConnectionRefusedError):
        transport.connect(url)


async def test_an_oversized_reply_fails_the_request_as_over_a_websocket(tiny_model_dir, monkeypatch):
    """The edge bounds what it reads by the largest reply it can ask for; the link keeps
    that bound, so a server answering more is a BadReply, not a stall or a crash."""
    runtime = ServerRuntime(ServerSettings(model=str(tiny_model_dir), port=0))
    url = runtime.listen_in_process(f"test-{next(_names)}")
    real_send = transport.LinkEnd.send

    async def padded(end, data):  # the server's replies grow past any bound
        if end.max_size is None and isinstance(data, bytes) and len(data) > 1000:
            data += bytes(10**6)
        await real_send(end, data)

    monkeypatch.setattr(transport.LinkEnd, "send", padded)
    client = await asyncio.to_thread(AsyncEdgeClient, url, model=str(tiny_model_dir), noise=0.0)
    try:
        with pytest.raises(BadReply, match="larger than"):
            await client.generate(USER, max_tokens=2)
    finally:
        await client.aclose()
        runtime.close()

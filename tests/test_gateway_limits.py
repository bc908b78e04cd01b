"""Gateway hardening (issue 10, failure 8): a huge message does not freeze other requests,
heavy `n` requests do not starve everyone else, extreme but legal sampling values never
give a 500, and the status pages and keys can be kept private."""

from __future__ import annotations

import asyncio
import httpx
import orjson
import pytest
from conftest import make_tiny_model
from fake_server import FakeServer

from fedsea.cli import main as fedsea_main
from gateway import GatewaySettings, GatewayThread
from server_runtime.app import ServerSettings, ServerThread

USER = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    server = ServerThread(ServerSettings(model=str(tiny_model_dir), port=0))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(server, tiny_model_dir):
    gateway = GatewayThread(GatewaySettings.of(server_url=server.url, model=str(tiny_model_dir), port=0))
    yield gateway.wait_ready()
    gateway.stop()


def chat_body(gw: GatewayThread, **kw) -> dict:
    return {"model": gw.settings.edge.model_id, "messages": USER, "max_tokens": 3, **kw}


LEGAL_EXTREMES = [
    {"temperature": 1e-40},
    {"temperature": 5e-324},  # the smallest positive double
    {"temperature": 2, "top_p": 1e-300},
    {"repetition_penalty": 1e-300},
    {"repetition_penalty": 1e-300, "temperature": 0},
    {"repetition_penalty": 2, "presence_penalty": 2, "frequency_penalty": -2, "temperature": 1e-40, "top_p": 1e-300},
    {"temperature": 2, "top_k": 1, "logprobs": True, "top_logprobs": 20, "repetition_penalty": 1e-300},
]
ILLEGAL_EXTREMES = [
    {"temperature": 1e308}, {"top_p": -1e-300}, {"repetition_penalty": 1e308}, {"presence_penalty": -1e308},
    {"frequency_penalty": 1e308}, {"top_k": -(2**70)}, {"max_tokens": 2**70}, {"temperature": -0.0 - 1e-300},
]


def test_extreme_sampling_values_answer_or_400_never_500(gw):
    with httpx.Client(base_url=gw.url, timeout=60) as http:
        for extreme in LEGAL_EXTREMES:
            r = http.post("/chat/completions", json=chat_body(gw, **extreme))
            assert r.status_code == 200, (extreme, r.text)
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["message"]["content"], str)
            for token in (choice["logprobs"] or {}).get("content", []):  # valid JSON numbers, no NaN
                assert all(isinstance(t["logprob"], float) for t in [token, *token["top_logprobs"]]), extreme
        for extreme in ILLEGAL_EXTREMES:
            r = http.post("/chat/completions", json=chat_body(gw, **extreme))
            assert r.status_code == 400, (extreme, r.text)


@pytest.fixture(scope="module")
def long_context_gw(tmp_path_factory, default_model_dir):
    """A tiny model with a 64k-token context: a 2 MiB message is worth tokenizing.  Pseudonyms
    off: the pseudonymizer refuses that much text up front (tests/test_pseudonyms.py)."""
    model = make_tiny_model(tmp_path_factory.mktemp("tiny-64k"), default_model_dir, max_position_embeddings=65536)
    server = ServerThread(ServerSettings(model=str(model), port=0))
    gateway = GatewayThread(GatewaySettings.of(server_url=server.url, model=str(model), port=0, pseudonymize=False))
    yield gateway.wait_ready()
    gateway.stop()
    server.stop()


def test_text_that_cannot_fit_is_refused_untokenized(gw):
    for body, path in [
        (chat_body(gw, messages=[{"role": "user", "content": "x" * 15 * 2**20}]), "/chat/completions"),
        ({"model": gw.settings.edge.model_id, "prompt": ["hi", "y" * 2**20]}, "/completions"),
    ]:
        r = httpx.post(gw.url + path, json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert "characters cannot fit" in r.json()["error"]["message"]


async def test_a_small_request_completes_while_a_huge_one_is_tokenized(long_context_gw):
    """A 2 MiB message takes seconds to template and tokenize; meanwhile other requests
    are served (they used to wait for it: the tokenizer ran on the event loop)."""
    gw = long_context_gw
    huge = orjson.dumps(chat_body(gw, messages=[{"role": "user", "content": "lighthouse keeper " * 116_000}]))
    uploaded = asyncio.Event()

    async def body():
        for start in range(0, len(huge), 2**16):
            yield huge[start : start + 2**16]
        uploaded.set()  # the last chunk is written: the gateway has the whole request

    async with httpx.AsyncClient(base_url=gw.url, timeout=120) as http:
        huge_reply = asyncio.create_task(http.post("/chat/completions", content=body(), headers={"content-type": "application/json"}))
        await uploaded.wait()
        for _ in range(3):  # one after another, all while the huge one is still being tokenized
            small = await http.post("/chat/completions", json=chat_body(gw, max_tokens=1))
            assert small.status_code == 200
        assert not huge_reply.done()
        r = await huge_reply
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


async def test_heavy_requests_get_the_429_not_everyone_else(tiny_model_dir):
    """Scaled down from two n=128 requests on 256 sessions: a server connection of 8
    sessions.  One request may hold 4; a second 4-choice request would leave less than a
    quarter free, so it is refused, while single-choice requests still get in."""
    async with FakeServer(max_sessions=8) as fake:
        gw = GatewayThread(GatewaySettings.of(server_url=fake.url, model=str(tiny_model_dir), port=0))
        try:
            await asyncio.to_thread(gw.wait_ready)
            async with httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
                fake.mode = "hold"
                heavy = asyncio.create_task(http.post("/chat/completions", json=chat_body(gw, n=4)))
                for _ in range(3000):  # bounded wait until its prefill (its 4 choices fork it) is held on the server
                    if fake.held == 1:
                        break
                    await asyncio.sleep(0.01)
                assert fake.held == 1
                fake.mode = "echo"
                second = await http.post("/chat/completions", json=chat_body(gw, n=4))
                assert second.status_code == 429 and second.json()["error"]["code"] == "limit", second.text
                too_many = await http.post("/chat/completions", json=chat_body(gw, n=5))
                assert too_many.status_code == 429 and "at most 4 choices" in too_many.json()["error"]["message"]
                for _ in range(2):
                    light = await http.post("/chat/completions", json=chat_body(gw))
                    assert light.status_code == 200, light.text
                fake.release.set()
                done = await heavy
                assert done.status_code == 200 and len(done.json()["choices"]) == 4
                again = await http.post("/chat/completions", json=chat_body(gw, n=4))  # its share is back
                assert again.status_code == 200
        finally:
            await asyncio.to_thread(gw.stop)


def test_status_pages_can_require_the_key(server, gw, tiny_model_dir):
    base = gw.url.removesuffix("/v1")
    for page in ("/health", "/metrics", "/openapi.json"):  # open by default, for probes
        assert httpx.get(base + page).status_code == 200, page
    private = GatewayThread(GatewaySettings.of(server_url=server.url, model=str(tiny_model_dir), port=0,
                                            api_key="k3y", protect_status=True)).wait_ready()
    try:
        base = private.url.removesuffix("/v1")
        for page in ("/health", "/metrics", "/openapi.json"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k3y"}):
                r = httpx.get(base + page, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (page, headers)
            assert httpx.get(base + page, headers={"Authorization": "Bearer k3y"}).status_code == 200, page
        for page in ("/docs", "/redoc"):
            assert httpx.get(base + page, headers={"Authorization": "Bearer k3y"}).status_code == 404
    finally:
        private.stop()


def test_bad_key_options_are_refused(tiny_model_dir, tmp_path, monkeypatch):
    """(Keys read from files and the environment: tests/test_gateway.py::test_fedsea_gateway_command.)"""
    monkeypatch.delenv("FEDSEA_API_KEY", raising=False)
    (tmp_path / "key").write_text("k\n")
    (tmp_path / "empty").write_text("\n")
    for argv, says in [
        (["--api-key", "a", "--api-key-file", str(tmp_path / "key")], "not both"),
        (["--api-key-file", str(tmp_path / "missing")], "missing"),
        (["--api-key-file", str(tmp_path / "empty")], "is empty"),
        (["--protect-status"], "needs an API key"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            fedsea_main(["gateway", "--model", str(tiny_model_dir), "--server", "ws://127.0.0.1:9", *argv])
        assert says in str(exit_.value.code), argv

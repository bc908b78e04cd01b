"""The OpenAI-compatible gateway, driven by the official `openai` client and by raw HTTP,
against a real server runtime over a real websocket (tiny random model)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import GatewaySettings, GatewayThread, create_app
from server_runtime.app import ServerSettings, ServerThread
from server_runtime.engine import EngineSettings
from server_runtime.process import free_port
from conftest import metric

USER = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


@pytest.fixture
def start_gateway(tiny_model_dir):
    """Factory: start_gateway(server_url, **GatewaySettings) -> a ready GatewayThread."""
    gateways: list[GatewayThread] = []

    def start(server_url: str, wait: bool = True, **kw) -> GatewayThread:
        kw.setdefault("model", str(tiny_model_dir))
        gw = GatewayThread(GatewaySettings.of(server_url=server_url, port=0, **kw))
        gateways.append(gw)
        return gw.wait_ready() if wait else gw

    yield start
    for gw in gateways:
        gw.stop()


def oai(gw: GatewayThread, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url, api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def chat(gw: GatewayThread, **kw):
    kw.setdefault("messages", USER)
    return oai(gw).chat.completions.create(model=gw.settings.edge.model_id, **kw)


def wait_until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# ---- the openai client --------------------------------------------------------------------


def test_models_lists_the_served_model(gw):
    assert [m.id for m in oai(gw).models.list()] == [gw.settings.edge.model_id]


def test_chat_non_stream_counts_real_tokens(gw):
    r = chat(gw, max_tokens=6, seed=1, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    tokenizer = gw.backend.client.tokenizer
    prompt = tokenizer.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert r.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False).input_ids)
    # the random model almost never samples EOS: six tokens, cut by length
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    content = choice.logprobs.content
    # the 3 most likely tokens (the sampled one's logprob is the entry's own)
    assert len(content) == 6 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob for t in content)
    assert "".join(t.token for t in content) == choice.message.content


def test_stream_matches_non_stream_and_include_usage(gw):
    args = dict(max_tokens=8, seed=7, temperature=0.8)
    full = chat(gw, **args)
    chunks = list(chat(gw, stream=True, stream_options={"include_usage": True}, **args))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 8
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in body)
    assert body[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in body) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == ["length"]
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_raw_stream_format(gw):
    """SSE framing, `usage: null` only with include_usage, and [DONE] last."""
    body = {"model": gw.settings.edge.model_id, "messages": USER, "max_tokens": 3, "stream": True}
    for include in (False, True):
        if include:
            body["stream_options"] = {"include_usage": True}
        r = httpx.post(f"{gw.url}/chat/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.text.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
        chunks = [orjson.loads(e[6:]) for e in events[:-1]]
        assert all(("usage" in c) == include for c in chunks)
        if include:
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_stop_string_across_tokens(gw):
    args = dict(max_tokens=12, seed=3, temperature=1.0)
    text = chat(gw, **args).choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # likely spans a token boundary
    expected = text[: text.find(stop)]
    r = chat(gw, stop=[stop, "never-seen-stop"], **args)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    streamed = list(chat(gw, stop=stop, stream=True, **args))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_n2_choices_differ_and_seed_reproduces(gw):
    args = dict(max_tokens=8, seed=11, n=2)
    a, b = chat(gw, **args), chat(gw, **args)
    texts = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
    assert [c.index for c in a.choices] == [0, 1] and texts[0] != texts[1]
    assert texts == [c.message.content for c in sorted(b.choices, key=lambda c: c.index)]
    assert a.usage.completion_tokens == 16
    # choice i uses seed + i: choice 1 of seed 11 is choice 0 of seed 12
    assert chat(gw, max_tokens=8, seed=12).choices[0].message.content == texts[1]
    streamed = list(chat(gw, stream=True, **args))
    for i in range(2):
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == i) == texts[i]


def test_greedy_is_deterministic_without_a_seed(start_server, start_gateway, tiny_model_dir):
    """temperature=0: the noise is keyed to the tokens, not drawn per request, so greedy
    answers repeat (large noise makes fresh noise change them), streaming included."""
    gw = start_gateway(start_server(tiny_model_dir).url, noise=2.0)
    args = dict(max_tokens=12, temperature=0)
    texts = {chat(gw, **args).choices[0].message.content for _ in range(3)}
    assert len(texts) == 1
    streamed = list(chat(gw, stream=True, **args))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == texts.pop()


def test_completions_endpoint(gw):
    client = oai(gw)
    model = gw.settings.edge.model_id
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, seed=2, logprobs=2)
    c = r.choices[0]
    assert r.object == "text_completion" and c.finish_reason == "length" and r.usage.completion_tokens == 5
    assert len(c.logprobs.tokens) == 5 and c.logprobs.text_offset[0] == 0
    assert "".join(c.logprobs.tokens) == c.text
    # token-id prompts and batches: choice index = prompt index * n + j
    ids = gw.backend.client.tokenizer("Once upon a time").input_ids
    batch = client.completions.create(model=model, prompt=[ids, ids[:2]], max_tokens=5, seed=2, n=2)
    assert sorted(x.index for x in batch.choices) == [0, 1, 2, 3]
    assert next(x for x in batch.choices if x.index == 0).text == c.text  # same prompt, same seed
    assert batch.usage.prompt_tokens == len(ids) + 2 and batch.usage.completion_tokens == 20
    streamed = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, seed=2, stream=True))
    assert "".join(s.choices[0].text for s in streamed) == c.text


async def test_concurrent_streams_match_sequential(gw):
    """Many streams in flight share the edge's connection and batches, and each gets the
    same tokens it gets alone."""
    client = openai.AsyncOpenAI(base_url=gw.url, api_key="unused", max_retries=0)
    model = gw.settings.edge.model_id

    async def run(seed: int) -> str:
        stream = await client.chat.completions.create(model=model, messages=USER, max_tokens=10, seed=seed, temperature=0.7, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    alone = [await run(s) for s in range(6)]
    together = await asyncio.gather(*(run(s) for s in range(6)))
    assert together == alone
    await client.close()


def test_client_disconnect_cancels_and_closes_session(start_server, start_gateway, tiny_model_dir):
    server = start_server(tiny_model_dir)
    gw = start_gateway(server.url)
    body = {"model": gw.settings.edge.model_id, "messages": USER, "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", f"{gw.url}/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert metric(server.url, "fedsea_sessions") == 1
    wait_until(lambda: metric(server.url, "fedsea_sessions") == 0 and metric(gw.url, "fedsea_gateway_generations_running") == 0)
    # the shared connection survived and still serves
    assert chat(gw, max_tokens=2).choices[0].finish_reason == "length"


def test_non_streaming_client_disconnect_cancels_too(start_server, start_gateway, tiny_model_dir):
    server = start_server(tiny_model_dir)
    gw = start_gateway(server.url)
    body = {"model": gw.settings.edge.model_id, "messages": USER, "max_tokens": 1500}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gw.url}/chat/completions", json=body, timeout=1.0)  # gives up long before 1500 tokens
    wait_until(lambda: metric(server.url, "fedsea_sessions") == 0 and metric(gw.url, "fedsea_gateway_generations_running") == 0)
    assert metric(gw.url, "fedsea_gateway_generation_tokens_total") < 1500  # stopped, not run to the end
    assert chat(gw, max_tokens=2).choices[0].finish_reason == "length"


def test_api_key(start_server, start_gateway, tiny_model_dir):
    gw = start_gateway(start_server(tiny_model_dir).url, api_key="s3cret")
    assert oai(gw, api_key="s3cret").chat.completions.create(model=gw.settings.edge.model_id, messages=USER, max_tokens=1).choices
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = httpx.get(f"{gw.url}/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(gw.url.removesuffix("/v1") + "/health").status_code == 200  # probes need no key


# ---- readiness and the server runtime's availability ---------------------------------------


async def test_503_while_the_edge_loads(tiny_model_dir):
    """Before the lifespan has loaded the edge (here: never started), health and the API
    answer 503."""
    app = create_app(GatewaySettings.of(model=str(tiny_model_dir)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        r = await client.get("/health")
        assert r.status_code == 503 and "loading" in r.json()["detail"]
        body = {"model": app.state.model_id, "messages": USER}
        assert_error(await client.post("/v1/chat/completions", json=body), 503, code="loading")


def test_gateway_waits_for_its_server(start_gateway, tiny_model_dir):
    port = free_port()
    gw = start_gateway(f"ws://127.0.0.1:{port}", wait=False)
    health = gw.url.removesuffix("/v1") + "/health"
    wait_until(lambda: gw.backend.problem.startswith("waiting for the server runtime"))
    r = httpx.get(health)
    assert r.status_code == 503 and "waiting" in r.json()["detail"]
    server = ServerThread(ServerSettings(model=str(tiny_model_dir), port=port))
    try:
        gw.wait_ready()
        assert httpx.get(health).status_code == 200
        assert chat(gw, max_tokens=2).usage.completion_tokens == 2
    finally:
        server.stop()


def test_server_api_key(start_server, start_gateway, tiny_model_dir):
    """A server that requires keys: the gateway presents --server-api-key; without it the
    gateway keeps retrying, says why on /health, and requests get a 502."""
    server = start_server(tiny_model_dir, api_keys=("edge-key",))
    assert chat(start_gateway(server.url, server_api_key="edge-key"), max_tokens=2).usage.completion_tokens == 2
    gw = start_gateway(server.url, wait=False)
    wait_until(lambda: "API key" in gw.backend.problem)
    assert httpx.get(gw.url.removesuffix("/v1") + "/health").status_code == 503
    e = assert_error(post(gw, {"model": gw.settings.edge.model_id, "messages": USER, "max_tokens": 2}), 502, code="unauthorized")
    assert "API key" in e["message"]


def test_server_gone_is_502_then_health_503(start_server, start_gateway, tiny_model_dir):
    server = start_server(tiny_model_dir)
    gw = start_gateway(server.url)
    server.stop()
    r = httpx.post(f"{gw.url}/chat/completions", json={"model": gw.settings.edge.model_id, "messages": USER, "max_tokens": 2})
    assert r.status_code == 502 and r.json()["error"]["code"] == "server_unreachable"
    wait_until(lambda: httpx.get(gw.url.removesuffix("/v1") + "/health").status_code == 503)


# ---- errors over raw HTTP -----------------------------------------------------------------


def post(gw: GatewayThread, body: dict, path: str = "/chat/completions", raw: bytes | None = None) -> httpx.Response:
    kwargs = {"content": raw, "headers": {"Content-Type": "application/json"}} if raw is not None else {"json": body}
    return httpx.post(gw.url + path, timeout=30, **kwargs)


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


BAD_CHAT = [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, None),  # needs logprobs: true
    ({"messages": [{"role": "robot?", "content": "hi"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream_options": {"include_usage": True}}, None),  # without stream
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "u", "schema": {"type": "array", "uniqueItems": True}}}}, "response_format"),
    ({"logit_bias": {"42": 101}}, None),
    ({"logit_bias": {"forty-two": 1}}, None),
    ({"logit_bias": {"49152": 1}}, "logit_bias"),  # outside the vocabulary
    ({"tool_choice": "required"}, None),  # without tools
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}, None),
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, None),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, None),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]}, "tools"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0"),  # no tool_call_id
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}, None),
    ({"seed": 2**64}, "seed"),
]


@pytest.mark.parametrize("patch, param", BAD_CHAT, ids=[str(p) for p, _ in BAD_CHAT])
def test_invalid_chat_requests_are_400(gw, patch, param):
    body = {"model": gw.settings.edge.model_id, "messages": USER, **patch}
    assert_error(post(gw, body), 400, param)


def test_request_shape_errors(gw):
    model = gw.settings.edge.model_id
    assert_error(post(gw, {}, raw=b"{not json"), 400)
    assert_error(post(gw, {"messages": USER}), 400, "model")
    assert_error(post(gw, {"model": "gpt-4o", "messages": USER}), 404, "model", "model_not_found")
    assert_error(httpx.get(gw.url + "/nope"), 404)
    huge = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * (16 * 2**20) + b'"}]}'
    assert post(gw, {}, raw=huge).status_code == 413
    # unknown fields are ignored; OpenAI's content parts and the developer role are read
    r = post(gw, {"model": model, "max_tokens": 2, "no_such_field": {"x": 1}, "user": "u1",
                  "messages": [{"role": "developer", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert post(gw, {"model": model, "messages": USER, "max_tokens": 2, "response_format": {"type": "text"}}).status_code == 200


def test_completion_errors(gw):
    model = gw.settings.edge.model_id
    assert_error(post(gw, {"model": model, "prompt": "hi", "logit_bias": {"1": -101}}, "/completions"), 400)
    assert_error(post(gw, {"model": model, "prompt": "hi", "logprobs": 6}, "/completions"), 400, "logprobs")
    assert_error(post(gw, {"model": model, "prompt": [10**6]}, "/completions"), 400, "prompt")
    assert_error(post(gw, {"model": model, "prompt": ""}, "/completions"), 400, "prompt")
    assert_error(post(gw, {"model": model, "prompt": []}, "/completions"), 400, "prompt")
    assert_error(post(gw, {"model": model, "prompt": ["a"] * 65, "n": 2}, "/completions"), 400, "prompt")


def test_too_long_for_the_context(gw):
    model = gw.settings.edge.model_id
    limit = 2048  # the tiny model's max_position_embeddings (the server allows 8192)
    e = assert_error(post(gw, {"model": model, "prompt": [42] * (limit + 5)}, "/completions"), 400, code="context_length_exceeded")
    assert str(limit) in e["message"]
    assert_error(post(gw, {"model": model, "prompt": [42] * 100, "max_tokens": limit}, "/completions"), 400, code="context_length_exceeded")
    assert_error(post(gw, {"model": model, "messages": USER, "max_tokens": limit}), 400, code="context_length_exceeded")
    assert post(gw, {"model": model, "prompt": [42] * 100, "max_tokens": 2}, "/completions").status_code == 200


def test_server_at_capacity(start_server, start_gateway, tiny_model_dir):
    """A KV pool of two 16-token blocks (plus the scratch block): a longer prompt is
    refused with 503 before any token; a generation that outgrows the pool mid-stream
    gets an error event."""
    server = start_server(tiny_model_dir, kv_cache_memory="24KiB", kv_quota=1.0, engine=EngineSettings(wait_timeout=0.3))
    assert server.runtime.pool.allocator.num_blocks == 2
    gw = start_gateway(server.url)
    model = gw.settings.edge.model_id
    for stream in (False, True):
        r = post(gw, {"model": model, "prompt": [42] * 40, "max_tokens": 2, "stream": stream}, "/completions")
        assert_error(r, 503, code="capacity")
    stream = oai(gw).completions.create(model=model, prompt=[42] * 20, max_tokens=30, stream=True)
    with pytest.raises(openai.APIError, match="capacity"):
        for _ in stream:
            pass
    wait_until(lambda: metric(server.url, "fedsea_sessions") == 0)
    assert post(gw, {"model": model, "prompt": [42] * 20, "max_tokens": 4}, "/completions").status_code == 200


def test_too_many_sessions_is_429(start_server, start_gateway, tiny_model_dir):
    server = start_server(tiny_model_dir, max_sessions_per_connection=1)
    gw = start_gateway(server.url)
    assert_error(post(gw, {"model": gw.settings.edge.model_id, "messages": USER, "max_tokens": 4, "n": 2}), 429, code="limit")
    wait_until(lambda: metric(server.url, "fedsea_sessions") == 0)  # choice 0 was cancelled; its close is async
    assert post(gw, {"model": gw.settings.edge.model_id, "messages": USER, "max_tokens": 4}).status_code == 200


def test_metrics(gw):
    def scrape() -> dict:
        text = httpx.get(gw.url.removesuffix("/v1") + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}

    ok = ("fedsea_gateway_requests_total", (("path", "/v1/chat/completions"), ("status", "200")))
    tokens = ("fedsea_gateway_generation_tokens_total", ())
    before = scrape()
    chat(gw, max_tokens=3)
    after = scrape()
    assert after[ok] == before.get(ok, 0) + 1 and after[tokens] == before[tokens] + 3
    assert after[("fedsea_gateway_ready", ())] == 1 and after[("fedsea_gateway_generations_running", ())] == 0
    # The same chat again: the edge finds its whole prompt in the prefix store.
    chat(gw, max_tokens=3)
    again = scrape()
    queried = again[("fedsea_gateway_edge_prefix_query_tokens", ())] - after[("fedsea_gateway_edge_prefix_query_tokens", ())]
    hit = again[("fedsea_gateway_edge_prefix_hit_tokens", ())] - after[("fedsea_gateway_edge_prefix_hit_tokens", ())]
    assert queried > 0 and hit == queried and again[("fedsea_gateway_edge_prefix_entries", ())] >= 1


def test_fedsea_gateway_command(start_server, tiny_model_dir, tmp_path):
    """`fedsea gateway` as users start it: its own process, its API key from a file (flags
    show in ps), the server's key from the environment, status pages behind the key."""
    server = start_server(tiny_model_dir, api_keys=("server-key",))
    (tmp_path / "key").write_text("k\n")
    port = free_port()
    cmd = [sys.executable, "-m", "fedsea.cli", "gateway", "--model", str(tiny_model_dir), "--server", server.url, "--port", str(port),
           "--api-key-file", str(tmp_path / "key"), "--protect-status"]
    log = tmp_path / "gateway.log"
    env = {k: v for k, v in os.environ.items() if k != "FEDSEA_API_KEY"} | {"FEDSEA_SERVER_API_KEY": "server-key"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        health = f"http://127.0.0.1:{port}/health"
        wait_until(lambda: proc.poll() is None and _answers(health, {"Authorization": "Bearer k"}) == 200, timeout=120)
        assert httpx.get(health).status_code == 401
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        r = client.chat.completions.create(model=tiny_model_dir.name, messages=USER, max_tokens=3)
        assert r.usage.completion_tokens == 3
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    finally:
        proc.terminate()
        # uvicorn shuts down gracefully, then re-raises the signal for the exit status
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM), log.read_text()
    text = log.read_text()
    assert f"http://127.0.0.1:{port}/v1" in text and "Application shutdown complete" in text


def _answers(url: str, headers: dict) -> int | None:
    try:
        return httpx.get(url, headers=headers).status_code
    except httpx.TransportError:
        return None

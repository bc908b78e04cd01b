"""A server runtime exposed to a network (issue 10): TLS, refusing to listen in the clear,
keys, per-tenant limits (connections, sessions, queued input, KV blocks), rate-limited
refusal logs, and numerics that one client cannot use to poison another's output."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import httpx
import pytest
import torch
import trustme
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage, InvalidStatus

from edge_runtime import AsyncEdgeClient
from fedsea.cli import main as fedsea_main
from fedsea_shared.protocol import Close, Error, Hello, Open, Opened, Output, Welcome, decode, encode
from server_runtime.app import ServerSettings
from server_runtime.engine import EngineSettings
from conftest import eventually
from test_server_errors import request, step

HIDDEN = 64  # the tiny model's width
HELLO = Hello(num_layers=6, hidden_size=HIDDEN, layers=(2, 4), dtype="float32")
# One KV block of the tiny model's two server layers: 2 (K, V) x 2 layers x 16 tokens x 2 heads x 16 dims.
BLOCK_BYTES_FP32 = 2 * 2 * 16 * 2 * 16 * 4


def pool_of(blocks: int, itemsize: int = 4) -> str:
    return f"{(blocks + 1) * BLOCK_BYTES_FP32 // 4 * itemsize}B"  # + the scratch block


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path_factory.mktemp("tls")
    cert.cert_chain_pems[0].write_to_path(d / "cert.pem")
    cert.private_key_pem.write_to_path(d / "key.pem")
    ca.cert_pem.write_to_path(d / "ca.pem")
    return d


async def hello_ws(url: str, **kw):
    ws = await connect(url, compression=None, max_size=None, **kw)
    await ws.send(encode(HELLO))
    assert isinstance(decode(await ws.recv())[0], Welcome)
    return ws




def inputs(seed: int, tokens: int) -> torch.Tensor:
    return torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


# ---- 1. TLS, and no clear-text listening on a network ------------------------------------


async def test_edge_and_server_talk_over_wss_and_plain_ws_is_refused(start_server, tiny_model_dir, tls_files):
    server = start_server(tiny_model_dir, ssl_certfile=str(tls_files / "cert.pem"), ssl_keyfile=str(tls_files / "key.pem"))
    assert server.url.startswith("wss://")
    client = AsyncEdgeClient(server.url, model=str(tiny_model_dir), noise=0.0, server_ca=str(tls_files / "ca.pem"))
    try:
        out = await client.generate([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
        assert out.completion_tokens == 4
    finally:
        await client.aclose()
    # The system trust store does not know the test CA: verification fails, nothing is sent.
    untrusted = AsyncEdgeClient(server.url, model=str(tiny_model_dir), noise=0.0)
    with pytest.raises(ssl.SSLCertVerificationError):
        await untrusted.connection()
    await untrusted.aclose()
    # Clear text to the TLS port gets no websocket.
    with pytest.raises(InvalidMessage):
        await connect(server.url.replace("wss://", "ws://"), open_timeout=5)
    # /health and /metrics are served over https on the same port.
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(tls_files / "ca.pem"))) as http:
        base = server.url.replace("wss://", "https://")
        assert (await http.get(base + "/health")).status_code == 200
        assert "fedsea_sessions" in (await http.get(base + "/metrics")).text


def test_gateway_serves_https_over_a_wss_server(start_server, tiny_model_dir, tls_files):
    """Both hops encrypted: API client -> https gateway -> wss server runtime."""
    from gateway import GatewaySettings
    from gateway.server import GatewayThread

    tls = dict(ssl_certfile=str(tls_files / "cert.pem"), ssl_keyfile=str(tls_files / "key.pem"))
    server = start_server(tiny_model_dir, api_keys=("edge-key",), **tls)
    gw = GatewayThread(GatewaySettings.of(server_url=server.url, server_api_key="edge-key", model=str(tiny_model_dir),
                                       port=0, server_ca=str(tls_files / "ca.pem"), **tls))
    try:
        gw.wait_ready()
        assert gw.url.startswith("https://")
        body = {"model": gw.settings.edge.model_id, "prompt": [42, 43], "max_tokens": 3, "temperature": 0}
        ca = ssl.create_default_context(cafile=str(tls_files / "ca.pem"))
        r = httpx.post(gw.url + "/completions", json=body, verify=ca, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        gw.stop()


def test_server_refuses_a_network_address_without_tls_and_key(tiny_model_dir, tmp_path, tls_files, capsys):
    with pytest.raises(SystemExit) as info:
        fedsea_main(["server", "--model", str(tiny_model_dir), "--host", "0.0.0.0", "--port", "0"])
    message = str(info.value)
    assert "--ssl-certfile" in message and "--api-key-file" in message and "--insecure" in message
    keys = tmp_path / "keys"
    keys.write_text("# tenant A\nsecret-a\n")
    with pytest.raises(SystemExit) as info:  # a key from the file alone is not enough
        fedsea_main(["server", "--model", str(tiny_model_dir), "--host", "0.0.0.0", "--api-key-file", str(keys)])
    assert "--ssl-certfile" in str(info.value) and "--api-key-file" not in str(info.value)
    tls = dict(ssl_certfile=str(tls_files / "cert.pem"), ssl_keyfile=str(tls_files / "key.pem"))
    ServerSettings(host="0.0.0.0", api_keys=("k",), **tls).check_exposure()
    ServerSettings(host="0.0.0.0", insecure=True).check_exposure()
    ServerSettings(host="127.0.0.1").check_exposure()


# ---- keys: Bearer only, and optionally on /metrics and /health ---------------------------


async def test_keys_need_bearer_and_can_guard_metrics(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir, api_keys=("k1",), protect_metrics=True)
    with pytest.raises(InvalidStatus) as info:  # the key without the Bearer scheme
        await connect(server.url, additional_headers={"Authorization": "k1"})
    assert info.value.response.status_code == 401
    ws = await hello_ws(server.url, additional_headers={"Authorization": "Bearer k1"})
    await ws.close()
    base = server.url.replace("ws://", "http://")
    async with httpx.AsyncClient() as http:
        for path in ("/metrics", "/health"):
            assert (await http.get(base + path)).status_code == 401
            assert (await http.get(base + path, headers={"Authorization": "Bearer k1"})).status_code == 200


# ---- 4. per-key session cap --------------------------------------------------------------


async def test_opens_waiting_for_capacity_are_counted_once(start_server, tiny_model_dir):
    """Closing an open that still waits for KV capacity used to subtract it twice from the
    key's count, so the key could then open past its cap."""
    server = start_server(tiny_model_dir, api_keys=("k",), max_sessions_per_key=4, kv_cache_memory=pool_of(2),
                          kv_quota=1.0, engine=EngineSettings(wait_timeout=3.0))
    ws = await hello_ws(server.url, additional_headers={"Authorization": "Bearer k"})
    for sid in (0, 1):  # two sessions take both blocks
        assert isinstance((await request(ws, encode(Open(sid=sid, noise=0.1))))[0], Opened)
        assert isinstance((await request(ws, step(sid, 0, inputs(sid, 16))))[0], Output)
    for sid in (2, 3):  # 4 of 4 sessions: these wait for a free block
        await ws.send(encode(Open(sid=sid, noise=0.1)))
    await asyncio.sleep(0.3)
    for sid in (2, 3):
        await ws.send(encode(Close(sid=sid)))
    replies = [decode(await ws.recv())[0] for _ in range(4)]
    assert sorted(m.type for m in replies) == ["closed", "closed", "error", "error"]
    # Two sessions are open: two more may open (they wait), a third is over the cap at once.
    for sid in (4, 5, 6):
        await ws.send(encode(Open(sid=sid, noise=0.1)))
    msg, _ = decode(await asyncio.wait_for(ws.recv(), 2.0))
    assert isinstance(msg, Error) and msg.code.value == "limit" and msg.sid == 6
    await ws.close()


# ---- 5. KV quota per tenant --------------------------------------------------------------


async def test_one_connection_over_its_kv_quota_waits_while_others_run(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir, kv_cache_memory=pool_of(8), kv_quota=0.5,
                          engine=EngineSettings(wait_timeout=10.0))
    greedy = await hello_ws(server.url)
    for sid in range(4):  # one-token sessions, one block each, up to the quota of 4
        assert isinstance((await request(greedy, encode(Open(sid=sid, noise=0.1))))[0], Opened)
        assert isinstance((await request(greedy, step(sid, 0, inputs(sid, 1))))[0], Output)
    assert isinstance((await request(greedy, encode(Open(sid=4, noise=0.1))))[0], Opened)
    await greedy.send(step(4, 0, inputs(4, 1)))  # a fifth block: over the quota, so it waits
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(greedy.recv(), 0.5)
    # A step that could never fit the quota is refused at once.
    assert isinstance((await request(greedy, encode(Open(sid=5, noise=0.1))))[0], Opened)
    msg, _ = await request(greedy, step(5, 0, inputs(5, 5 * 16)))
    assert isinstance(msg, Error) and msg.code.value == "limit" and "whole quota is 4" in msg.message
    # Another connection still gets blocks for a 40-token stream.
    other = await hello_ws(server.url)
    await request(other, encode(Open(sid=0, noise=0.1)))
    msg, out = await request(other, step(0, 0, inputs(9, 40)))
    assert isinstance(msg, Output) and out.shape == (40, HIDDEN)
    # The waiting step runs when the greedy connection closes one of its sessions.
    await greedy.send(encode(Close(sid=0)))
    replies = [decode(await asyncio.wait_for(greedy.recv(), 5.0))[0] for _ in range(2)]
    assert sorted(m.type for m in replies) == ["closed", "output"]
    assert next(m for m in replies if m.type == "output").rows == [(4, 0, 1)]
    await greedy.close()
    await other.close()


# ---- 6. connections, queued input, refusal logs ------------------------------------------


async def test_connection_caps_total_and_per_key(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir, api_keys=("k1", "k2"), max_connections=3, max_connections_per_key=2)

    def auth(key):
        return {"additional_headers": {"Authorization": f"Bearer {key}"}}

    k1 = [await hello_ws(server.url, **auth("k1")) for _ in range(2)]
    with pytest.raises(InvalidStatus) as info:
        await connect(server.url, **auth("k1"))
    assert info.value.response.status_code == 503
    k2 = await hello_ws(server.url, **auth("k2"))
    with pytest.raises(InvalidStatus):  # the total cap
        await connect(server.url, **auth("k2"))
    await k1.pop().close()
    deadline = time.monotonic() + 20  # the server counts the close when its handler ends
    while True:
        try:
            k1.append(await hello_ws(server.url, **auth("k1")))
            break
        except InvalidStatus:
            assert time.monotonic() < deadline, "a closed connection still counts against its key"
            await asyncio.sleep(0.02)
    for ws in k1 + [k2]:
        await ws.close()


async def test_connection_cap_per_address_without_keys(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir, max_connections_per_key=2)
    conns = [await hello_ws(server.url) for _ in range(2)]
    with pytest.raises(InvalidStatus):
        await connect(server.url)
    for ws in conns:
        await ws.close()


async def test_queued_input_per_connection_is_capped(start_server, tiny_model_dir):
    """Steps waiting for KV capacity hold their input; past the cap a step is refused at
    once instead of queueing."""
    frame_bytes = len(step(0, 0, inputs(0, 16)))
    server = start_server(tiny_model_dir, kv_cache_memory=pool_of(1), kv_quota=1.0,
                          max_queued_bytes=3 * frame_bytes, engine=EngineSettings(wait_timeout=2.0))
    ws = await hello_ws(server.url)
    for sid in range(6):
        await request(ws, encode(Open(sid=sid, noise=0.1)))
    await request(ws, step(0, 0, inputs(0, 16)))  # holds the only block
    for sid in range(1, 6):  # each waits for a block
        await ws.send(step(sid, 0, inputs(sid, 16)))
    first, _ = decode(await asyncio.wait_for(ws.recv(), 1.5))  # before any wait times out
    assert isinstance(first, Error) and first.code.value == "limit" and first.sid == 4
    await ws.close()


async def test_refusals_are_logged_at_a_bounded_rate(start_server, tiny_model_dir, caplog):
    server = start_server(tiny_model_dir, refusal_log_interval=60.0)
    ws = await hello_ws(server.url)
    with caplog.at_level(logging.WARNING, logger="fedsea.server"):
        for _ in range(50):
            msg, _ = await request(ws, step(7, 0, inputs(0, 1)))  # no such session
            assert msg.code.value == "unknown_session"
        await ws.close()

        def summarized():
            return [r.getMessage() for r in caplog.records if r.name == "fedsea.server" and "refused" in r.getMessage()]

        await eventually(lambda: len(summarized()) >= 2, what="the refusal summary on disconnect")
    lines = summarized()
    assert len(lines) == 2, lines
    assert "unknown_session" in lines[0] and "49 more" in lines[1] and "unknown_session x49" in lines[1]


# ---- 3. numerics: a bf16 server cannot be poisoned ---------------------------------------


async def _victim_outputs(url: str) -> list[torch.Tensor]:
    ws = await hello_ws(url)
    await request(ws, encode(Open(sid=0, noise=0.1)))
    outs = [(await request(ws, step(0, 0, inputs(1, 5))))[1]]
    for pos in range(5, 9):
        outs.append((await request(ws, step(0, pos, inputs(pos, 1))))[1])
    await ws.close()
    return outs


async def test_bf16_server_refuses_overflow_and_other_users_output_is_unchanged(start_server, tiny_model_dir):
    """3.4e38 is finite in float32 and Inf in bfloat16: it must be refused after the cast,
    and after the attacker leaves, a victim's outputs are bit-identical to before."""
    server = start_server(tiny_model_dir, dtype="bfloat16", kv_cache_memory=pool_of(4, itemsize=2), kv_quota=1.0)
    before = await _victim_outputs(server.url)
    attacker = await hello_ws(server.url)
    await request(attacker, encode(Open(sid=0, noise=0.1)))
    msg, _ = await request(attacker, step(0, 0, torch.full((64, HIDDEN), 3.4e38)))  # every block of the pool
    assert isinstance(msg, Error) and msg.code.value == "non_finite"
    msg, _ = await request(attacker, step(0, 0, torch.full((64, HIDDEN), 1e38)))  # finite in bf16: accepted
    assert isinstance(msg, Output)
    await attacker.close()
    await asyncio.sleep(0.2)
    after = await _victim_outputs(server.url)
    for a, b in zip(before, after):
        assert torch.isfinite(b).all() and torch.equal(a, b)

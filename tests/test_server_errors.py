"""Bad input on the wire: each gets a typed error frame and a log line, and the server
keeps serving the offending connection's other sessions and every other connection."""

from __future__ import annotations

import asyncio
import logging
import struct
import time

import httpx
import orjson
import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from edge_runtime import AsyncEdgeClient, ServerError
from fedsea_shared.protocol import Close, Error, Fork, Hello, Open, Opened, Output, Step, Welcome, decode, encode, tensor_meta
from server_runtime.engine import EngineSettings

HIDDEN = 64  # the tiny model's width
HELLO = Hello(num_layers=6, hidden_size=HIDDEN, layers=(2, 4), dtype="float32")


@pytest.fixture
def server(start_server, tiny_model_dir):
    return start_server(
        tiny_model_dir, max_message_bytes=64 * 1024, max_sessions_per_connection=3,
        noise_max=2.0, engine=EngineSettings(max_context=64),
    )


_open_sockets: list = []


@pytest.fixture(autouse=True)
async def close_sockets(server):
    """Close every test websocket while its event loop still runs."""
    yield
    while _open_sockets:
        await _open_sockets.pop().close()


async def raw_ws(server):
    ws = await connect(server.url, compression=None, max_size=None)
    _open_sockets.append(ws)
    return ws


async def session_ws(server):
    ws = await raw_ws(server)
    await ws.send(encode(HELLO))
    msg, _ = decode(await ws.recv())
    assert isinstance(msg, Welcome)
    return ws


async def request(ws, frame: bytes):
    await ws.send(frame)
    return decode(await ws.recv())


def step(sid: int, pos: int, t: torch.Tensor) -> bytes:
    return encode(Step(rows=[(sid, pos, t.shape[0])], tensor=tensor_meta(t)), t)


async def open_session(ws, sid: int) -> None:
    msg, _ = await request(ws, encode(Open(sid=sid, noise=0.1)))
    assert isinstance(msg, Opened), msg


async def assert_still_serves(ws, sid: int) -> None:
    """A fresh session on the same connection still runs a prefill and a decode step."""
    await open_session(ws, sid)
    msg, out = await request(ws, step(sid, 0, torch.randn(5, HIDDEN)))
    assert isinstance(msg, Output) and out.shape == (5, HIDDEN) and torch.isfinite(out).all()
    msg, out = await request(ws, step(sid, 5, torch.randn(1, HIDDEN)))
    assert isinstance(msg, Output) and out.shape == (1, HIDDEN)
    msg, _ = await request(ws, encode(Close(sid=sid)))
    assert msg.type == "closed"


def raw(header: dict, payload: bytes = b"") -> bytes:
    h = orjson.dumps(header)
    return struct.pack(">I", len(h)) + h + payload


BAD_INPUTS = {
    "malformed": (raw({"type": "step", "sid": 0}), "bad_frame"),
    "session_twice": (raw({"type": "step", "rows": [[0, 0, 1], [0, 1, 1]], "tensor": {"dtype": "float32", "shape": [2, HIDDEN]}},
                          b"\x00" * 8 * HIDDEN), "bad_frame"),
    "rows_mismatch": (raw({"type": "step", "rows": [[0, 0, 3]], "tensor": {"dtype": "float32", "shape": [2, HIDDEN]}},
                          b"\x00" * 8 * HIDDEN), "bad_tensor"),
    "not_json": (struct.pack(">I", 2) + b"{]", "bad_frame"),
    "text_frame": ("hello", "bad_frame"),
    "wrong_shape": (step(0, 0, torch.randn(3, HIDDEN // 2)), "bad_tensor"),
    "wrong_rank": (step(0, 0, torch.randn(3, 2, HIDDEN)), "bad_tensor"),
    "wrong_dtype": (step(0, 0, torch.randn(3, HIDDEN).half()), "bad_tensor"),
    "nan": (step(0, 0, torch.full((2, HIDDEN), float("nan"))), "non_finite"),
    "inf": (step(0, 0, torch.full((2, HIDDEN), float("inf"))), "non_finite"),
    "unknown_session": (step(99, 0, torch.randn(1, HIDDEN)), "unknown_session"),
    "close_unknown": (encode(Close(sid=42)), "unknown_session"),
    "position": (step(0, 7, torch.randn(1, HIDDEN)), "position_mismatch"),
    "context": (step(0, 0, torch.randn(65, HIDDEN)), "context_overflow"),
    "oversize": (step(0, 0, torch.randn(300, HIDDEN)), "too_large"),  # 76.8 kB > 64 KiB
    "noise_bounds": (encode(Open(sid=5, noise=3.0)), "noise_out_of_bounds"),
    "duplicate_open": (encode(Open(sid=0, noise=0.1)), "session_exists"),
    "reopen_unknown": (encode(Open(sid=7, noise=0.1, reopen=True)), "unknown_session"),
    "reopen_not_preempted": (encode(Open(sid=0, noise=0.1, reopen=True)), "session_exists"),
    "server_message": (encode(Opened(sid=0)), "bad_frame"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
async def test_bad_input_gets_typed_error_and_connection_survives(server, case, caplog):
    frame, code = BAD_INPUTS[case]
    ws = await session_ws(server)
    try:
        await open_session(ws, 0)
        with caplog.at_level(logging.WARNING, logger="fedsea.server"):
            msg, _ = await request(ws, frame)
        assert isinstance(msg, Error) and msg.code.value == code and not msg.fatal
        assert msg.message
        assert any(code in r.getMessage() for r in caplog.records)
        # Session 0 is intact and the connection keeps working.
        msg, out = await request(ws, step(0, 0, torch.randn(3, HIDDEN)))
        assert isinstance(msg, Output) and out.shape == (3, HIDDEN)
        await assert_still_serves(ws, 1)
    finally:
        await ws.close()


async def test_partition_mismatch_is_refused_with_the_right_flags(server):
    ws = await raw_ws(server)
    await ws.send(encode(Hello(num_layers=6, hidden_size=HIDDEN, layers=(1, 5), dtype="float32")))
    msg, _ = decode(await ws.recv())
    assert isinstance(msg, Error) and msg.code.value == "partition_mismatch" and msg.fatal
    assert "--head 2 --tail 2" in msg.message
    with pytest.raises(ConnectionClosed):
        await ws.recv()


async def test_different_model_is_refused(server):
    ws = await raw_ws(server)
    await ws.send(encode(Hello(num_layers=30, hidden_size=576, layers=(2, 4), dtype="float32")))
    msg, _ = decode(await ws.recv())
    assert msg.code.value == "partition_mismatch" and "different model" in msg.message


async def test_edge_client_surfaces_partition_mismatch(server, tiny_model_dir):
    client = AsyncEdgeClient(server.url, model=str(tiny_model_dir), head=1, tail=2, noise=0.0)
    with pytest.raises(Exception, match="partition_mismatch|runs \\[2, 4\\)"):
        await client.generate([{"role": "user", "content": "hi"}], max_tokens=2)
    await client.aclose()


async def test_messages_before_hello_are_refused(server):
    ws = await raw_ws(server)
    msg, _ = await request(ws, encode(Open(sid=0, noise=0.1)))
    assert msg.code.value == "not_ready"
    await ws.send(encode(HELLO))
    assert isinstance(decode(await ws.recv())[0], Welcome)
    await assert_still_serves(ws, 0)


async def test_session_limit_per_connection(server):
    ws = await session_ws(server)
    for sid in range(3):
        await open_session(ws, sid)
    msg, _ = await request(ws, encode(Open(sid=3, noise=0.1)))
    assert msg.code.value == "limit"
    await request(ws, encode(Close(sid=0)))
    await open_session(ws, 3)


async def test_huge_frame_drops_only_that_connection(server, tiny_model_dir):
    """Beyond twice the limit the websocket layer closes the connection (1009) without
    reading it all; other connections carry on."""
    good = await session_ws(server)
    await open_session(good, 0)
    bad = await session_ws(server)
    await bad.send(step(0, 0, torch.randn(1000, HIDDEN)))  # 256 kB > 2 x 64 KiB
    with pytest.raises(ConnectionClosed) as info:
        await bad.recv()
    assert info.value.rcvd.code == 1009
    msg, out = await request(good, step(0, 0, torch.randn(4, HIDDEN)))
    assert isinstance(msg, Output)


async def test_generation_on_another_connection_is_unaffected(server, tiny_model_dir):
    client = AsyncEdgeClient(server.url, model=str(tiny_model_dir), noise=0.0)
    messages = [{"role": "user", "content": "Count to five."}]
    before = await client.generate(messages, max_tokens=12, temperature=0)
    ws = await session_ws(server)
    await open_session(ws, 0)
    for frame, _ in BAD_INPUTS.values():
        await ws.send(frame)
    after = await client.generate(messages, max_tokens=12, temperature=0)
    assert after.token_ids == before.token_ids
    await client.aclose()
    await ws.close()


async def test_api_keys_gate_connections_and_cap_sessions(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir, api_keys=("k1", "k2"), max_sessions_per_key=2)
    with pytest.raises(ServerError) as info:
        await AsyncEdgeClient(server.url, model=str(tiny_model_dir), noise=0.0).connection()
    assert info.value.code == "unauthorized"
    wrong = AsyncEdgeClient(server.url, model=str(tiny_model_dir), noise=0.0, server_api_key="nope")
    with pytest.raises(ServerError):
        await wrong.connection()
    # Two connections with the same key share its session cap; another key has its own.
    conns = [await AsyncEdgeClient(server.url, model=str(tiny_model_dir), noise=0.0, server_api_key=k).connection()
             for k in ("k1", "k1", "k2")]
    await conns[0].open(0, 0.1)
    await conns[1].open(0, 0.1)
    with pytest.raises(ServerError) as info:
        await conns[1].open(1, 0.1)
    assert info.value.code == "limit"
    await conns[2].open(0, 0.1)
    await conns[0].close_session(0)
    await conns[1].open(1, 0.1)  # the key's count went down on close
    for c in conns:
        await c.close()


async def test_bad_fork_and_prefix_messages_get_typed_errors(server):
    ws = await session_ws(server)
    reply, _ = await request(ws, encode(Fork(sid=1, parent=7)))  # no such parent on this connection
    assert isinstance(reply, Error) and reply.code.value == "unknown_session" and reply.sid == 1
    for prefix in (["zz" * 16], ["ab"], ["00" * 16] * 385):  # not hex, too short, too many
        header = orjson.dumps({"type": "open", "sid": 2, "noise": 0.1, "prefix": prefix})
        reply, _ = await request(ws, struct.pack(">I", len(header)) + header)
        assert isinstance(reply, Error) and reply.code.value == "bad_frame"
    for partial in (["zz" * 16], ["00" * 16] * 16, ["00" * 16] * 64):  # not hex, a whole block (of 16), over the cap
        header = orjson.dumps({"type": "open", "sid": 2, "noise": 0.1, "partial": partial})
        reply, _ = await request(ws, struct.pack(">I", len(header)) + header)
        assert isinstance(reply, Error) and reply.code.value == "bad_frame" and "partial" in reply.message
    # An unknown prefix is no error: nothing is cached, the session starts empty ...
    reply, _ = await request(ws, encode(Open(sid=3, noise=0.1, prefix=["00" * 16])))
    assert isinstance(reply, Opened) and reply.cached == 0
    # ... a fork of it shares its length, and a fork under a taken sid is refused.
    x = torch.randn(5, HIDDEN)
    reply, _ = await request(ws, step(3, 0, x))
    assert isinstance(reply, Output)
    reply, _ = await request(ws, encode(Fork(sid=4, parent=3)))
    assert isinstance(reply, Opened) and reply.cached == 5
    reply, _ = await request(ws, encode(Fork(sid=4, parent=3)))
    assert isinstance(reply, Error) and reply.code.value == "session_exists"
    reply, _ = await request(ws, encode(Fork(sid=5, parent=4)))  # a fork of a fork
    assert isinstance(reply, Opened) and reply.cached == 5
    reply, _ = await request(ws, encode(Fork(sid=6, parent=3)))  # a 4th session: over the limit of 3
    assert isinstance(reply, Error) and reply.code.value == "limit"
    reply, _ = await request(ws, step(4, 5, x[:1]))
    assert isinstance(reply, Output)


async def test_a_frame_of_many_sessions_runs_the_good_ones_and_tells_each_bad_one_why(server):
    """One Step frame carries rows of several sessions: one with NaN, one never opened and
    one at the wrong position are each refused by name while the good one runs; then a
    frame of two sessions is answered in one Output whose rows equal what each session
    gets stepping alone."""
    ws, other = await session_ws(server), await session_ws(server)
    try:
        for sid in (0, 1, 2):
            await open_session(ws, sid)
        first = {0: torch.randn(4, HIDDEN), 1: torch.randn(2, HIDDEN)}
        x = torch.cat([first[0], torch.randn(1, HIDDEN), torch.randn(1, HIDDEN), torch.randn(2, HIDDEN)])
        x[6, 3] = float("nan")  # session 2's first row
        rows = [(0, 0, 4), (7, 0, 1), (1, 5, 1), (2, 0, 2)]
        await ws.send(encode(Step(rows=rows, tensor=tensor_meta(x)), x))
        errors, outputs = {}, []
        while len(errors) < 3 or not outputs:
            msg, out = decode(await ws.recv())
            if isinstance(msg, Error):
                errors[msg.sid] = msg.code.value
            else:
                assert isinstance(msg, Output)
                outputs.append((msg, out))
        assert errors == {7: "unknown_session", 1: "position_mismatch", 2: "non_finite"}
        assert [m.rows for m, _ in outputs] == [[(0, 0, 4)]]
        # Two good sessions in one frame: one reply, each part equal to stepping alone.
        nxt = torch.randn(1, HIDDEN)
        both = torch.cat([nxt, first[1]])
        reply, out = await request(ws, encode(Step(rows=[(0, 4, 1), (1, 0, 2)], tensor=tensor_meta(both)), both))
        assert isinstance(reply, Output) and reply.rows == [(0, 4, 1), (1, 0, 2)]
        for sid in (0, 1):
            await open_session(other, sid)
        await request(other, step(0, 0, first[0]))
        _, alone0 = await request(other, step(0, 4, nxt))
        _, alone1 = await request(other, step(1, 0, first[1]))
        parts = reply.split(out)
        torch.testing.assert_close(parts[0], alone0, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(parts[1], alone1, rtol=1e-4, atol=1e-4)
    finally:
        await ws.close()
        await other.close()


async def test_a_session_the_idle_sweep_frees_stops_counting_against_its_connection(start_server, tiny_model_dir):
    """The engine is the one session registry: when it frees an idle session, the
    connection's session cap has room again (a long-lived edge connection would otherwise
    fill up with sessions that no longer exist)."""
    server = start_server(tiny_model_dir, max_sessions_per_connection=1, engine=EngineSettings(idle_timeout=0.3))
    ws = await session_ws(server)
    try:
        await open_session(ws, 0)
        deadline = time.monotonic() + 30
        while 'fedsea_sessions 0.0' not in httpx.get(f"http://127.0.0.1:{server.port}/metrics").text:
            assert time.monotonic() < deadline, "the idle session was never freed"
            await asyncio.sleep(0.1)
        reply = None
        while time.monotonic() < deadline:  # the connection hears of it just after the engine
            reply, _ = await request(ws, encode(Open(sid=1, noise=0.1)))
            if isinstance(reply, Opened):
                break
            await asyncio.sleep(0.05)
        assert isinstance(reply, Opened), reply
        reply, _ = await request(ws, step(0, 0, torch.randn(1, HIDDEN)))
        assert isinstance(reply, Error) and reply.code.value == "unknown_session"
    finally:
        await ws.close()

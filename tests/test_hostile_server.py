"""A broken or hostile server runtime cannot hurt the edge (issue 10, failure 7).

A small websockets server in the test speaks fedsea's protocol and answers each step the
way `mode` says: oversized frames, wrong shapes, wrong dtypes, NaN, a wrong position.
The edge must refuse each reply with a clear error (502 through the gateway), close the
session and keep serving, never allocate what the server declares or emit garbage text.
"""

from __future__ import annotations

import asyncio
import struct

import httpx
import pytest
import torch
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from edge_runtime import AsyncEdgeClient
from edge_runtime.connection import ServerError
from fedsea_shared.protocol import (
    Close, Closed, Hello, Open, Opened, Output, Step, Welcome, decode, encode, tensor_meta,
)
from gateway import GatewaySettings, GatewayThread

USER = [{"role": "user", "content": "hello there"}]


class HostileServer:
    """Answers hello/open/close properly; answers steps according to `self.mode`."""

    def __init__(self):
        self.mode = "echo"  # echo: the identity as the middle blocks, a well-formed reply
        self.closed_sids: list[int] = []
        self.url = ""

    async def __aenter__(self):
        self._server = await serve(self._handle, "127.0.0.1", 0, compression=None, max_size=None)
        self.url = f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self._server.close()

    async def _handle(self, ws):
        try:
            await self._serve(ws)
        except ConnectionClosed:
            pass  # the edge hangs up on oversized frames

    async def _serve(self, ws):
        async for data in ws:
            msg, tensor = decode(data)
            if isinstance(msg, Hello):
                await ws.send(encode(Welcome(layers=msg.layers, dtype=msg.dtype, noise_min=0, noise_max=4,
                                             max_context=1 << 20, max_sessions=256, max_message_bytes=1 << 40)))
            elif isinstance(msg, Open):
                await ws.send(encode(Opened(sid=msg.sid)))
            elif isinstance(msg, Close):
                self.closed_sids.append(msg.sid)
                await ws.send(encode(Closed(sid=msg.sid)))
            elif isinstance(msg, Step):
                await self._reply(ws, msg, tensor)

    async def _reply(self, ws, step: Step, x: torch.Tensor) -> None:
        mode, pos = self.mode, step.pos
        if mode == "huge_frame":
            # Only the header of a 600 MiB binary frame: an edge that waits for its payload hangs.
            ws.transport.write(b"\x82\x7f" + struct.pack(">Q", 600 * 2**20))
            return
        if mode == "oversized":
            x = x.repeat(100, 1)  # a well-formed frame, larger than any reply the edge can ask for
        elif mode == "wrong_shape":
            x = x[:, :-1]
        elif mode == "extra_rows":
            x = torch.cat([x, x])
        elif mode == "wrong_dtype":
            x = x.to(torch.float16)
        elif mode == "nan":
            x = x.clone()
            x[0, 0] = float("nan")
        elif mode == "inf":
            x = x.clone()
            x[-1, -1] = float("inf")
        elif mode == "wrong_pos":
            pos += 1
        elif mode == "payload_mismatch":
            frame = encode(Output(sid=step.sid, pos=pos, tensor=tensor_meta(x)), x)
            await ws.send(frame[:-4])
            return
        await ws.send(encode(Output(sid=step.sid, pos=pos, tensor=tensor_meta(x)), x))


@pytest.fixture
async def hostile():
    async with HostileServer() as server:
        yield server


BAD_MODES = {
    "huge_frame": "larger than the",
    "oversized": "larger than the",
    "wrong_shape": "asked for float32",
    "extra_rows": "asked for float32",
    "wrong_dtype": "got float16",
    "nan": "NaN or Inf",
    "inf": "NaN or Inf",
    "wrong_pos": "at position",
    "payload_mismatch": "payload is",
}


async def test_every_bad_reply_is_a_clear_error_and_the_edge_keeps_serving(hostile, tiny_model_dir):
    client = AsyncEdgeClient(hostile.url, model=str(tiny_model_dir), noise=0.0)
    try:
        ok = await client.generate(USER, max_tokens=3, temperature=0)
        assert ok.completion_tokens == 3  # the well-behaved mode works: the fake speaks the protocol
        for mode, says in BAD_MODES.items():
            hostile.mode = mode
            closed_before = len(hostile.closed_sids)
            with pytest.raises(ServerError, match=says) as info:
                # A bound, not a timing check: an edge that waits for a 600 MiB payload never returns.
                await asyncio.wait_for(client.generate(USER, max_tokens=3, temperature=0), 30)
            assert info.value.code == "bad_reply"
            if mode not in ("huge_frame", "oversized"):  # those end the connection; the rest close the session
                assert len(hostile.closed_sids) == closed_before + 1, mode
            hostile.mode = "echo"
            again = await asyncio.wait_for(client.generate(USER, max_tokens=3, temperature=0), 30)
            assert again.token_ids == ok.token_ids, mode  # no state from the bad reply leaks into the next
    finally:
        await client.aclose()


async def test_a_bad_reply_is_a_502_from_the_gateway(hostile, tiny_model_dir):
    gw = GatewayThread(GatewaySettings(server_url=hostile.url, model=str(tiny_model_dir), port=0))
    try:
        await asyncio.to_thread(gw.wait_ready)
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            body = {"model": gw.settings.model_id, "messages": USER, "max_tokens": 3}
            assert (await http.post("/chat/completions", json=body)).status_code == 200
            for mode in ("wrong_shape", "nan", "huge_frame"):
                hostile.mode = mode
                r = await http.post("/chat/completions", json=body)
                assert r.status_code == 502, (mode, r.text)
                assert r.json()["error"]["code"] == "bad_reply" and "invalid reply" in r.json()["error"]["message"]
                hostile.mode = "echo"
                if mode == "huge_frame":  # the edge dropped that connection; the gateway reconnects
                    await asyncio.to_thread(gw.wait_ready)
                assert (await http.post("/chat/completions", json=body)).status_code == 200, mode
    finally:
        await asyncio.to_thread(gw.stop)

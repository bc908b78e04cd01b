"""A broken or hostile server runtime cannot hurt the edge (issue 10, failure 7).

A small websockets server (tests/fake_server.py) speaks fedsea's protocol and answers
each step the way `mode` says: oversized frames, wrong shapes, wrong dtypes, NaN, a wrong position.
The edge must refuse each reply with a clear error (502 through the gateway), close the
session and keep serving, never allocate what the server declares or emit garbage text.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
import torch
from fake_server import FakeServer

from edge_runtime import AsyncEdgeClient
from edge_runtime.connection import ServerError
from fedsea_shared.protocol import Hello, TrainJoin
from fedsea_shared.shard import load_config
from gateway import GatewaySettings, GatewayThread
from training.connection import TrainingConnection

USER = [{"role": "user", "content": "hello there"}]


@pytest.fixture
async def hostile():
    async with FakeServer() as server:
        yield server


BAD_MODES = {
    "huge_frame": "larger than the",
    "oversized": "larger than the",
    "wrong_shape": "asked for float32",
    "extra_rows": "rows add up to",  # a frame whose rows and tensor disagree is malformed
    "wrong_dtype": "got float16",
    "nan": "NaN or Inf",
    "inf": "NaN or Inf",
    "wrong_pos": "got position",
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
    gw = GatewayThread(GatewaySettings.of(server_url=hostile.url, model=str(tiny_model_dir), port=0))
    try:
        await asyncio.to_thread(gw.wait_ready)
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            body = {"model": gw.settings.edge.model_id, "messages": USER, "max_tokens": 3}
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


async def test_a_flood_of_bad_frames_does_not_flood_the_log(hostile, tiny_model_dir, caplog):
    client = AsyncEdgeClient(hostile.url, model=str(tiny_model_dir), noise=0.0)
    try:
        hostile.mode = "flood"
        with caplog.at_level(logging.WARNING, logger="fedsea.edge.connection"):
            out = await client.generate(USER, max_tokens=2, temperature=0)
        assert out.completion_tokens == 2  # frames for no request are dropped; the replies still count
        lines = [r for r in caplog.records if r.name == "fedsea.edge.connection"]
        assert 10 <= len(lines) <= 20 and "6000 from this connection" in lines[-1].getMessage()
    finally:
        await client.aclose()


async def test_fine_tuning_checks_the_servers_outputs_and_gradients(hostile, tiny_model_dir):
    """fedsea-finetune's connection: a wrong or non-finite train_output / train_grad is a
    BadReply, not a shape error deep in the tail or NaN in the edge adapter."""
    cfg = load_config(tiny_model_dir)
    hello = Hello(num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, layers=(2, 4), dtype="float32")
    conn = await TrainingConnection.connect(hostile.url, hello)
    try:
        await conn.join(TrainJoin(sid=0, job="j", client=0, clients=1))
        hidden = torch.randn(5, cfg.hidden_size)
        step, out = await conn.forward([2, 3], hidden)
        assert torch.equal(out, hidden)  # the fake's identity middle: a well-formed reply passes
        for mode in ("wrong_shape", "extra_rows", "wrong_dtype", "nan", "inf"):
            hostile.mode = mode
            with pytest.raises(ServerError, match="asked for|NaN or Inf") as info:
                await conn.forward([5], hidden)
            assert info.value.code == "bad_reply"
            with pytest.raises(ServerError, match="asked for|NaN or Inf"):
                await conn.backward(step, hidden)
    finally:
        await conn.close()

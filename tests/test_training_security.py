"""Split fine-tuning on a shared server (issue 10, failure 2): off unless enabled, jobs
scoped to the API key that made them, FedAvg weighed by what the server itself trained,
and a memory budget that refuses, times out and frees training state."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from edge_runtime.connection import ServerError
from fedsea_shared.protocol import LoraSpec
from server_runtime.training_service import TrainingSettings
from training.connection import TrainingConnection

from test_training import HIDDEN, _clients, _hello, _hidden, _join, _until


async def _connect(server, key: str | None = None) -> TrainingConnection:
    return await TrainingConnection.connect(server.url, _hello(server.runtime.settings.model), key)


async def test_training_is_refused_unless_enabled(tiny_model_dir, start_server):
    server = start_server(tiny_model_dir)
    assert server.runtime.training is None  # the serving runtime builds no training state
    conn = await _connect(server)
    with pytest.raises(ServerError) as e:
        await conn.join(_join(0, 1))
    assert e.value.code == "disabled" and "--enable-training" in e.value.message
    await conn.close()


async def test_a_job_belongs_to_the_key_that_created_it(tiny_model_dir, start_server):
    server = start_server(tiny_model_dir, enable_training=True, api_keys=("a", "b", "c"))
    a = await _connect(server, "a")
    await a.join(_join(0, 1))
    sid, out = await a.forward([4], _hidden(0, 4))
    _, stepped = await a.backward(sid, torch.ones_like(out))
    assert stepped
    trained = await a.export()
    # Key b, same job name and settings, same client id: its own fresh job, not a's.
    b = await _connect(server, "b")
    joined = await b.join(_join(0, 1))
    assert not joined.resumed
    assert not torch.equal(await b.export(), trained)
    vector = torch.arange(5.0)
    avg, clients = await b.aggregate(0, 1, vector)  # only b's job takes part
    assert clients == 1 and torch.equal(avg, vector)
    # Key c with other settings: no mismatch error, so nothing of a's job is revealed.
    c = await _connect(server, "c")
    joined = await c.join(_join(0, 1).model_copy(update={"lora": LoraSpec(rank=4)}))
    assert not joined.resumed
    assert torch.equal(await a.export(), trained)  # a's adapter untouched by b and c
    for conn in (a, b, c):
        await conn.close()


async def test_fedavg_weighs_clients_by_samples_the_server_trained(tiny_model_dir, start_server):
    server = start_server(tiny_model_dir, enable_training=True)
    a, b = await _clients(server, 2, "sequential")
    sid, out = await a.forward([2, 2], _hidden(0, 4))  # two samples
    await a.backward(sid, torch.ones_like(out))
    sid, out = await b.forward([3], _hidden(1, 3))  # one sample
    await b.backward(sid, torch.ones_like(out))
    # b claims 10^12 samples; the server counted 2 for a and 1 for b.
    (avg, _), _ = await asyncio.gather(a.aggregate(1, 1, torch.zeros(6)), b.aggregate(1, 10**12, torch.ones(6)))
    torch.testing.assert_close(avg, torch.full((6,), 1 / 3))
    await a.close()
    await b.close()


async def _gauge(server, name: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(server.url.replace("ws://", "http://") + "/metrics")).text
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


async def test_training_memory_is_budgeted_timed_out_and_freed(tiny_model_dir, start_server):
    server = start_server(tiny_model_dir, enable_training=True,
                          training=TrainingSettings(memory=200_000, step_timeout=0.5))
    a = await _connect(server)
    await a.join(_join(0, 1, job="small"))
    job_bytes = await _gauge(server, "fedsea_training_memory_bytes")
    assert 0 < job_bytes < 200_000
    with pytest.raises(ServerError) as e:  # its autograd state would not fit the budget
        await a.forward([16], _hidden(0, 16))
    assert e.value.code == "capacity" and "--training-memory" in e.value.message
    big = await _connect(server)
    with pytest.raises(ServerError) as e:  # a rank-512 job's adapters would not fit either
        await big.join(_join(0, 1, job="big").model_copy(update={"lora": LoraSpec(rank=512)}))
    assert e.value.code == "capacity"
    # A forward that fits, whose backward never comes: freed after the step timeout.
    await a.forward([8], _hidden(1, 8))
    assert await _gauge(server, "fedsea_training_memory_bytes") > job_bytes
    for _ in range(100):
        if await _gauge(server, "fedsea_training_memory_bytes") == job_bytes:
            break
        await asyncio.sleep(0.05)
    assert await _gauge(server, "fedsea_training_memory_bytes") == job_bytes
    sid, out = await a.forward([8], _hidden(2, 8))  # the budget is back
    await a.backward(sid, torch.ones_like(out))
    # A job is freed when its last client goes, by leaving or by vanishing.
    await big.join(_join(0, 1, job="other"))
    assert await _gauge(server, "fedsea_training_jobs") == 2
    await big.close()
    await _until(lambda: len(server.runtime.training.jobs) == 1, "the vanished client's job is freed")
    await a.leave()
    assert await _gauge(server, "fedsea_training_jobs") == 0
    assert await _gauge(server, "fedsea_training_memory_bytes") == 0
    await a.close()


async def test_training_input_is_checked_in_the_server_dtype(tiny_model_dir, start_server):
    server = start_server(tiny_model_dir, enable_training=True, dtype="bfloat16")
    a = await _connect(server)
    await a.join(_join(0, 1))
    with pytest.raises(ServerError) as e:  # finite in float32, Inf in bfloat16
        await a.forward([2], torch.full((2, HIDDEN), 3.4e38))
    assert e.value.code == "non_finite"
    await a.close()

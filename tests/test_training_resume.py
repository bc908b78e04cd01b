"""Fine-tune resume (tiny model): a resumed run equals an uninterrupted one bit for bit,
server half included; a corrupt latest checkpoint falls back to the one before; a dead
client stops the run at once; a hostile server-state upload is refused; a lost server is
replaced by the next one of the list."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file

from edge_runtime.connection import ServerError
from edge_runtime.servers import rendezvous
from fedsea_shared.protocol import AdapterState, Hello, LoraSpec, OptimSpec, TrainJoin, encode, tensor_meta
from fedsea_shared.shard import Partition, load_config
from training.checkpoint import Checkpoints
from training.connection import ServerCheckpoint, TrainingConnection
from training.edge import EdgeTrainer
from training.federation import FinetuneConfig, run

STEPS = 6


class Crash(Exception):
    pass


def _config(out, model_dir, **kw) -> FinetuneConfig:
    base = dict(data="bbc-news", out=str(out), model=str(model_dir), steps=STEPS, batch_size=2, fedavg_every=2,
                max_train=24, max_valid=6, noise=0.0, lora=LoraSpec(rank=2), optim=OptimSpec(lr=1e-2, warmup_steps=1),
                progress=False)
    return FinetuneConfig(**{**base, **kw})


def _outcome(out) -> dict:
    """Everything a run's result is: every adapter tensor, the validation, the server's
    optimizer state of the last checkpoint."""
    report = __import__("json").loads((out / "report.json").read_text())
    _, server = Checkpoints(out / "checkpoint").load(0, STEPS)
    return {"adapter": load_file(str(out / "adapter" / "adapter_model.safetensors")), "after": report["after"],
            "server": server}


def _assert_identical(got: dict, want: dict) -> None:
    assert got["after"] == want["after"]  # validation loss, exactly
    assert got["adapter"].keys() == want["adapter"].keys()
    for name, tensor in want["adapter"].items():
        assert torch.equal(got["adapter"][name], tensor), name
    assert got["server"].adapters == want["server"].adapters
    assert torch.equal(got["server"].state, want["server"].state)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(_config(out, tiny_model_dir))
    return _outcome(out)


def _on_step(monkeypatch, step: int, action) -> None:
    """Run `action` (async) before the client's train step number `step` (0-based)."""
    original = EdgeTrainer.train_step
    calls = 0

    async def train_step(self, conn, batch, *args):
        nonlocal calls
        calls += 1
        if calls == step + 1:
            await action()
        return await original(self, conn, batch, *args)

    monkeypatch.setattr(EdgeTrainer, "train_step", train_step)


def test_resume_is_bit_identical_and_a_corrupt_checkpoint_falls_back(tmp_path, tiny_model_dir, uninterrupted, monkeypatch, caplog):
    cfg = _config(tmp_path / "run", tiny_model_dir)

    async def crash():
        raise Crash  # the client dies after step 4's checkpoint

    with monkeypatch.context() as m:
        _on_step(m, 5, crash)
        with pytest.raises(Crash):
            run(cfg)
    ckpt = Checkpoints(tmp_path / "run" / "checkpoint")
    assert ckpt.common_step(1) == 4
    _, server_at_4 = ckpt.load(0, 4)
    assert server_at_4.adapters[0].steps == 4  # the server's schedule position travels with it
    with caplog.at_level(logging.INFO):
        run(cfg)  # a fresh embedded server: the job's server state comes from the checkpoint
    assert "resuming all 1 clients from the checkpoint of step 4" in caplog.text
    _assert_identical(_outcome(tmp_path / "run"), uninterrupted)

    # A truncated latest checkpoint: a warning, and the one before is used, still exactly.
    state = tmp_path / "run" / "checkpoint" / "client0" / f"step{STEPS}" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run(cfg)
    assert "is corrupt (state.pt is missing or truncated)" in caplog.text
    assert "falling back to step 4" in caplog.text and "from the checkpoint of step 4" in caplog.text
    _assert_identical(_outcome(tmp_path / "run"), uninterrupted)
    with pytest.raises(ValueError, match="other settings"):
        run(cfg.model_copy(update={"mode": "batched"}))


def test_failover_to_the_next_server_finishes_the_job_exactly(tmp_path, tiny_model_dir, start_server, uninterrupted,
                                                             monkeypatch, caplog):
    servers = [start_server(tiny_model_dir, enable_training=True) for _ in range(2)]
    cfg = _config(tmp_path / "run", tiny_model_dir, server=[s.url for s in servers])
    urls = rendezvous(cfg.job.encode(), cfg.server)  # the job's own order of the servers
    first = next(s for s in servers if s.url == urls[0])

    async def kill_first():
        await asyncio.to_thread(first.stop)

    _on_step(monkeypatch, 3, kill_first)  # after step 2's checkpoint
    with caplog.at_level(logging.INFO):
        report = run(cfg)
    assert f"lost server {urls[0]}" in caplog.text and f"checkpoint of step 2 on {urls[1]}" in caplog.text
    assert report["train"]["steps"] == STEPS
    _assert_identical(_outcome(tmp_path / "run"), uninterrupted)


def test_a_dead_client_process_stops_the_run_within_seconds(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path / "run", tiny_model_dir, clients=2, mode="batched", steps=200)
    result: dict = {}

    def target():
        try:
            run(cfg)
        except RuntimeError as e:
            result["error"] = str(e)
        result["end"] = time.monotonic()

    runner = threading.Thread(target=target)
    runner.start()
    first_checkpoint = tmp_path / "run" / "checkpoint" / "client1" / "step2"
    while not first_checkpoint.exists() and runner.is_alive():
        time.sleep(0.1)
    victim = next(p for p in mp.active_children() if p.name == "client1")
    os.kill(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    runner.join(timeout=120)
    assert not runner.is_alive()
    assert "client1 exited with code -9" in result["error"] and "stopped the other clients" in result["error"]
    assert not (tmp_path / "run" / "report.json").exists()  # client 0 did not carry on alone
    assert result["end"] - killed < 30  # a loose bound: no barrier waited out its timeout
    # Both clients resume from one checkpoint (client 1 waits for client 0 to bring the
    # server state to the fresh embedded server), for two more steps.
    resume = Checkpoints(tmp_path / "run" / "checkpoint").common_step(2)
    report = run(cfg.model_copy(update={"steps": resume + 2}))
    assert report["train"]["steps"] == resume + 2


async def _until_metric(server, name: str, value: float) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(100):
            text = (await http.get(server.url.replace("ws://", "http://") + "/metrics")).text
            if f"{name} {value}" in text.splitlines():
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"/metrics never showed {name} {value}")


def _hello(model_dir) -> Hello:
    config = load_config(model_dir)
    return Hello(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                 layers=Partition(config.num_hidden_layers, 2, 2).server_range, dtype="float32")


async def test_a_hostile_server_state_upload_is_refused_and_the_server_keeps_serving(tiny_model_dir, start_server):
    server = start_server(tiny_model_dir, enable_training=True, max_message_bytes=256 * 1024)
    join = TrainJoin(sid=0, job="up", client=0, clients=1, lora=LoraSpec(rank=2), optim=OptimSpec(total_steps=4), round=3)
    conn = await TrainingConnection.connect(server.url, _hello(tiny_model_dir))
    values = (await conn.join(join.model_copy(update={"round": 0}))).params
    await conn.leave()

    def upload(state: torch.Tensor, name="shared", steps=2, micro=2) -> ServerCheckpoint:
        return ServerCheckpoint(2, [AdapterState(name=name, steps=steps, micro=micro)], state)

    good = torch.rand(1, 3, values) * 0.01
    nan, negative = good.clone(), good.clone()
    nan[0, 1, 5] = float("nan")
    negative[0, 2, 0] = -1.0
    refused = {
        "wrong shape": (upload(good[:, :, :-1]), "bad_tensor", "must be float32[1, 3"),
        "wrong dtype": (upload(good.bfloat16()), "bad_tensor", "got bfloat16"),
        "wrong names": (upload(good, name="c0"), "bad_tensor", "this job has ['shared']"),
        "NaN": (upload(nan), "non_finite", "NaN"),
        "negative moments": (upload(negative), "bad_tensor", "negative second moments"),
        "past the schedule": (upload(good, steps=99), "bad_frame", "of a 4-step schedule"),
    }
    for what, (state, code, message) in refused.items():
        with pytest.raises(ServerError) as e:
            await conn.join(join, resume=state)
        assert (e.value.code, message in e.value.message) == (code, True), what
    with pytest.raises(ServerError) as e:  # resuming without the state: wait for the client holding it
        await conn.join(join)
    assert e.value.code == "unknown_job"
    # Over max_message_bytes: refused before it is parsed (an error without a sid, so
    # sent raw here; the client's join would wait for a reply of its own).
    oversized = upload(torch.rand(1, 3, 30000))
    await conn.ws.send(encode(join.model_copy(update={"resume": oversized.adapters, "tensor": tensor_meta(oversized.state)}),
                              oversized.state))
    await _until_metric(server, 'fedsea_errors_total{code="too_large"}', 1.0)
    assert server.runtime.training.memory_used == 0 and not server.runtime.training.jobs
    joined = await conn.join(join, resume=upload(good))  # still serving: a sound upload is taken
    assert joined.resumed
    optimizer = server.runtime.training.jobs[(None, "up")].optimizers["shared"]
    assert optimizer.steps == 2 and torch.equal(optimizer.export_state(), good[0])
    await conn.close()

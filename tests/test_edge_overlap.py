"""The edge worker's rounds (heads then tails, one batch each, on its own thread) and the
thread policy: serial event loops, and one compute thread for both sides in `fedsea serve`."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from edge_runtime import AsyncEdgeClient
from edge_runtime.model import EdgeModel, EdgeWorker, SequenceCache
from fedsea import cli
from fedsea_shared import threads
from fedsea_shared.shard import Partition, load_config, load_edge_shard
from conftest import metric


@pytest.fixture(scope="module")
def edge_model(tiny_model_dir) -> EdgeModel:
    partition = Partition(load_config(tiny_model_dir).num_hidden_layers, 2, 2)
    return EdgeModel(load_edge_shard(tiny_model_dir, partition), partition)


@pytest.fixture
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _spy(model: EdgeModel, monkeypatch) -> list[tuple[str, int]]:
    calls: list[tuple[str, int]] = []
    for kind in ("head", "tail"):
        real = getattr(model, kind)

        def spy(items, real=real, kind=kind):
            calls.append((kind, len(items)))
            return real(items)

        monkeypatch.setattr(model, kind, spy)
    return calls


async def test_one_round_runs_queued_heads_as_one_batch_then_tails_with_the_same_results(edge_model, monkeypatch):
    alone = EdgeWorker(edge_model)
    ids = [torch.tensor([5, 6, 7]), torch.tensor([9, 10])]
    want_heads = [await alone.head(SequenceCache(), 0, x) for x in ids]
    states = torch.randn(4, want_heads[0].shape[1], generator=torch.Generator().manual_seed(0))
    want_tail = await alone.tail(SequenceCache(), 0, states)
    alone.close()

    calls = _spy(edge_model, monkeypatch)
    worker = EdgeWorker(edge_model)
    # Submitted in one event-loop iteration, as the sessions one batch of replies woke do.
    got = await asyncio.gather(worker.tail(SequenceCache(), 0, states),
                               *(worker.head(SequenceCache(), 0, x) for x in ids))
    worker.close()
    assert calls == [("head", 2), ("tail", 1)]  # heads first: the server runtime waits for them
    assert worker.stats()["batches"] == 2 and worker.stats()["max_batch_sequences"] == 2
    assert worker.stats()["rows"] == 3 + 2 + 4
    for g, w in zip(got[1:], want_heads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], want_tail, rtol=1e-5, atol=1e-5)


async def test_a_failing_batch_fails_its_requests_and_the_worker_keeps_serving(edge_model):
    worker = EdgeWorker(edge_model)
    width = (await worker.head(SequenceCache(), 0, torch.tensor([1])))[0].shape[0]
    with pytest.raises(RuntimeError):  # hidden states of the wrong width: the tail's matmul refuses
        await worker.tail(SequenceCache(), 0, torch.zeros(1, width + 1))
    logits = await worker.tail(SequenceCache(), 0, torch.zeros(1, width))
    assert logits.shape == (edge_model.shard.logits(torch.zeros(1, width)).shape[-1],)
    worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        await worker.head(SequenceCache(), 0, torch.tensor([1]))


async def test_concurrent_greedy_generations_equal_sequential_ones(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir)
    client = AsyncEdgeClient(server.url, model=str(tiny_model_dir), edge_cache_memory=0)  # default noise
    chats = [[{"role": "user", "content": f"Tell me about {t}"}] for t in ("owls", "rain", "tea", "maps")]
    alone = [(await client.generate(c, max_tokens=12, temperature=0)).token_ids for c in chats]
    together = await asyncio.gather(*(client.generate(c, max_tokens=12, temperature=0) for c in chats))
    assert [t.token_ids for t in together] == alone
    assert client.worker.stats()["max_batch_sequences"] > 1  # they did share forward passes
    await client.aclose()


def test_thread_count_comes_from_the_flag_then_the_environment_then_the_cores(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert threads.compute_threads(None) == (6, "cores")
    monkeypatch.setenv(threads.ENV, "4")
    assert threads.compute_threads(None) == (4, "$FEDSEA_THREADS")
    assert threads.compute_threads(2) == (2, "--threads")
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(threads.ENV, bad)
        with pytest.raises(ValueError, match="FEDSEA_THREADS must be a whole number"):
            threads.compute_threads(None)
    with pytest.raises(ValueError, match="--threads"):
        threads.compute_threads(0)


def _in_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("value", fn()))
    t.start()
    t.join()
    return out["value"]


@pytest.mark.skipif(threads._GOMP is None, reason="torch is not built with libgomp here")
def test_serial_makes_only_the_calling_thread_single_threaded(restore_torch_threads):
    threads.apply(2)

    def serial_then_count():
        threads.serial()
        torch.nan_to_num(torch.randn(100_000))  # above the grain size: would go parallel
        return torch.get_num_threads()

    assert _in_thread(serial_then_count) == 1
    assert torch.get_num_threads() == 2 and _in_thread(torch.get_num_threads) == 2


def test_the_compute_thread_runs_work_in_order_and_hands_back_results_and_errors():
    compute = threads.ComputeThread()
    try:
        names = [compute.run(lambda: threading.current_thread().name) for _ in range(3)]
        assert names == ["fedsea-compute"] * 3
        with pytest.raises(ZeroDivisionError):
            compute.run(lambda: 1 / 0)
        assert compute.run(sum, [1, 2, 3]) == 6  # an error does not stop it
    finally:
        compute.close()


async def test_a_worker_given_a_compute_thread_runs_its_batches_there(edge_model, restore_torch_threads):
    threads.apply(2)
    compute = threads.ComputeThread()
    ran_on: list[str] = []

    def run(fn, *args):
        ran_on.append(compute.run(lambda: threading.current_thread().name))
        return compute.run(fn, *args)

    alone, shared = EdgeWorker(edge_model), EdgeWorker(edge_model, compute=run)
    ids = torch.tensor([5, 6, 7])
    torch.testing.assert_close(await shared.head(SequenceCache(), 0, ids), await alone.head(SequenceCache(), 0, ids))
    assert len(ran_on) == 2 and set(ran_on) == {"fedsea-compute"}  # the kernel warm-up, then the batch
    assert shared.stats()["intra_op_threads"] == 2  # the compute thread's count
    for w in (alone, shared):
        w.close()
    compute.close()


async def test_generations_that_start_apart_are_stepped_together_in_one_frame(start_server, tiny_model_dir):
    """A generation that starts while another is decoding joins the decode loop's next
    iteration: from then on both go in every head batch, Step frame and tick, with no
    timer deciding it (each iteration's rows are counted by the client, each tick's by
    the server)."""
    server = start_server(tiny_model_dir)
    client = AsyncEdgeClient(server.url, model=str(tiny_model_dir), edge_cache_memory=0, noise=0.0)
    no_eos = {t: -100.0 for t in client.eos_ids}  # every generation runs to max_tokens
    chats = [[{"role": "user", "content": f"Tell me about {t}"}] for t in ("owls", "rain", "tea", "maps")]
    first_events: list = []

    async def first():
        async for event in client.stream(chats[0], max_tokens=40, temperature=0, logit_bias=no_eos):
            first_events.append(event)

    lead = asyncio.ensure_future(first())
    while len(first_events) < 5:
        await asyncio.sleep(0.01)
    rest = await asyncio.gather(*(client.generate(c, max_tokens=20, temperature=0, logit_bias=no_eos) for c in chats[1:]))
    await lead
    assert [len(r.token_ids) for r in rest] == [20, 20, 20] and len(first_events) == 40
    stats = client.stats()["decode"]
    assert stats["max_rows"] == 4
    # Rows of every iteration: 40 + 3 * 20, minus each generation's first token (sampled
    # from its prompt's logits, stepped on with the others).  Had the three latecomers
    # formed a second group, there would be ~20 more iterations than the lead needs alone.
    assert stats["rows"] == 40 + 3 * 20 - 4
    assert stats["iterations"] <= 39 + 3
    await client.aclose()


async def test_split_generation_on_one_compute_thread_equals_separate_threads(tiny_model_dir):
    from server_runtime.app import ServerSettings, ServerThread

    chats = [[{"role": "user", "content": f"Tell me about {t}"}] for t in ("owls", "rain", "tea")]

    async def generate(compute) -> list[list[int]]:
        server = ServerThread(ServerSettings(model=str(tiny_model_dir), port=0), compute)
        client = AsyncEdgeClient(server.url, model=str(tiny_model_dir), edge_cache_memory=0, compute=compute)
        try:
            done = await asyncio.gather(*(client.generate(c, max_tokens=10, temperature=0) for c in chats))
            return [d.token_ids for d in done]
        finally:
            await client.aclose()
            server.stop()

    separate = await generate(threads.run_here)
    compute = threads.ComputeThread()
    try:
        assert await generate(compute.run) == separate
    finally:
        compute.close()


def test_serve_runs_both_sides_on_one_compute_thread_of_the_flag_s_size(tiny_model_dir, monkeypatch, caplog,
                                                                       restore_torch_threads):
    import gateway

    seen = {}

    def fake_gateway(settings, log_level):  # stands in for the edge and the API
        seen["threads"] = settings.edge.compute(torch.get_num_threads)
        seen["thread"] = settings.edge.compute(lambda: threading.current_thread().name)

    monkeypatch.setattr(gateway, "run_gateway", fake_gateway)
    with caplog.at_level(logging.INFO, logger="fedsea"):
        cli.main(["serve", "--model", str(tiny_model_dir), "--threads", "3"])
    assert seen == {"threads": 3, "thread": "fedsea-compute"}
    assert "torch intra-op threads: 3 on the compute thread of both sides (--threads)" in caplog.text
    with pytest.raises(SystemExit, match="--threads must be a whole number"):
        cli.main(["serve", "--model", str(tiny_model_dir), "--threads", "0"])


def test_closing_the_compute_thread_waits_for_the_pass_in_flight_then_refuses_more():
    compute = threads.ComputeThread()
    started, done = threading.Event(), []

    def slow_pass():
        started.set()
        time.sleep(0.3)
        done.append(True)

    caller = threading.Thread(target=compute.run, args=(slow_pass,))
    caller.start()
    assert started.wait(10)
    compute.close()
    assert done == [True]  # close returned after the pass, not while it ran
    with pytest.raises(RuntimeError, match="closed"):
        compute.run(lambda: None)
    caller.join(10)


def test_a_process_closing_its_edge_worker_during_the_kernel_warm_up_exits_cleanly(tiny_model_dir):
    # The worker builds its kernels on the compute thread as it starts; exiting while that
    # (or any pass) ran inside a torch op used to abort the process (exit status 134).
    script = f"""
from fedsea_shared import threads
from fedsea_shared.shard import Partition, apply_linear_kernel, load_config, load_edge_shard
from edge_runtime.model import EdgeModel, EdgeWorker
p = Partition(load_config({str(tiny_model_dir)!r}).num_hidden_layers, 2, 2)
shard = load_edge_shard({str(tiny_model_dir)!r}, p)
apply_linear_kernel(shard, "auto", "cpu")
compute = threads.ComputeThread()
worker = EdgeWorker(EdgeModel(shard, p), compute=compute.run)
worker.close()
compute.close()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=str(Path(__file__).resolve().parent.parent))
    assert done.returncode == 0, done.stderr[-2000:]


async def test_streams_dropped_mid_generation_leave_no_stray_replies_and_free_their_sessions(start_server, tiny_model_dir,
                                                                                              caplog):
    """A consumer that goes away mid-stream abandons its generation's step in flight: its
    late reply is dropped quietly (not logged as a server fault), its session is closed on
    the server, and the others keep generating."""
    server = start_server(tiny_model_dir)
    client = AsyncEdgeClient(server.url, model=str(tiny_model_dir), edge_cache_memory=0)
    no_eos = {t: -100.0 for t in client.eos_ids}
    kept: list = []

    async def consume(i: int, sink: list | None = None):
        async for event in client.stream([{"role": "user", "content": f"Tell me about {i}"}], max_tokens=60,
                                         temperature=0, logit_bias=no_eos):
            if sink is not None:
                sink.append(event)

    with caplog.at_level(logging.WARNING):
        steady = asyncio.ensure_future(consume(99, kept))
        for trial in range(5):
            dropped = asyncio.ensure_future(consume(trial))
            await asyncio.sleep(0.15 + 0.04 * trial)
            dropped.cancel()
            await asyncio.gather(dropped, return_exceptions=True)
        await steady
    assert len(kept) == 60
    deadline = time.monotonic() + 20  # the dropped requests' sessions close as their tasks unwind
    while await asyncio.to_thread(metric, server.url, "fedsea_sessions") != 0:
        assert time.monotonic() < deadline, "the dropped requests' sessions stayed open on the server"
        await asyncio.sleep(0.05)
    faults = [r.getMessage() for r in caplog.records if r.name.startswith("fedsea.edge") or r.levelno >= logging.ERROR]
    assert not faults, faults
    await client.aclose()

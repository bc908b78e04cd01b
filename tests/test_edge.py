"""Edge runtime: sampling, text output, session recovery."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from edge_runtime import AsyncEdgeClient
from edge_runtime.sampling import NUCLEUS_CANDIDATES, SamplingParams, sample
from edge_runtime.text import IncrementalDetokenizer, StopMatcher
from conftest import eventually, metric

EMPTY = torch.tensor([], dtype=torch.long)


def draw(logits, n=400, **kw):
    params = SamplingParams(**kw)
    gen = torch.Generator().manual_seed(0)
    return [sample(logits.clone(), params, gen, EMPTY, EMPTY).token_id for _ in range(n)]


def test_greedy_top_k_top_p():
    logits = torch.tensor([0.0, 3.0, 2.9, 1.0, -5.0])
    assert set(draw(logits, 20, temperature=0)) == {1}
    assert set(draw(logits, temperature=1.0, top_k=2)) == {1, 2}
    # p(1) ~ 0.45, p(2) ~ 0.41: top_p=0.5 keeps tokens until 0.5 is reached -> {1, 2}
    assert set(draw(logits, temperature=1.0, top_p=0.5)) == {1, 2}
    assert set(draw(logits, temperature=1.0, top_p=0.3)) == {1}
    assert 4 not in draw(logits, temperature=1.0)  # p ~ 2e-4: never in 400 draws (seeded)


def test_draws_follow_the_distribution_and_a_wide_nucleus_is_found_past_the_candidates():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0, 2.2])
    counts = torch.bincount(torch.tensor(draw(logits, 20000, temperature=1.0)), minlength=5) / 20000
    torch.testing.assert_close(counts, torch.softmax(logits, 0), atol=0.015, rtol=0)  # seeded: 4+ sigma
    # 2000 nearly flat logits, best first: top_p=0.5 keeps about the first thousand, more
    # than the candidates the nucleus is looked for among first.
    flat = torch.linspace(0.0, -0.01, 2000)
    ids = torch.tensor(draw(flat, 2000, temperature=1.0, top_p=0.5))
    assert ids.max() < 1010 and ids.max() > NUCLEUS_CANDIDATES


def test_sampling_starts_no_thread_on_a_thread_kept_out_of_openmp():
    """A worker started from the event loop's thread makes the serving thread's OpenMP team
    sleep between parallel regions (fedsea_shared.threads): torch's logsumexp did, over a
    vocabulary's logits, and a one-client step went from 31 to 44 ms.  In a fresh process, so
    no other test's threads come and go meanwhile."""
    code = """
import os, torch
from fedsea_shared import threads
from edge_runtime.sampling import SamplingParams, sample
torch.set_num_threads(2)
threads.serial()
logits, none = torch.randn(49152) * 3, torch.tensor([], dtype=torch.long)
before = len(os.listdir("/proc/self/task"))
for kw in ({"temperature": 0}, {"temperature": 0, "logprobs": 5}, {"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9},
           {"temperature": 1.0, "top_k": 40, "presence_penalty": 1.0, "repetition_penalty": 1.2}):
    sample(logits, SamplingParams(**kw), torch.Generator().manual_seed(0), torch.tensor([5, 7]), torch.tensor([9]))
print(len(os.listdir("/proc/self/task")) - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def test_seed_reproduces_and_temperature_spreads():
    logits = torch.randn(100)
    assert draw(logits, 50, temperature=1.0) == draw(logits, 50, temperature=1.0)
    assert len(set(draw(logits, 200, temperature=2.0))) > len(set(draw(logits, 200, temperature=0.3)))


def test_penalties():
    logits = torch.tensor([2.0, 1.9, 0.0])
    params = SamplingParams(temperature=0, frequency_penalty=0.5)
    generated = torch.tensor([0])
    assert sample(logits, params, None, EMPTY, generated).token_id == 1
    params = SamplingParams(temperature=0, repetition_penalty=1.2)
    assert sample(logits, params, None, torch.tensor([0]), EMPTY).token_id == 1  # 2.0/1.2 < 1.9
    params = SamplingParams(temperature=0, presence_penalty=-1.0)  # negative: encourages
    assert sample(torch.tensor([2.0, 1.9]), params, None, EMPTY, torch.tensor([1])).token_id == 1


def test_logprobs_are_log_softmax_of_the_logits():
    logits = torch.randn(50)
    s = sample(logits, SamplingParams(temperature=0, logprobs=3), None, EMPTY, EMPTY)
    ref = torch.log_softmax(logits, -1)
    assert s.logprob == pytest.approx(float(ref.max()), abs=1e-6)
    assert [i for i, _ in s.top] == torch.topk(ref, 3).indices.tolist()


@pytest.mark.parametrize("bad", [dict(temperature=3), dict(top_p=0), dict(max_tokens=0),
                                 dict(top_k=-1), dict(presence_penalty=3), dict(logprobs=21)])
def test_invalid_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).validate()


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(str(default_model_dir))


def test_detokenizer_never_emits_broken_utf8(tokenizer):
    text = "Crème brûlée 🍮 costs 5€ — 東京 🇯🇵!"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces)  # some tokens are partial characters


@pytest.mark.parametrize(
    "chunks, stops, emitted, stopped",
    [
        (["Hello wo", "rld. END", " more"], ["END"], "Hello world. ", True),
        (["ab", "c<", "|st", "op|>x"], ["<|stop|>"], "abc", True),
        (["a<", "b"], ["<|"], "a<b", False),  # held back, then released
        (["x", "y"], [], "xy", False),
    ],
)
def test_stop_strings_across_token_boundaries(chunks, stops, emitted, stopped):
    m = StopMatcher(stops)
    out, hit = "", False
    for c in chunks:
        text, hit = m.push(c)
        out += text
        if hit:
            break
    if not hit:
        out += m.flush()
    assert (out, hit) == (emitted, stopped)


async def test_session_recovers_after_the_connection_drops(start_server, tiny_model_dir):
    """The edge replays what it sent on a new connection: the output is unchanged."""
    server = start_server(tiny_model_dir)
    client = AsyncEdgeClient(server.url, model=str(tiny_model_dir), noise=0.0)
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    expected = (await client.generate(messages, max_tokens=12, temperature=0)).token_ids
    got = []
    async for event in client.stream(messages, max_tokens=12, temperature=0):
        got.append(event.token_id)
        if len(got) in (3, 7):
            await (await client.connection()).ws.close()  # the network drops
    assert got == expected
    await client.aclose()
    await eventually(lambda: metric(server.url, "fedsea_kv_blocks_used") == 0, what="freeing the KV blocks")


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
async def test_half_precision_wire(start_server, record, tiny_model_dir, wire_dtype):
    """The negotiated wire dtype is what travels; the split still generates."""
    relay = record(start_server(tiny_model_dir))
    seen = relay.frames
    client = AsyncEdgeClient(relay.url, model=str(tiny_model_dir), noise=0.0, wire_dtype=wire_dtype)
    out = await client.generate([{"role": "user", "content": "hello"}], max_tokens=5, temperature=0)
    assert out.completion_tokens == 5
    steps = [f for f in seen if b'"step"' in f[:100]]
    assert steps and all(f'"dtype":"{wire_dtype}"'.encode() in f[:200] for f in steps)
    await client.aclose()


async def test_edge_worker_batches_concurrent_generations(start_server, tiny_model_dir):
    """Concurrent generations share head/tail forward passes instead of one each."""
    server = start_server(tiny_model_dir)
    client = AsyncEdgeClient(server.url, model=str(tiny_model_dir), noise=0.0)
    model = client.worker.model
    calls = {"head": [], "tail": []}
    for kind in calls:
        real = getattr(model, kind)

        def spy(items, real=real, kind=kind):
            calls[kind].append(len(items))
            return real(items)

        setattr(model, kind, spy)
    chats = [[{"role": "user", "content": f"Story number {i}"}] for i in range(8)]
    results = await asyncio.gather(*(client.generate(c, max_tokens=6, temperature=0) for c in chats))
    assert all(r.completion_tokens == 6 for r in results)
    assert sum(calls["tail"]) == 8 * 6  # every sequence's tail ran once per token...
    assert len(calls["tail"]) < 8 * 6 / 2  # ...in far fewer forward passes
    assert max(calls["head"]) > 1
    await client.aclose()


async def test_the_edge_refuses_what_the_servers_limits_would_with_typed_errors(start_server, tiny_model_dir):
    """The Welcome's limits are checked on the edge, before anything is sent: a prompt and
    max_tokens past the context, a noise outside the bounds; max_tokens=None fills the context."""
    from edge_runtime.connection import ServerError
    from server_runtime.engine import EngineSettings

    server = start_server(tiny_model_dir, noise_max=1.0, engine=EngineSettings(max_context=64))
    client = AsyncEdgeClient(server.url, model=str(tiny_model_dir), noise=0.0)
    prompt = list(range(100, 150))
    try:
        with pytest.raises(ServerError) as e:
            await anext(client.stream_tokens(prompt, SamplingParams(max_tokens=15)))
        assert e.value.code == "context_overflow" and "maximum context length is 64 tokens; the prompt has 50 and 15" in e.value.message
        with pytest.raises(ServerError) as e:
            await anext(client.stream_tokens(prompt, SamplingParams(max_tokens=4), noise=2.0))
        assert e.value.code == "noise_out_of_bounds"
        events = [e async for e in client.stream_tokens(prompt, SamplingParams(max_tokens=None, temperature=0))]
        assert len(events) == 14 and events[-1].finish_reason == "length"
    finally:
        await client.aclose()

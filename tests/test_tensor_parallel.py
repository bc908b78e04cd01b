"""Tensor-parallel middle blocks (issue 28, item 2): a server on 2 gloo ranks on 127.0.0.1
computes what a server of one rank and transformers compute, through prefix hits, forks
and preemption; a dead or hung rank makes it unhealthy and its edges go on elsewhere."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import Future

import httpx
import orjson
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model, spy_safetensors
from edge_runtime import AsyncEdgeClient
from fedsea_shared.layers.tensor_parallel import TensorSplit
from fedsea_shared.shard import Partition, load_config, load_server_shard
from gateway import GatewaySettings, GatewayThread
from server_runtime.kv_pool import KVPool
from conftest import metric

HIDDEN = 64
LAYERS = 2  # the tiny model's middle blocks at head 2, tail 2
LOGPROB_ATOL = 1e-3
CHATS = [[{"role": "user", "content": "Tell me about the sea."}],
         [{"role": "user", "content": "Write a poem about bread."}]]
# KV heads of the tiny 4-head model: each rank holds one (2: a share; 1: a copy).
KV_HEADS = [pytest.param(2, id="4-heads-2-kv"), pytest.param(1, id="4-heads-1-kv")]


def pool_memory(blocks: int, kv_heads: int) -> str:
    """--kv-cache-memory for a pool of `blocks` blocks (the scratch block on top) of a rank
    holding `kv_heads` KV heads."""
    return str((blocks + 1) * KVPool.bytes_per_block(LAYERS, 16, kv_heads, HIDDEN // 4, torch.float32))


def wait(fut: Future, timeout: float = 60):
    return fut.result(timeout=timeout)


def rank_processes() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("fedsea-rank-")]


def health(server) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def poll(condition, deadline: float, what: str) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline}s: {what}")
        time.sleep(0.1)


@pytest.fixture(scope="class", params=KV_HEADS)
def servers(request, tmp_path_factory, default_model_dir):
    """A tiny model with that many KV heads, a 2-rank server and a 1-rank one over it, each
    with a pool of 8 blocks (tight enough to preempt)."""
    from server_runtime.app import ServerSettings, ServerThread
    from server_runtime.engine import EngineSettings

    kv = request.param
    model = make_tiny_model(tmp_path_factory.mktemp(f"tiny-kv{kv}"), default_model_dir, num_key_value_heads=kv)
    started = []
    for ranks, memory in ((2, pool_memory(8, 1)), (1, pool_memory(8, kv))):
        started.append(ServerThread(ServerSettings(
            model=str(model), port=0, kv_cache_memory=memory, kv_quota=1.0, tensor_parallel=ranks,
            engine=EngineSettings())))
    yield model, *started
    for server in started:
        server.stop()


@pytest.fixture(scope="class")
def reference(servers):
    return AutoModelForCausalLM.from_pretrained(servers[0], dtype=torch.float32).eval()


def test_each_rank_holds_its_heads_and_reads_only_its_slice(tiny_model_dir, monkeypatch):
    config = load_config(tiny_model_dir)
    assert [TensorSplit.of(config, r, 2).kv_heads for r in (0, 1)] == [(0, 1), (1, 2)]
    config.num_key_value_heads = 1
    assert [TensorSplit.of(config, r, 2).kv_heads for r in (0, 1)] == [(0, 1), (0, 1)]  # replicated
    config.num_attention_heads, config.num_key_value_heads, config.intermediate_size = 9, 3, 1536
    with pytest.raises(ValueError, match="must divide the model's 9 attention heads"):
        TensorSplit.of(config, 0, 2)
    assert [TensorSplit.of(config, r, 3).q_heads for r in range(3)] == [(0, 3), (3, 6), (6, 9)]

    partition = Partition(6, 2, 2)
    whole = load_server_shard(tiny_model_dir, partition).state_dict()
    import fedsea_shared.loading as loading

    read = spy_safetensors(monkeypatch, loading)
    split = TensorSplit.of(load_config(tiny_model_dir), 1, 2)
    part = load_server_shard(tiny_model_dir, partition, split=split).state_dict()
    assert read and all(n.endswith("layernorm.weight") for n in read)  # only the norms are read whole
    d = HIDDEN // 4
    for layer in partition.server_layers:
        p = f"model.layers.{layer}."
        assert torch.equal(part[p + "self_attn.q_proj.weight"], whole[p + "self_attn.q_proj.weight"][2 * d: 4 * d])
        assert torch.equal(part[p + "self_attn.k_proj.weight"], whole[p + "self_attn.k_proj.weight"][d: 2 * d])
        assert torch.equal(part[p + "self_attn.o_proj.weight"], whole[p + "self_attn.o_proj.weight"][:, 2 * d: 4 * d])
        assert torch.equal(part[p + "mlp.down_proj.weight"], whole[p + "mlp.down_proj.weight"][:, 64:])


class TestAgainstOneRank:
    """One 2-rank server per config at a time (a process holds one torch.distributed group),
    stopped before the tests below start their own."""

    async def test_greedy_tokens_equal_one_rank_and_transformers(self, servers, reference):
        model, tp, one = servers
        got = {}
        for name, server in (("tp", tp), ("one", one)):
            client = AsyncEdgeClient(server.url, model=str(model), noise=0.0, edge_cache_memory=0)
            got[name] = [await client.generate(chat, max_tokens=24, temperature=0, logprobs=5) for chat in CHATS]
            ids = [client.chat_prompt(chat) for chat in CHATS]
            await client.aclose()
        for prompt, tp_out, one_out in zip(ids, got["tp"], got["one"]):
            with torch.no_grad():
                out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                         max_new_tokens=24, do_sample=False, output_logits=True,
                                         return_dict_in_generate=True)
            expected = out.sequences[0, len(prompt):].tolist()
            assert tp_out.token_ids == one_out.token_ids == expected
            for event, logits in zip(tp_out.events, out.logits):
                top = torch.topk(torch.log_softmax(logits[0].float(), -1), 5)
                assert [i for i, _ in event.top_logprobs] == top.indices.tolist()
                assert max(abs(v - r) for (_, v), r in zip(event.top_logprobs, top.values.tolist())) < LOGPROB_ATOL
        text = (await httpx.AsyncClient().get(f"http://127.0.0.1:{tp.port}/metrics")).text
        assert "fedsea_tensor_parallel_ranks 2.0" in text
        assert metric(tp, "fedsea_tensor_parallel_allreduce_bytes_total") > 0
        assert metric(tp, "fedsea_tensor_parallel_broadcast_bytes_total") > 0


    async def test_a_conversations_next_turn_hits_the_prefix_cache_and_stays_exact(self, servers):
        model, tp, one = servers
        turns = {}
        for name, server in (("tp", tp), ("one", one)):
            client = AsyncEdgeClient(server.url, model=str(model), noise=0.0)  # it keeps turn 1's states: names the prefix
            first = await client.generate(CHATS[0], max_tokens=8, temperature=0)
            before = metric(server, "fedsea_prefix_cache_hit_tokens_total")
            chat = CHATS[0] + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
            turns[name] = (await client.generate(chat, max_tokens=8, temperature=0)).token_ids
            assert metric(server, "fedsea_prefix_cache_hit_tokens_total") > before, name
            await client.aclose()
        assert turns["tp"] == turns["one"]


    def test_a_fork_copies_its_shared_block_on_write_on_every_rank(self, servers):
        _, tp, one = servers
        torch.manual_seed(1)
        prompt, a, b = torch.randn(20, HIDDEN), torch.randn(1, HIDDEN), torch.randn(1, HIDDEN)
        outputs = {}
        for name, server in (("tp", tp), ("one", one)):
            engine = server.runtime.engine
            wait(engine.open(("fork", 0)))
            wait(engine.step(("fork", 0), 0, prompt))
            wait(engine.fork(("fork", 1), ("fork", 0)))
            outputs[name] = [wait(engine.step(("fork", 0), 20, a)), wait(engine.step(("fork", 1), 20, b))]
            for i in (0, 1):
                wait(engine.close(("fork", i)))
        for got, expected in zip(outputs["tp"], outputs["one"]):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(outputs["tp"][0], outputs["tp"][1])


    async def test_a_preempted_generation_replays_to_the_same_tokens(self, servers):
        model, tp, one = servers
        params = dict(max_tokens=60, temperature=0)
        alone = AsyncEdgeClient(one.url, model=str(model), noise=0.0, edge_cache_memory=0)
        expected = [(await alone.generate(chat, **params)).token_ids for chat in CHATS]
        await alone.aclose()
        before = metric(tp, "fedsea_preemptions_total")
        client = AsyncEdgeClient(tp.url, model=str(model), noise=0.0, edge_cache_memory=0)
        first = client.stream(CHATS[0], **params)
        got = [[(await anext(first)).token_id], []]
        second = asyncio.create_task(client.generate(CHATS[1], **params))
        async for event in first:
            got[0].append(event.token_id)
        got[1] = (await second).token_ids
        await client.aclose()
        assert got == expected
        assert metric(tp, "fedsea_preemptions_total") > before


@pytest.mark.parametrize("fmt", ["int8", "int4"])
async def test_quantized_middle_blocks_on_two_ranks_match_one_rank(tiny_model_dir, start_server, fmt):
    """Each rank quantizes its own slice (no dense weights, so no linear kernel to share): the
    2-rank server's greedy tokens and top logprobs are the 1-rank server's, to bf16 rounding
    (the kernels compute in bf16, and the ranks sum their halves in another order)."""
    got, blocks = {}, {}
    for ranks in (2, 1):
        server = start_server(tiny_model_dir, tensor_parallel=ranks, kv_cache_memory="8MiB", weights=fmt)
        blocks[ranks] = metric(server, "fedsea_kv_blocks_free") + metric(server, "fedsea_kv_blocks_used")
        client = AsyncEdgeClient(server.url, model=str(tiny_model_dir), noise=0.0, weights=fmt, edge_cache_memory=0)
        got[ranks] = await client.generate(CHATS[1], max_tokens=8, temperature=0, logprobs=5)
        await client.aclose()
    # Every rank stores its half of the KV heads in the same (bfloat16) dtype: twice the blocks.
    assert blocks[2] in (2 * blocks[1], 2 * blocks[1] + 1)
    assert got[2].token_ids == got[1].token_ids
    for two, one in zip(got[2].events, got[1].events):
        assert max(abs(a - b) for (_, a), (_, b) in zip(two.top_logprobs, one.top_logprobs)) < 0.05


def test_training_on_a_tensor_parallel_server_is_refused_clearly(tiny_model_dir, start_server):
    before = rank_processes()
    with pytest.raises(ValueError, match="tensor-parallel server does not train"):
        start_server(tiny_model_dir, tensor_parallel=2, enable_training=True)
    assert rank_processes() == before  # refused before any rank started


def test_a_killed_rank_fails_health_and_the_gateway_finishes_the_stream_elsewhere(tiny_model_dir, start_server):
    ranks_before = set(rank_processes())
    tp = start_server(tiny_model_dir, tensor_parallel=2, kv_cache_memory="4MiB")
    other = start_server(tiny_model_dir, kv_cache_memory="4MiB")
    gw = GatewayThread(GatewaySettings.of(server_url=[tp.url, other.url], model=str(tiny_model_dir), port=0, noise=0.0))
    try:
        gw.wait_ready()
        # A conversation goes where its affinity key sends it: find one that the tensor-parallel
        # server serves (each has even odds; 20 all missing it: one in a million).
        for i in range(20):
            messages = [{"role": "user", "content": f"{CHATS[0][0]['content']} ({i})"}]
            body = {"model": gw.settings.edge.model_id, "messages": messages, "max_tokens": 30, "temperature": 0}
            before = metric(other, "fedsea_tokens_total")
            expected = httpx.post(f"{gw.url}/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"]
            if metric(other, "fedsea_tokens_total") == before:
                break
        assert metric(other, "fedsea_tokens_total") == before and health(tp) == 200
        before = metric(other, "fedsea_tokens_total")
        (rank,) = set(rank_processes()) - ranks_before
        text, events = "", 0
        with httpx.stream("POST", f"{gw.url}/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if not line or line == "data: [DONE]":
                    continue
                events += 1
                text += orjson.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                if events == 3:
                    os.kill(rank.pid, signal.SIGKILL)
        assert text == expected
        assert metric(other, "fedsea_tokens_total") > before  # it finished there
        poll(lambda: health(tp) == 503, 10, "/health fails after a rank died")
    finally:
        gw.stop()


def test_a_hung_rank_makes_the_server_unhealthy_within_the_timeout(tiny_model_dir, start_server):
    ranks_before = set(rank_processes())
    tp = start_server(tiny_model_dir, tensor_parallel=2, kv_cache_memory="4MiB", tensor_parallel_timeout=3.0)
    (rank,) = set(rank_processes()) - ranks_before
    os.kill(rank.pid, signal.SIGSTOP)
    try:
        engine = tp.runtime.engine
        wait(engine.open(("hung", 0)))
        engine.step(("hung", 0), 0, torch.randn(3, HIDDEN))  # waits on the stopped rank: never answered
        poll(lambda: health(tp) == 503, 15, "/health fails once a collective timed out")
        assert metric(tp, "fedsea_tensor_parallel_healthy") == 0
    finally:
        os.kill(rank.pid, signal.SIGCONT)


def test_an_idle_server_stays_healthy_past_its_timeout(tiny_model_dir, start_server):
    tp = start_server(tiny_model_dir, tensor_parallel=2, kv_cache_memory="4MiB", tensor_parallel_timeout=1.0)
    time.sleep(3)  # idle for three timeouts: the keep-alives, not ticks, keep the ranks in touch
    engine = tp.runtime.engine
    wait(engine.open(("idle", 0)))
    assert wait(engine.step(("idle", 0), 0, torch.randn(3, HIDDEN))).shape == (3, HIDDEN)
    assert health(tp) == 200

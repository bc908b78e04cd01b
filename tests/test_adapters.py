"""Serving fine-tuned LoRA adapters next to the base model (tiny random model): split
greedy generation with an adapter equals `transformers` on the peft-merged full model,
each side reads only its own blocks' LoRA tensors, and unknown or unfitting adapters are
refused clearly."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, LlamaForCausalLM
from websockets.asyncio.client import connect

import fedsea_shared.adapters as adapters_mod
from edge_runtime import AsyncEdgeClient, ServerError
from fedsea import cli
from edge_runtime.sampling import SamplingParams
from fedsea_shared.adapters import LoraAdapter, merged_shard, parse_adapter_args
from fedsea_shared.protocol import Error, Hello, LoraSpec, Open, Opened, OptimSpec, Welcome, decode, encode
from fedsea_shared.shard import Partition, causal_attention, fuse_projections, load_edge_shard, load_server_shard
from gateway import GatewaySettings, GatewayThread
from server_runtime.process import _healthy, free_port
from training.federation import FinetuneConfig, run
from conftest import make_tiny_model, spy_safetensors

NAME = "tiny-lora"
PROMPTS = [[1, 504, 3622, 314, 253, 1345], [1, 2030, 1095, 36, 9012]]
NEW_TOKENS = 12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _save_lora(model_dir, out, seed=1, **kw):
    """A peft LoRA adapter of the full model with non-zero B (so it changes the output)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **kw)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return _save_lora(tiny_model_dir, tmp_path_factory.mktemp("adapters") / NAME)


def _reference(model, prompt):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def references(tiny_model_dir, adapter_dir):
    base = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    expected = {None: [_reference(base, p) for p in PROMPTS]}
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model_dir), str(adapter_dir)).merge_and_unload().eval()
    expected[NAME] = [_reference(merged, p) for p in PROMPTS]
    assert expected[NAME] != expected[None], "the adapter should change the output"
    return expected


async def _generate(client, prompt, adapter):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    return [e.token_id async for e in client.stream_tokens(prompt, params, adapter=adapter)]


async def test_split_greedy_with_adapter_equals_peft_merged_model(tiny_model_dir, adapter_dir, references, start_server):
    server = start_server(tiny_model_dir, adapters={NAME: str(adapter_dir)})
    client = AsyncEdgeClient(server.url, model=str(tiny_model_dir), head=2, tail=2, noise=0.0, adapters={NAME: str(adapter_dir)})
    try:
        # Base and adapter sessions interleaved in the same ticks: one forward per model.
        jobs = [(p, a) for a in (None, NAME) for p in range(len(PROMPTS))]
        got = await asyncio.gather(*(_generate(client, PROMPTS[p], a) for p, a in jobs))
        for (p, a), tokens in zip(jobs, got):
            assert tokens == references[a][p], f"adapter={a} prompt={p}"
        assert client.connected
    finally:
        await client.aclose()


async def test_unknown_adapter_is_refused_and_the_connection_keeps_serving(tiny_model_dir, adapter_dir, start_server):
    server = start_server(tiny_model_dir, adapters={NAME: str(adapter_dir)})
    async with connect(server.url) as ws:
        await ws.send(encode(Hello(num_layers=6, hidden_size=64, layers=(2, 4), dtype="float32")))
        welcome, _ = decode(await ws.recv())
        assert isinstance(welcome, Welcome) and welcome.adapters == [NAME]
        await ws.send(encode(Open(sid=1, noise=0.0, adapter="nope")))
        error, _ = decode(await ws.recv())
        assert isinstance(error, Error) and error.code.value == "unknown_adapter" and error.sid == 1 and not error.fatal
        assert "nope" in error.message and NAME in error.message
        await ws.send(encode(Open(sid=1, noise=0.0, adapter=NAME)))
        opened, _ = decode(await ws.recv())
        assert isinstance(opened, Opened)

    # An edge loaded with an adapter the server lacks gets a clear error before any step.
    plain = start_server(tiny_model_dir)
    client = AsyncEdgeClient(plain.url, model=str(tiny_model_dir), noise=0.0, adapters={NAME: str(adapter_dir)})
    try:
        with pytest.raises(ServerError, match="does not serve adapter") as e:
            await _generate(client, PROMPTS[0], NAME)
        assert e.value.code == "unknown_adapter"
        with pytest.raises(ValueError, match="no adapter 'other'"):
            await _generate(client, PROMPTS[0], "other")
        assert len(await _generate(client, PROMPTS[0], None)) >= 1
    finally:
        await client.aclose()


def test_gateway_lists_and_serves_adapters_by_model_name(tiny_model_dir, adapter_dir, references, start_server):
    server = start_server(tiny_model_dir, adapters={NAME: str(adapter_dir)})
    gw = GatewayThread(GatewaySettings.of(server_url=server.url, model=str(tiny_model_dir), port=0, noise=0.0,
                                       adapters={NAME: str(adapter_dir)}))
    try:
        gw.wait_ready()
        base_id = gw.settings.edge.model_id
        models = httpx.get(f"{gw.url}/models").json()
        assert [m["id"] for m in models["data"]] == [base_id, NAME]
        assert httpx.get(f"{gw.url}/models/{NAME}").json()["id"] == NAME
        for model, key in ((base_id, None), (NAME, NAME)):
            body = {"model": model, "prompt": PROMPTS[0], "max_tokens": NEW_TOKENS, "temperature": 0}
            r = httpx.post(f"{gw.url}/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == model
            expected = gw.backend.client.tokenizer.decode(references[key][0], skip_special_tokens=True)
            assert r.json()["choices"][0]["text"] == expected
        r = httpx.post(f"{gw.url}/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    finally:
        gw.stop()


def test_each_side_reads_only_its_own_lora_tensors_and_shares_the_rest(tiny_model_dir, adapter_dir, monkeypatch):
    read = spy_safetensors(monkeypatch, adapters_mod)
    partition = Partition(6, 2, 2)
    adapter = LoraAdapter.read(adapter_dir)
    for load, layers in ((load_server_shard, {2, 3}), (load_edge_shard, {0, 1, 4, 5})):
        read.clear()
        base = load(tiny_model_dir, partition)
        merged = merged_shard(base, adapter)
        assert {int(k.split(".")[4]) for k in read} == layers
        assert len(read) == 2 * len(TARGETS) * len(layers)
        for i in layers:
            b, m = base.model.layers[str(i)], merged.model.layers[str(i)]
            assert not torch.equal(b.self_attn.q_proj.weight, m.self_attn.q_proj.weight)
            # Untouched tensors are the base shard's own, not copies.
            assert m.mlp.gate_proj.weight.data_ptr() == b.mlp.gate_proj.weight.data_ptr()
            assert m.input_layernorm.weight.data_ptr() == b.input_layernorm.weight.data_ptr()
        if hasattr(base, "lm_head"):
            assert merged.model.embed_tokens.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
            assert merged.lm_head.weight is merged.model.embed_tokens.weight


def test_fusing_a_merged_shard_with_its_base_shares_the_groups_the_adapter_left_alone(tiny_model_dir, adapter_dir):
    partition = Partition(6, 2, 2)
    base = load_server_shard(tiny_model_dir, partition)
    merged = merged_shard(base, LoraAdapter.read(adapter_dir))
    x, pos = torch.randn(5, base.config.hidden_size), torch.arange(5)
    attend = lambda layer, q, k, v: causal_attention(q, k, v, base.model.layers["2"].self_attn.scale)
    with torch.no_grad():
        want = [s.run_blocks(partition.server_layers, x, pos, attend) for s in (base, merged)]
        fuse_projections([base, merged])
        got = [s.run_blocks(partition.server_layers, x, pos, attend) for s in (base, merged)]
    for i in partition.server_layers:
        b, m = base.model.layers[str(i)], merged.model.layers[str(i)]
        assert m.mlp.gate_up_proj is b.mlp.gate_up_proj  # the adapter targets attention only
        assert not torch.equal(m.self_attn.qkv_proj.weight, b.self_attn.qkv_proj.weight)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_adapters_that_do_not_fit_are_refused(tiny_model_dir, adapter_dir, default_model_dir, tmp_path, start_server):
    partition = Partition(6, 2, 2)
    server = load_server_shard(tiny_model_dir, partition)
    # Another architecture with the same block count (wider): refused at the merge by shape.
    wide = make_tiny_model(tmp_path / "wide", default_model_dir, hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    wide_adapter = LoraAdapter.read(_save_lora(wide, tmp_path / "wide-lora"))
    with pytest.raises(ValueError, match="different base model or rank"):
        merged_shard(server, wide_adapter)
    # ... and by name before any tensor is read.
    with pytest.raises(ValueError, match="was trained on"):
        wide_adapter.check_base(str(tiny_model_dir), 6)
    # A config whose rank disagrees with the tensors.
    lying = tmp_path / "lying"
    lying.mkdir()
    (lying / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    (lying / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(ValueError, match="rank 8"):
        merged_shard(server, LoraAdapter.read(lying))
    (lying / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        LoraAdapter.read(lying)
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter directory"):
        LoraAdapter.read(tmp_path)
    (lying / "adapter_config.json").write_text(json.dumps(cfg))
    (lying / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read adapter_model.safetensors"):
        LoraAdapter.read(lying).check_base(str(tiny_model_dir), 6)
    # A server asked to serve a bad adapter refuses to start, saying why.
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter directory"):
        start_server(tiny_model_dir, adapters={"x": str(tmp_path)})


def test_adapter_names_from_the_command_line(tmp_path):
    assert parse_adapter_args([str(tmp_path / "a"), f"b={tmp_path / 'a'}"], "base") == {"a": tmp_path / "a", "b": tmp_path / "a"}
    with pytest.raises(ValueError, match="two models would be called 'a'"):
        parse_adapter_args([str(tmp_path / "a"), str(tmp_path / "x" / "a")], "base")
    with pytest.raises(ValueError, match="two models would be called 'base'"):
        parse_adapter_args([str(tmp_path / "base")], "base")


def test_a_fedsea_finetune_adapter_served_by_fedsea_serve(tiny_model_dir, tmp_path):
    """End to end as a user does it: fine-tune (1 client, a few steps), then `fedsea serve
    --adapter RUN/adapter`; the served adapter generates what the peft-merged model does."""
    cfg = FinetuneConfig(
        data="bbc-news", out=str(tmp_path / "run"), model=str(tiny_model_dir), steps=3, batch_size=2, fedavg_every=3,
        max_train=12, max_valid=4, noise=0.0, lora=LoraSpec(rank=2), optim=OptimSpec(lr=5e-2), progress=False,
    )
    run(cfg)
    adapter = tmp_path / "run" / "adapter"
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).merge_and_unload().eval()
    expected = _reference(merged, PROMPTS[1])
    assert expected != _reference(LlamaForCausalLM.from_pretrained(tiny_model_dir).eval(), PROMPTS[1]), "training changed nothing"
    port = free_port()
    cmd = [sys.executable, "-m", "fedsea.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port),
           "--noise", "0", "--adapter", f"tuned={adapter}"]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (proc.poll() is None and _healthy(port)):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/v1"
        assert [m["id"] for m in httpx.get(f"{url}/models").json()["data"]] == [tiny_model_dir.name, "tuned"]
        body = {"model": "tuned", "prompt": PROMPTS[1], "max_tokens": NEW_TOKENS, "temperature": 0}
        r = httpx.post(f"{url}/completions", json=body, timeout=60).json()
        assert r["model"] == "tuned"
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        assert r["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_tick_mixing_models_runs_one_forward_per_model(tiny_model_dir, adapter_dir, start_server):
    engine = start_server(tiny_model_dir, adapters={NAME: str(adapter_dir)}).runtime.engine
    calls: list[tuple[str | None, int]] = []
    for name, runner in engine.executor.worker.runners.items():
        def spy(plan, real=runner.execute, name=name):
            calls.append((name, plan.num_seqs))
            return real(plan)
        runner.execute = spy
    hidden = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    alone = {}
    for model in (None, NAME):
        engine.open(("alone", model), model).result(timeout=30)
        alone[model] = engine.step(("alone", model), 0, hidden).result(timeout=30)
    assert not torch.allclose(alone[None], alone[NAME], atol=1e-3)
    models = [None, NAME, None]
    for i, model in enumerate(models):
        engine.open(("mixed", i), model).result(timeout=30)
    calls.clear()
    # One frame's steps, as a connection hands them over: one command, hence one tick.
    futures = engine.step_many([(("mixed", i), 0, hidden) for i in range(len(models))])
    for model, fut in zip(models, futures):
        torch.testing.assert_close(fut.result(timeout=30), alone[model], atol=1e-5, rtol=1e-5)
    assert len(calls) == 2 and dict(calls) == {None: 2, NAME: 1}


def test_fedsea_server_with_a_bad_adapter_exits_with_a_clear_message(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="fedsea server: .* is not a LoRA adapter directory"):
        cli.main(["server", "--model", str(tiny_model_dir), "--port", "0", "--adapter", str(tmp_path)])
    with pytest.raises(SystemExit, match="two models would be called"):
        cli.main(["gateway", "--model", str(tiny_model_dir), "--adapter", f"{tmp_path}/a", "--adapter", f"{tmp_path}/b/a"])

"""Split fine-tuning: the server's training service (fusion, per-row adapters, freed steps,
bad requests), data loading, and the federated run with checkpoints (tiny model)."""

from __future__ import annotations

import asyncio
import copy
import json
import logging

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from edge_runtime.connection import ServerError
from fedsea_shared.protocol import Hello, LoraSpec, OptimSpec, TrainJoin
from fedsea_shared.shard import Partition, load_config
from fedsea_shared.training import flatten, load_flat, lora_parameters
from server_runtime.training_service import TrainingSettings
from training.checkpoint import Checkpoints
from training.connection import TrainingConnection
from training.data import DataError, build_dataset, read_jsonl, shard
from training.edge import protect_gradient
from training.federation import FinetuneConfig, run

HIDDEN = 64  # the tiny model's width


def _hello(model_dir) -> Hello:
    config = load_config(model_dir)
    partition = Partition(config.num_hidden_layers, 2, 2)
    return Hello(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, layers=partition.server_range, dtype="float32")


def _join(client: int, clients: int, mode: str = "sequential", job: str = "job") -> TrainJoin:
    return TrainJoin(sid=0, job=job, client=client, clients=clients, mode=mode, lora=LoraSpec(rank=2),
                     optim=OptimSpec(total_steps=4), seed=0)


async def _clients(server, n: int, mode: str, job: str = "job") -> list[TrainingConnection]:
    conns = [await TrainingConnection.connect(server.url, _hello(server.runtime.settings.model)) for _ in range(n)]
    await asyncio.gather(*(c.join(_join(i, n, mode, job)) for i, c in enumerate(conns)))
    return conns


async def _until(predicate, what: str) -> None:
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {what}")


def _hidden(seed: int, tokens: int) -> torch.Tensor:
    return torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["batched", "hierarchical"])
async def test_fused_pass_equals_each_client_alone(tiny_model_dir, start_server, mode):
    """Concurrent clients' rows fused into one pass give each client what it gets alone,
    through its own server adapter in hierarchical mode."""
    server = start_server(tiny_model_dir, enable_training=True)
    conns = await _clients(server, 2, mode)
    job = server.runtime.training.jobs[(None, "job")]
    if mode == "hierarchical":  # make the clients' adapters differ
        for i, name in enumerate(job.optimizers):
            params = lora_parameters(job.shard, name)
            load_flat(params, torch.randn(flatten(params).numel(), generator=torch.Generator().manual_seed(i)) * 0.3)
    lengths = [[5, 3], [4]]
    hidden = [_hidden(i, sum(n)) for i, n in enumerate(lengths)]
    alone = [(await c.forward(n, h, backward=False))[1] for c, n, h in zip(conns, lengths, hidden)]
    if mode == "hierarchical":
        assert not torch.allclose(alone[0][:4], alone[1][:4])  # same rows, other adapter
    fused = await asyncio.gather(*(c.forward(n, h) for c, n, h in zip(conns, lengths, hidden)))
    assert len(server.runtime.training.steps) == 2
    assert len({id(g) for g in server.runtime.training.steps.values()}) == 1  # one pass
    for (_, out), ref in zip(fused, alone):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grads = await asyncio.gather(*(c.backward(sid, torch.ones_like(out)) for c, (sid, out) in zip(conns, fused)))
    for (g, stepped), h in zip(grads, hidden):
        assert g.shape == h.shape and stepped
    assert not server.runtime.training.steps
    for c in conns:
        await c.close()


async def test_batched_pass_waits_for_a_late_client(tiny_model_dir, start_server):
    """A client later than the fuse window still joins the step's one pass: the shared
    adapter takes one step on the mean gradient of both clients' batches.  (A pass per
    arrival had taken 10 instead of 16 steps in a 4-client run on a loaded machine.)"""
    server = start_server(tiny_model_dir, enable_training=True, training=TrainingSettings(fuse_window=0.01))
    a, b = await _clients(server, 2, "batched")
    job = server.runtime.training.jobs[(None, "job")]
    early = asyncio.create_task(a.forward([3], _hidden(0, 3)))
    await asyncio.sleep(0.3)
    assert not early.done()  # waiting for b, far past the fuse window
    (sid_a, out_a), (sid_b, out_b) = await asyncio.gather(early, b.forward([2], _hidden(1, 2)))
    assert len({id(g) for g in server.runtime.training.steps.values()}) == 1
    got = await asyncio.gather(a.backward(sid_a, torch.ones_like(out_a)), b.backward(sid_b, torch.ones_like(out_b)))
    assert [stepped for _, stepped in got] == [True, True] and job.optimizers["shared"].steps == 1
    await a.close()
    await b.close()


async def test_optimizer_step_waits_for_open_passes(tiny_model_dir, start_server):
    """Two unfused passes of one shared adapter: the first backward must not step the
    adapter in place while the second pass's graph still uses it."""
    server = start_server(tiny_model_dir, enable_training=True, training=TrainingSettings(batched_wait=0.01))
    a, b = await _clients(server, 2, "batched")
    sid_a, out_a = await a.forward([3], _hidden(0, 3))  # alone: the window expires
    sid_b, out_b = await b.forward([2], _hidden(1, 2))
    assert len({id(g) for g in server.runtime.training.steps.values()}) == 2
    _, stepped_a = await a.backward(sid_a, torch.ones_like(out_a))
    grad_b, stepped_b = await b.backward(sid_b, torch.ones_like(out_b))
    assert (stepped_a, stepped_b) == (False, True) and torch.isfinite(grad_b).all()
    await a.close()
    await b.close()


async def test_vanished_client_step_is_freed_and_others_continue(tiny_model_dir, start_server):
    server = start_server(tiny_model_dir, enable_training=True, training=TrainingSettings(step_timeout=0.5))
    service = server.runtime.training
    a, b = await _clients(server, 2, "sequential")
    # a forwards, then disappears mid-step: its autograd state and its turn are freed.
    await a.forward([4], _hidden(0, 4))
    assert len(service.steps) == 1
    await a.close()
    await _until(lambda: not service.steps and service.freed_steps == 1, "the vanished client's step is freed")
    sid, out = await b.forward([3], _hidden(1, 3))
    await b.backward(sid, torch.ones_like(out))
    # b forwards and never sends the backward: the timeout frees it; a late backward is refused.
    sid, out = await b.forward([3], _hidden(2, 3))
    await _until(lambda: service.freed_steps == 2, "the abandoned step times out")
    with pytest.raises(ServerError) as e:
        await b.backward(sid, torch.ones_like(out))
    assert e.value.code == "unknown_step"
    sid, out = await b.forward([2], _hidden(3, 2))  # the turn was released
    await b.backward(sid, torch.ones_like(out))
    await b.close()


async def test_bad_training_requests_get_typed_errors(tiny_model_dir, start_server):
    server = start_server(tiny_model_dir, enable_training=True)
    conn = await TrainingConnection.connect(server.url, _hello(tiny_model_dir))
    other = await TrainingConnection.connect(server.url, _hello(tiny_model_dir))
    try:
        cases = [
            (conn.forward([2], _hidden(0, 2)), "unknown_job"),
            (conn.join(_join(client=3, clients=2)), "bad_frame"),
        ]
        for request, code in cases:
            with pytest.raises(ServerError) as e:
                await request
            assert e.value.code == code, e.value
        await conn.join(_join(0, 1))
        cases = [
            (other.join(_join(0, 1)), "job_mismatch"),  # client 0 is taken
            (other.join(_join(0, 1).model_copy(update={"mode": "batched"})), "job_mismatch"),
            (conn.forward([3], _hidden(0, 2)), "bad_tensor"),  # lengths do not cover the rows
            (conn.forward([2], torch.full((2, HIDDEN), float("nan"))), "non_finite"),
            (conn.backward(99, torch.zeros(2, HIDDEN)), "unknown_step"),
            (conn.aggregate(0, 1, torch.zeros(3, 3)), "bad_tensor"),
        ]
        for request, code in cases:
            with pytest.raises(ServerError) as e:
                await request
            assert e.value.code == code, e.value
        sid, out = await conn.forward([2, 1], _hidden(1, 3))  # still serving this client
        grad, _ = await conn.backward(sid, torch.ones_like(out))
        assert torch.isfinite(grad).all()
    finally:
        await conn.close()
        await other.close()


def test_gradient_sent_to_the_server_can_be_clipped_and_noised():
    grad = torch.cat([torch.full((3, 4), 5.0), torch.full((2, 4), 0.01)])
    clipped = protect_gradient(grad, [3, 2], clip=1.0, noise=0.0)
    norms = [g.norm().item() for g in clipped.split([3, 2])]
    assert norms[0] == pytest.approx(1.0) and norms[1] == pytest.approx(grad[3:].norm().item())
    assert torch.equal(protect_gradient(grad, [3, 2], clip=0.0, noise=0.0), grad)
    noised = protect_gradient(grad, [3, 2], clip=1.0, noise=0.5, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(noised, clipped) and (noised - clipped).std().item() == pytest.approx(0.5, rel=0.5)
    with pytest.raises(ValueError, match="clip"):
        FinetuneConfig(data="x", out="y", send_grad_noise=1.0)


# ---- data ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(str(default_model_dir), local_files_only=True)


def test_jsonl_skips_malformed_lines_and_rejects_empty_data(tmp_path, caplog):
    good = tmp_path / "data.jsonl"
    good.write_text("\n".join([
        json.dumps({"prompt": "2+2?", "completion": "4"}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
        json.dumps(["a list"]),
    ]))
    with caplog.at_level(logging.WARNING):
        records = read_jsonl(good)
    assert len(records) == 2
    assert "skipped 3 malformed line(s)" in caplog.text and "line 2" in caplog.text and "line 4" in caplog.text
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_jsonl(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n")
    with pytest.raises(DataError, match="no usable records"):
        read_jsonl(bad)
    with pytest.raises(DataError, match="neither a JSONL file nor a built-in"):
        build_dataset("no-such-dataset", None, 64)


def test_every_kind_of_bad_jsonl_line_is_skipped_with_its_number_and_reason(tmp_path, tokenizer, caplog):
    """Issue 10, failure 9: these lines used to abort the run (TypeError, ValueError,
    RecursionError from the parser or the tokenizer) instead of being skipped."""
    chat = lambda *turns: json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})
    good = json.dumps({"prompt": "2+2?", "completion": "4"})
    bad = {
        "lone surrogate": '{"prompt": "a\\ud800b", "completion": "x"}',
        "surrogate in a chat": '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udfff"}]}',
        "assistant only": chat(("assistant", "hello")),
        "5000 digits": '{"prompt": "a", "completion": "b", "n": ' + "9" * 5000 + "}",
        "deep nesting": '{"prompt": "a", "completion": "b", "x": ' + "[" * 50_000 + "]" * 50_000 + "}",
        "content not a string": json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}),
        "unknown role": chat(("wizard", "hi"), ("assistant", "x")),
        "messages not a list": json.dumps({"messages": {"role": "user"}}),
        "prompt a list": json.dumps({"prompt": ["a"], "completion": "b"}),
        "label a number": json.dumps({"prompt": "a", "completion": "b", "label": 5}),
        "empty completion": json.dumps({"prompt": "a", "completion": ""}),
        "not an object": "[1, 2]",
        "not JSON": "{'prompt': 'a'}",
        "template refuses": chat(("system", "be brief"), ("user", "hi"), ("assistant", "x")),
    }
    lines = [good] + [line for kind in bad.values() for line in (kind, good)]
    path = tmp_path / "hostile.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # A template that refuses system turns, as some models' templates do.
    refusing = copy.deepcopy(tokenizer)
    refusing.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with caplog.at_level(logging.WARNING, logger="fedsea.finetune.data"):
        ds = build_dataset(str(path), refusing, max_length=64, valid_fraction=0.01)
    assert len(ds.train) + len(ds.valid) == len(bad) + 1  # every good line survives
    log_text = caplog.text
    for k, kind in enumerate(bad):
        assert f"line {2 * k + 2}:" in log_text, kind  # the bad lines are the even ones
    assert "nested too deeply" in log_text and "4300 digits" in log_text and "no system role" in log_text
    assert "starts with an assistant message" in log_text
    assert "skipped 13 malformed line(s)" in log_text and "skipped 1 record(s) that do not tokenize" in log_text


def test_loss_covers_completion_only_and_long_sequences_keep_their_answer(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    long_prompt = "word " * 300
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Capital of France?", "completion": "Paris"},
        {"prompt": long_prompt, "completion": "short answer"},
        {"prompt": "x", "completion": "answer " * 300},  # the answer alone is too long: cut
    ]))
    ds = build_dataset(str(path), tokenizer, max_length=64, valid_fraction=0.01)
    assert len(ds.train) + len(ds.valid) == 3
    for ex in ds.train + ds.valid:
        assert len(ex.ids) <= 64 and any(ex.target)
    paris = next(ex for ex in ds.train + ds.valid if len(ex.ids) < 64)
    answer = tokenizer.decode([t for t, m in zip(paris.ids, paris.target) if m])
    assert answer.startswith("Paris") and "Capital" not in answer
    assert not any(paris.target[: paris.prompt_len])


def test_builtin_datasets_split_deterministically_into_disjoint_shards(tokenizer):
    a = build_dataset("bbc-news", tokenizer, 128, seed=1, max_train=60, max_valid=10)
    b = build_dataset("bbc-news", tokenizer, 128, seed=1, max_train=60, max_valid=10)
    assert [e.ids for e in a.train] == [e.ids for e in b.train]
    assert a.labels == ["business", "entertainment", "politics", "sport", "tech"]
    assert not {tuple(e.ids) for e in a.train} & {tuple(e.ids) for e in a.valid}
    for by_label in (False, True):
        shards = [shard(a.train, 3, c, by_label) for c in range(3)]
        seen = [tuple(e.ids) for s in shards for e in s]
        assert len(seen) == len(set(seen))
    label_sets = [{e.label for e in shard(a.train, 3, c, True)} for c in range(3)]
    assert sum(map(len, label_sets)) < 3 * 5  # non-IID: clients see fewer labels
    for name in ("tweet-sentiment", "chitchat", "bbc-headlines"):
        ds = build_dataset(name, tokenizer, 256, max_train=8, max_valid=2)
        assert len(ds.train) == 8 and all(any(e.target) for e in ds.train)
    headline = next(e for e in ds.train)  # bbc-headlines: the whole prompt fits, the headline is the target
    assert ds.labels is None and headline.prompt_len > 40 and 2 < sum(headline.target) < 40


# ---- federated runs -----------------------------------------------------------------------


def _config(tmp_path, model_dir, **kw) -> FinetuneConfig:
    base = dict(data="bbc-news", out=str(tmp_path / "run"), model=str(model_dir), steps=4, batch_size=2, fedavg_every=2,
                max_train=24, max_valid=6, noise=0.0, lora=LoraSpec(rank=2), optim=OptimSpec(lr=1e-3), progress=False)
    return FinetuneConfig(**{**base, **kw})


def test_two_client_processes_train_and_save_a_peft_adapter(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, clients=2, mode="batched")
    report = run(cfg)
    assert report["train"]["steps"] == 4 and report["after"]["loss"] < report["before"]["loss"]
    adapter = tmp_path / "run" / "adapter"
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    layers = {int(name.split(".")[4]) for name in tensors}
    assert layers == set(range(6))  # head, middle (from the server) and tail
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(tensors)
    ckpt = Checkpoints(tmp_path / "run" / "checkpoint")
    assert ckpt.common_step(2) == 4

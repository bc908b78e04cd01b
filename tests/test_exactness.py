"""Split generation equals centralized generation (noise 0, greedy), on the real default
model, with the server runtime in a separate process behind a real websocket."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from server_runtime.process import server_process
from edge_runtime import AsyncEdgeClient, EdgeClient
from test_attention_backends import ATTENTION_BACKENDS, needs_vllm

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain in detail how photosynthesis works.",
    "Give me ten tips for learning a new language.",
]
PARTITIONS = [(1, 1), (2, 2), (5, 2)]  # the thinnest edge, the default, an asymmetric cut
# Each partition through the default attention backend and linear kernel (oneDNN where it
# runs); the default one through vllm's attention and through torch's linear too.
# Block ops: auto (the fused CPU kernels where they build), torch's ops once.
SPLITS = [pytest.param(h, t, "torch", "auto", "auto", id=f"head{h}-tail{t}") for h, t in PARTITIONS]
SPLITS.append(pytest.param(2, 2, "torch", "torch", "auto", id="head2-tail2-torch-linear"))
SPLITS.append(pytest.param(2, 2, "torch", "auto", "torch", id="head2-tail2-torch-ops"))
SPLITS.append(pytest.param(2, 2, "vllm", "auto", "auto", id="head2-tail2-vllm", marks=needs_vllm))
NEW_TOKENS = 40
# Tolerance on log-probabilities (fp32 end to end): differences come only from the
# order of floating-point operations (observed max 2.6e-5 over 80 tokens, head=2/tail=2).
LOGPROB_ATOL = 1e-3


@pytest.fixture(scope="module")
def reference(default_model_dir):
    """transformers' greedy tokens and per-token logits for each prompt, computed once for every split."""
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    return model, {}


def reference_generate(reference, ids: list[int]):
    model, cache = reference
    key = tuple(ids)
    if key not in cache:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True,
            )
        cache[key] = (out.sequences[0, len(ids):].tolist(), out.logits)
    return cache[key]


@pytest.mark.parametrize("head, tail, backend, linear, ops", SPLITS)
def test_split_greedy_equals_transformers_generate(default_model_dir, reference, tmp_path, head, tail, backend,
                                                   linear, ops):
    with server_process(default_model_dir, head, tail, "--attention-backend", backend, "--linear-kernel", linear,
                        "--block-ops", ops, log_path=tmp_path / "server.log") as url:
        with EdgeClient(url, model=str(default_model_dir), head=head, tail=tail, noise=0.0,
                        linear_kernel=linear, block_ops=ops) as client:
            for prompt in PROMPTS:
                messages = [{"role": "user", "content": prompt}]
                got = client.generate(messages, max_tokens=NEW_TOKENS, temperature=0, logprobs=5)
                expected, reference_logits = reference_generate(reference, client.chat_prompt(messages))
                assert len(expected) >= 32, "prompt too short to test 32 tokens"
                assert got.token_ids == expected, f"{prompt!r}: split diverged"
                for event, logits in zip(got.events, reference_logits):
                    ref = torch.log_softmax(logits[0].float(), -1)
                    top = torch.topk(ref, 5)
                    assert [i for i, _ in event.top_logprobs] == top.indices.tolist()
                    assert max(abs(v - r) for (_, v), r in zip(event.top_logprobs, top.values.tolist())) < LOGPROB_ATOL


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
async def test_greedy_output_is_the_same_alone_or_batched_with_15_others(default_model_dir, start_server, backend):
    attention_backend, decode_attention = backend
    server = start_server(default_model_dir, attention_backend=attention_backend, decode_attention=decode_attention)
    client = AsyncEdgeClient(server.url, model=str(default_model_dir), noise=0.0)
    topics = ["cats", "the sea", "bread", "rain", "chess", "trains", "owls", "jazz",
              "maps", "tea", "snow", "bees", "clocks", "kites", "salt", "glass"]
    chats = [[{"role": "user", "content": f"Tell me one fact about {t}."}] for t in topics]
    alone = [(await client.generate(c, max_tokens=16, temperature=0)).token_ids for c in chats]
    batched = await asyncio.gather(*(client.generate(c, max_tokens=16, temperature=0) for c in chats))
    assert [b.token_ids for b in batched] == alone
    await client.aclose()

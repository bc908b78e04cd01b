"""Through the gateway, with noise 0 and temperature 0, a chat answer equals transformers'
greedy `generate` of the full default model for the same messages and chat template."""

from __future__ import annotations

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gateway import GatewaySettings, GatewayThread

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another one, and explain why it is prime."},
    ],
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def reference(default_model_dir):
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(default_model_dir)


def test_gateway_greedy_equals_transformers(start_server, default_model_dir, reference):
    model, tokenizer = reference
    server = start_server(default_model_dir)  # the default split: head 2, tail 2
    # Pseudonyms off: the reference computes on the original text (a name would differ).
    gw = GatewayThread(GatewaySettings.of(server_url=server.url, model=str(default_model_dir), noise=0.0, port=0, pseudonymize=False))
    try:
        client = openai.OpenAI(base_url=gw.wait_ready().url, api_key="unused", max_retries=0)
        for messages in CHATS:
            r = client.chat.completions.create(
                model=gw.settings.edge.model_id, messages=messages, temperature=0, max_tokens=NEW_TOKENS
            )
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            generated = out[0, ids["input_ids"].shape[1]:].tolist()
            assert len(generated) > 4, "a too short reference answer proves little"
            choice = r.choices[0]
            assert choice.message.content == tokenizer.decode(generated, skip_special_tokens=True)
            assert r.usage.completion_tokens == len(generated)
            assert r.usage.prompt_tokens == ids["input_ids"].shape[1]
            ended = generated[-1] == tokenizer.eos_token_id
            assert choice.finish_reason == ("stop" if ended else "length")
    finally:
        gw.stop()

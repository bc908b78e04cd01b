"""Defense (c): names, digit runs and e-mails become keyed surrogates before the prompt is
tokenized, the server computes on the surrogates only, and the edge restores the
originals in the text it streams."""

from __future__ import annotations

import httpx
import pytest
import torch

from audit.capture import head_states
from edge_runtime import EdgeClient
from edge_runtime.pseudonyms import Pseudonyms, Restorer, RestoringText
from edge_runtime.text import StopMatcher
from fedsea_shared.protocol import Step, decode
from fedsea_shared.shard import load_shard
from conftest import record_frames

KEY = b"k" * 32
TEXTS = [
    "hi, my name is Oluwaseun Okafor and my number is 555 123 4567, write to oluwa.okafor@mail.example.org",
    "Yesterday I met Marguerite Van der Berg and my friend Ingrid Lindqvist; PIN 4921, order 88120.",
    "Hello MARGUERITE, Marguerite! Marguerite's dog. Call 0800 1234 or 0800-1234 now, ref A1234x",
]


@pytest.mark.parametrize("text", TEXTS)
def test_substitution_round_trips_and_hides_the_originals(text):
    p = Pseudonyms(KEY)
    hidden = p.substitute(text)
    assert p.restore(hidden) == text
    for secret in ("Oluwaseun", "Okafor", "555", "4567", "oluwa.okafor", "Marguerite", "Berg", "Lindqvist", "4921", "88120", "1234"):
        if secret.lower() in text.lower():
            assert secret.lower() not in hidden.lower(), (secret, hidden)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_restore_is_the_same_at_every_chunk_boundary(text):
    p = Pseudonyms(KEY)
    hidden = p.substitute(text)
    for cut in range(len(hidden) + 1):
        r = Restorer(p.reverse)
        assert r.push(hidden[:cut]) + r.push(hidden[cut:]) + r.flush() == text, cut
    r = Restorer(p.reverse)
    assert "".join(r.push(c) for c in hidden) + r.flush() == text


def test_a_surrogate_inside_a_longer_word_is_left_alone():
    p = Pseudonyms(KEY)
    surrogate = p.substitute("I met Marguerite Lindqvist").split()[2]
    r = Restorer(p.reverse)
    assert r.push(f"{surrogate}x {surrogate}1 x{surrogate}") + r.flush() == f"{surrogate}x {surrogate}1 x{surrogate}"


def test_stop_strings_match_the_restored_text():
    p = Pseudonyms(KEY)
    hidden = p.substitute("my name is Oluwaseun Okafor, bye")
    out = RestoringText(Restorer(p.reverse), StopMatcher(["Okafor"]))
    text, stopped = out.push(hidden)
    assert stopped and text == "my name is Oluwaseun "


def test_same_span_same_surrogate_under_one_key_and_another_under_another():
    turn1 = [{"role": "user", "content": "I am Marguerite, call 555 1234"}]
    turn2 = turn1 + [{"role": "assistant", "content": "Hello Marguerite"}, {"role": "user", "content": "Hi from Ingrid Lindqvist"}]
    a1, a2 = Pseudonyms(KEY).messages(turn1), Pseudonyms(KEY).messages(turn2)
    assert a2[: len(a1)] == a1  # a later turn re-sends the earlier one exactly
    assert "Marguerite" not in a2[1]["content"] and a2[1]["content"].split()[1] == a1[0]["content"].split()[2].rstrip(",")
    other = [Pseudonyms(bytes([i]) * 32).substitute("Marguerite Okafor 5551234") for i in range(5)]
    assert len(set(other)) == 5


def _sent_states(frames):
    return [t for m, t in (decode(f) for f in frames) if isinstance(m, Step)][0]


@pytest.fixture
def recorded(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir, noise_min=0.0)
    return server, record_frames(server)


def test_the_server_computes_on_the_surrogate_prompt_only(recorded, tiny_model_dir):
    """At noise 0 the wire carries exact head states: they are the surrogate prompt's,
    and from the name on none is a state of the original prompt."""
    server, frames = recorded
    messages = [{"role": "user", "content": "Please greet Marguerite Okafor warmly."}]
    head = load_shard(tiny_model_dir, [0, 1], with_edge_parts=True)
    local = {}
    for pseudonymize in (True, False):
        frames.clear()
        with EdgeClient(server.url, model=str(tiny_model_dir), noise=0.0, noise_key=KEY, pseudonymize=pseudonymize) as client:
            client.generate(messages, max_tokens=1, temperature=0)
            ids = client._client.chat_prompt(messages)
            local[pseudonymize] = (ids, _sent_states(frames), head_states(head, torch.tensor([ids]), [2])[2][0])
    ids, sent, surrogate_states = local[True]
    original_ids, original_sent, original_states = local[False]
    torch.testing.assert_close(sent, surrogate_states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(original_sent, original_states, rtol=1e-5, atol=1e-5)  # off: the original goes out
    first = next(i for i, (a, b) in enumerate(zip(ids, original_ids)) if a != b)
    distance = torch.cdist(original_states[first:], sent)
    assert distance.min() > 1e-3


def test_generation_restores_the_name_in_the_output(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir)
    with EdgeClient(server.url, model=str(tiny_model_dir), noise_key=KEY) as client:
        tok = client.tokenizer
        # A name whose surrogate is one token, so logit_bias can make the model say it.
        for name in ("Marguerite", "Ingrid", "Alejandro", "Rafael", "Leonora", "Ezekiel", "Hildegard", "Siobhan"):
            surrogate = Pseudonyms(KEY).substitute(f"I am {name}").split()[-1]
            token = tok.encode(" " + surrogate, add_special_tokens=False)
            if len(token) == 1:
                break
        else:
            pytest.fail("no candidate name has a one-token surrogate under this key")
        reply = client.generate([{"role": "user", "content": f"I am {name}. Say my name."}], max_tokens=2,
                                temperature=0, logit_bias={token[0]: 100.0})
    assert reply.text == f" {name} {name}"


def test_gateway_completions_echo_the_original_prompt(gw, tiny_model_dir):
    prompt = "Dear Marguerite Okafor, your code is 48213."
    r = httpx.post(f"{gw.url}/completions", json={"model": tiny_model_dir.name, "prompt": prompt, "echo": True,
                                                          "max_tokens": 2, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].startswith(prompt)


@pytest.mark.parametrize("flags, expected", [([], True), (["--no-pseudonymize"], False)])
def test_gateway_pseudonymizes_by_default_and_the_flag_turns_it_off(monkeypatch, tiny_model_dir, flags, expected):
    import gateway

    from fedsea.cli import main

    seen = []
    monkeypatch.setattr(gateway, "run_gateway", lambda settings, log_level: seen.append(settings))
    main(["gateway", "--model", str(tiny_model_dir), *flags])
    assert [s.pseudonymize for s in seen] == [expected]

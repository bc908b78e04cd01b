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
def recorded(start_server, record, tiny_model_dir):
    relay = record(start_server(tiny_model_dir, noise_min=0.0))
    return relay, relay.frames


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
            ids = client.chat_prompt(messages)
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
    assert [s.edge.pseudonymize for s in seen] == [expected]


# ---- the detector (edge_runtime.pii), through the public API --------------------------

HIDDEN = [  # (sentence, what must not reach the server)
    ("Maria said she would call back.", ["Maria"]),
    ("i had lunch with jennifer yesterday", ["jennifer"]),
    ("Please ask Dr. Okonkwo to call me.", ["Okonkwo"]),
    ("Stephen King wrote it.", ["Stephen", "King"]),
    ("Send it to 42 Maple Street, please.", ["42", "Maple"]),
    ("I moved to Avenida Noruega 42 last year.", ["Noruega", "42"]),
    ("My number is 84 23 30.", ["84", "23", "30"]),
    ("Call +44 20 7946 0958 or (555) 123-4567.", ["7946", "0958", "555", "4567"]),
    ("Card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00.", ["4111", "DE89", "3704"]),
    ("I was born on March 29, 1982.", ["March", "29", "1982"]),
    ("Write to marie.h@armyspy.com", ["marie.h@armyspy.com"]),
    # Names no name list holds, in every case and place a person is expected.
    ("remind me to text oluwaseun after lunch", ["oluwaseun"]),
    ("Thandiwe was late again.", ["Thandiwe"]),
    ("Radomír, could you check this?", ["Radomír"]),
    ("I'm meeting my cousin Ngozi later.", ["Ngozi"]),
    ("can you ask jack to bring the tent", ["jack"]),  # a first name that is also a word, addressed
    # Street addresses in other grammars, and phones with a country and an area code.
    ("Our office is at 14 rue des Lilas.", ["14", "Lilas"]),
    ("Deliver it to Kossuth Lajos utca 12.", ["Kossuth", "12"]),
    ("My flat is at Bjørnveien 7, come by.", ["Bjørnveien", "7"]),
    ("Reach me on +55 (21) 9876-5432.", ["9876", "5432"]),
    # First names of other countries: in lower case when addressed, and before a surname
    # whatever the NER calls the pair; a name the NER runs on into a time ends before it.
    ("can you ask kristoffer if he wants the tickets", ["kristoffer"]),
    ("Angel Petrescu will drive us.", ["Angel", "Petrescu"]),
    ("the parcel is for Georgia Vlahou", ["Georgia", "Vlahou"]),
    # A street name with a lower-case word after an address cue.
    ("My new address is Cankarjevo nabrežje 8c, third floor.", ["Cankarjevo", "nabrežje"]),
]
KEPT = [  # ordinary text: nothing replaced
    "Will you come in May? I hope so.",
    "Grace is a virtue, and the meeting on 3 June went well.",
    "Microsoft and the United Nations met in Geneva on Friday.",
    "Thanks, that was really helpful!",
    # Months, weekdays and words that are also names, in lower case too; chat's laughs,
    # abbreviations, typos and run-together words.
    "We met in may, and will said grace would come on monday.",
    "haha yeah idk, that superhero movie was gonna be good lol",
    "Hmmm, I acheived nothing today tbh.",
]


# Capitalised words that name no person: brands, products, currencies, games, titles of
# works, holidays.  Words common in English text that no dictionary or first-name list holds
# are brands and public entities far more often than a user's acquaintances.
NOT_PEOPLE = [
    "Bitcoin fell again this morning, so I bought more Ethereum.",
    "Back when Bitcoin was cheap I bought none.",  # the NER reads this subject as a PERSON
    "Netflix raised its prices, so we switched to Spotify.",
    "Uber was faster than the bus.",
    "Minecraft is still the best game ever made.",
    "She plays Fortnite every evening.",
    "The Kindle version is cheaper than the paperback.",
    "I finally finished watching Breaking Bad.",
    "Is Costco open on Easter Monday?",
    "Happy Valentine's Day to you both!",
    "Can you convert 50 Euros to Dollars for me?",
    "The Yankees lost to the Red Sox.",
    "The Kardashians are on TV again.",
]
# ...while first names that are just as common in English text stay names.
COMMON_FIRST_NAMES = [("Sven is coming to the party, said Lars.", ["Sven", "Lars"]), ("Ask Igor about the keys.", ["Igor"])]


@pytest.mark.parametrize("text", NOT_PEOPLE)
def test_capitalised_words_that_name_no_person_pass(text):
    assert Pseudonyms(KEY).substitute(text) == text


@pytest.mark.parametrize("text, secrets", HIDDEN + COMMON_FIRST_NAMES)
def test_personal_data_is_replaced_and_restored(text, secrets):
    p = Pseudonyms(KEY)
    hidden = p.substitute(text)
    for secret in secrets:
        assert secret not in hidden, (secret, hidden)
    assert p.restore(hidden) == text


@pytest.mark.parametrize("text, value", [
    ("Deliver the parcel to Ulica Kralja Zvonimira 8/2 before noon.", "Ulica Kralja Zvonimira 8/2"),  # a house, a flat
    ("The studio at Mostarska 14b/3 is free from June.", "Mostarska 14b/3"),
    ("I was born in March 1988, the year of the storm.", "March 1988"),  # a month and a year of birth
])
def test_the_whole_value_is_replaced_and_nothing_after_it(text, value):
    # A surrogate's digits or month may equal the original's by chance, so the replaced spans are checked.
    spans = [text[r.start : r.end] for r in Pseudonyms(KEY).replacements(text)]
    assert spans == [value]


@pytest.mark.parametrize("text", KEPT)
def test_ordinary_words_and_dates_pass(text):
    assert Pseudonyms(KEY).substitute(text) == text


def test_tool_call_arguments_and_results_are_substituted_like_text():
    call = {"id": "c1", "type": "function", "function": {"name": "send", "arguments": {"to": "Marguerite Okafor", "n": 3}}}
    messages = [{"role": "user", "content": "Message Marguerite Okafor"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "sent to Marguerite Okafor at +44 20 7946 0958"}]
    p = Pseudonyms(KEY)
    out = p.messages(messages)
    said = out[0]["content"].split(" ", 1)[1]
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"to": said, "n": 3}
    assert "Okafor" not in out[2]["content"] and "7946" not in out[2]["content"] and said in out[2]["content"]
    assert out[1]["tool_calls"][0]["function"]["name"] == "send"


HOSTILE = {  # each just under the pseudonymizer's limit
    "one word": lambda n: "a" * n,
    "digit run": lambda n: "7" * n,
    "nested brackets": lambda n: "(" * (n // 2) + ")" * (n // 2),
    "spaced brackets": lambda n: "( " * (n // 2),
    "capitalised words": lambda n: "Xavier Quentin " * (n // 15),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_text_is_handled_in_seconds(name):
    import time

    from edge_runtime.pii import MAX_CHARS

    text = HOSTILE[name](MAX_CHARS - 100)
    p = Pseudonyms(KEY)
    started = time.monotonic()
    hidden = p.substitute(text)
    assert time.monotonic() - started < 30  # a few seconds here; generous for a shared CI machine
    assert p.restore(hidden) == text


def test_more_text_than_the_limit_is_refused_at_once():
    from edge_runtime.pii import MAX_CHARS, TextTooLong

    with pytest.raises(TextTooLong):
        Pseudonyms(KEY).messages([{"role": "user", "content": "x " * MAX_CHARS}])


# ---- what leaves the device: POST /fedsea/v1/preview, `fedsea preview` ----------------

def test_preview_shows_the_sent_text_and_each_span(gw, tiny_model_dir):
    text = "I'm Marguerite Okafor, call 07700 900123 or write to m.okafor@example.org."
    r = httpx.post(gw.url.removesuffix("/v1") + "/fedsea/v1/preview", timeout=60,
                   json={"model": tiny_model_dir.name, "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    body = r.json()
    sent = body["sent_text"]
    assert "<|im_start|>user" in sent or "user" in sent  # the chat template's rendering
    kinds = {s["kind"] for s in body["spans"]}
    assert {"first", "last", "phone", "email"} <= kinds, body["spans"]
    for span in body["spans"]:
        assert sent[span["start"] : span["end"]] == span["surrogate"] and span["text"] not in sent
        assert span["text"] in text


async def test_a_huge_message_is_refused_413_while_a_stream_goes_on(gw, tiny_model_dir):
    import asyncio

    base = gw.url.removesuffix("/v1")
    # 1 MiB cannot fit the tiny model's context: refused before anything reads it.  Less,
    # but more than the pseudonymizer takes: refused by it, at once.
    mib = {"model": tiny_model_dir.name, "messages": [{"role": "user", "content": "Xavier ((1234 " * (2**20 // 14)}]}
    hostile = {"model": tiny_model_dir.name, "messages": [{"role": "user", "content": "Xavier ((1234 " * 20_000}]}
    under = {"model": tiny_model_dir.name, "messages": [{"role": "user", "content": "Xavier Quentin (( 1234 " * 2700}]}
    chat = {"model": tiny_model_dir.name, "messages": [{"role": "user", "content": "Tell me a story"}], "stream": True,
            "max_tokens": 24, "temperature": 0}
    async with httpx.AsyncClient(timeout=120) as http:
        async def stream():
            chunks = 0
            async with http.stream("POST", f"{base}/v1/chat/completions", json=chat) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    chunks += line.startswith("data: {")
            return chunks

        huge, big, small, streamed = await asyncio.gather(
            http.post(f"{base}/v1/chat/completions", json=mib), http.post(f"{base}/v1/chat/completions", json=hostile),
            http.post(f"{base}/fedsea/v1/preview", json=under), stream())
    assert huge.status_code == 400 and huge.json()["error"]["code"] == "context_length_exceeded", huge.text
    assert big.status_code == 413 and big.json()["error"]["code"] == "text_too_long", big.text
    assert small.status_code == 200 and "Xavier" not in small.json()["sent_text"]
    assert streamed >= 2


def test_cli_preview_prints_the_sent_text(tiny_model_dir, capsys):
    from fedsea.cli import main

    main(["preview", "--model", str(tiny_model_dir), "--text", "--json", "Call Marguerite on 07700 900123"])
    shown = __import__("json").loads(capsys.readouterr().out)
    assert "Marguerite" not in shown["sent_text"] and {s["text"] for s in shown["spans"]} >= {"Marguerite", "07700 900123"}

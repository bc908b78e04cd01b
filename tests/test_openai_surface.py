"""Structured outputs, tool calls, logit_bias, echo, logprobs and spec defaults, through
the official `openai` client against a real server runtime (tiny random model, whose
free text is noise: whatever is valid below was made valid by the grammar)."""

from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import openai
import pytest

from edge_runtime.constraints import Grammars
from gateway import GatewaySettings, GatewayThread
from gateway.tools import OPEN, call_grammar
from gateway.schemas import Tool
from server_runtime.app import ServerSettings, ServerThread

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
ANSWER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "alerts": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["city", "days", "unit", "alerts"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                      "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url, api_key="unused", max_retries=0)


def chat(gw, **kw):
    kw.setdefault("messages", USER)
    return client(gw).chat.completions.create(model=gw.settings.edge.model_id, **kw)


def assert_valid_call(call, names=SCHEMAS) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# ---- structured outputs -------------------------------------------------------------------


def test_json_schema_answers_validate(gw):
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": ANSWER, "strict": True}}
    r = chat(gw, response_format=fmt, n=3, max_tokens=80, seed=1, temperature=1.0)
    for choice in r.choices:
        assert choice.finish_reason == "stop"  # the grammar completed, without waiting for EOS
        jsonschema.validate(json.loads(choice.message.content), ANSWER)
    assert len({c.message.content for c in r.choices}) > 1  # n choices still differ


def test_json_schema_stream_with_stop_and_logprobs(gw):
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": ANSWER}}
    chunks = list(chat(gw, response_format=fmt, stream=True, max_tokens=80, seed=2, logprobs=True, top_logprobs=2, stop=["\n\n"]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    jsonschema.validate(json.loads(text), ANSWER)
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert "".join(t.token for t in tokens) == text
    # the masked distribution: nothing outside the grammar is more likely than the sampled token
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob for t in tokens)


def test_json_object_is_an_object(gw):
    r = chat(gw, response_format={"type": "json_object"}, max_tokens=64, seed=3, logit_bias={"2": -100})
    if r.choices[0].finish_reason == "stop":  # a free-form object may run past max_tokens
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert r.choices[0].message.content.startswith("{")


# ---- tool calls ---------------------------------------------------------------------------


def test_required_tool_call_is_valid(gw):
    r = chat(gw, tools=TOOLS, tool_choice="required", max_tokens=120, seed=4, parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    assert_valid_call(choice.message.tool_calls[0])


def test_named_tool_choice_streams_deltas_that_assemble(gw):
    named = {"type": "function", "function": {"name": "get_time"}}
    chunks = list(chat(gw, tools=TOOLS, tool_choice=named, stream=True, max_tokens=120, seed=5, n=2, parallel_tool_calls=False))
    calls: dict[tuple[int, int], dict] = {}
    finish = {}
    for c in chunks:
        for ch in c.choices:
            assert not ch.delta.content  # nothing but calls
            for d in ch.delta.tool_calls or []:
                call = calls.setdefault((ch.index, d.index), {"name": "", "arguments": ""})
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    assert {i for i, _ in calls} == {0, 1}
    for call in calls.values():
        assert call["name"] == "get_time"
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS["get_time"])


def test_tool_result_turn_is_answered(gw):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}
    result = "Sunny, 24 degrees, light wind from the west."
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]}]
    with_result = [*history, {"role": "tool", "tool_call_id": "call_1", "content": result}]
    r = chat(gw, messages=with_result, tools=TOOLS, max_tokens=8, seed=6, logit_bias={"2": -100})
    without = chat(gw, messages=history, tools=TOOLS, max_tokens=1, seed=6)
    tokenizer = gw.backend.client.tokenizer
    # the result reached the prompt, and a plain answer came back
    assert r.usage.prompt_tokens - without.usage.prompt_tokens >= len(tokenizer(result).input_ids)
    assert r.choices[0].message.content and r.choices[0].finish_reason == "length"


def test_tool_choice_none_is_plain_text(gw):
    r = chat(gw, tools=TOOLS, tool_choice="none", max_tokens=6, seed=7)
    plain = chat(gw, max_tokens=6, seed=7)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == plain.choices[0].message.content


def test_auto_constrains_a_call_once_started(gw):
    grammars: Grammars = gw.backend.client.grammars
    tools = [Tool.model_validate(t) for t in TOOLS]
    grammar = grammars.lark(call_grammar(tools, "auto", parallel=True))
    tok = grammars.tokenizer
    plain = grammars.triggered(grammar, OPEN)
    for t in tok("Hello", add_special_tokens=False).input_ids:
        plain.advance(t)
        assert plain.allowed() is None  # free text stays free
    started = grammars.triggered(grammar, OPEN)
    for t in tok("\n" + OPEN, add_special_tokens=False).input_ids:
        started.advance(t)
    allowed = started.allowed()
    opening = tok('{"name": "', add_special_tokens=False).input_ids[0]
    assert allowed[opening] and allowed.sum() < 10  # the call's JSON must follow
    # auto with a response_format: the whole answer is either calls or the JSON answer
    both = grammars.constraint(grammars.lark(call_grammar(tools, "auto", True, ANSWER)))
    first = both.allowed()
    assert first[tok("<", add_special_tokens=False).input_ids[0]] and first[tok("{", add_special_tokens=False).input_ids[0]]
    assert not first[tok("Hello", add_special_tokens=False).input_ids[0]]


# A chat template that takes tools (as Qwen 2.5's and Hermes' do), reduced to what the test reads.
TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
Functions:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>
{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}
{% for c in m.tool_calls or [] %}<tool_call>{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}</tool_call>{% endfor %}{{ m.content or "" }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_template_that_takes_tools_gets_them(tiny_model_dir, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "tool-model")
    (model_dir / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    server = ServerThread(ServerSettings(model=str(model_dir), port=0))
    # Pseudonyms off: the prompt is compared with the template's tokenization of the original text.
    gateway = GatewayThread(GatewaySettings.of(server_url=server.url, model=str(model_dir), port=0, pseudonymize=False))
    try:
        call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}
        messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "tool", "tool_call_id": "call_1", "content": "Rain"}]
        r = chat(gateway.wait_ready(), messages=messages, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=120, seed=12)
        tokenizer = gateway.backend.client.tokenizer
        hf_messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [{**call, "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}}]},
                       {"role": "tool", "content": "Rain"}]
        prompt = tokenizer.apply_chat_template(hf_messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
        assert "Functions: get_weather get_time" in prompt and '"city": "Oslo"' in prompt
        assert r.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False).input_ids)
        assert r.choices[0].finish_reason == "tool_calls"
        assert_valid_call(r.choices[0].message.tool_calls[0])
    finally:
        gateway.stop()
        server.stop()


# ---- logit_bias, logprobs, echo -----------------------------------------------------------


def test_logit_bias_changes_the_greedy_first_token(gw):
    first = lambda r: r.choices[0].logprobs.content[0].token
    base = chat(gw, max_tokens=1, temperature=0, seed=8, logprobs=True)
    token_id = gw.backend.client.tokenizer.convert_tokens_to_ids(
        gw.backend.client.tokenizer.tokenize(first(base))
    )[0]
    biased = chat(gw, max_tokens=1, temperature=0, seed=8, logprobs=True, logit_bias={str(token_id): -100})
    assert first(biased) != first(base)
    c = client(gw).completions.create(model=gw.settings.edge.model_id, prompt="Hi", max_tokens=1, temperature=0, seed=8)
    cb = client(gw).completions.create(model=gw.settings.edge.model_id, prompt="Hi", max_tokens=1, temperature=0, seed=8,
                                       logit_bias={str(t): -100 for t in gw.backend.client.tokenizer(c.choices[0].text).input_ids})
    assert cb.choices[0].text != c.choices[0].text


def test_sampled_token_is_in_top_logprobs_and_bytes_are_its_own(gw):
    tokenizer = gw.backend.client.tokenizer
    emoji = tokenizer("😀", add_special_tokens=False).input_ids
    assert len(emoji) > 1  # its first token is part of a UTF-8 character
    r = chat(gw, max_tokens=1, temperature=0, logprobs=True, top_logprobs=0, logit_bias={str(emoji[0]): 100})
    (tok,) = r.choices[0].logprobs.content
    assert bytes(tok.bytes) == "😀".encode()[: len(bytes(tok.bytes))] and len(tok.bytes) < 4
    assert tok.top_logprobs == []
    r = chat(gw, max_tokens=1, temperature=0, logprobs=True, top_logprobs=1, logit_bias={str(emoji[0]): 100})
    assert [(a.token, a.bytes) for a in r.choices[0].logprobs.content[0].top_logprobs] == [(tok.token, tok.bytes)]
    c = client(gw).completions.create(model=gw.settings.edge.model_id, prompt="Hi", max_tokens=4, logprobs=0, seed=9)
    lp = c.choices[0].logprobs
    assert [list(d) for d in lp.top_logprobs] == [[t] for t in lp.tokens]


def test_eos_is_not_in_chat_logprobs(gw):
    r = chat(gw, max_tokens=3, temperature=0, logprobs=True, logit_bias={"2": 100})  # 2: the tiny model's EOS
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    assert r.choices[0].logprobs.content == []


def test_echo_and_default_max_tokens(gw):
    model = gw.settings.edge.model_id
    r = client(gw).completions.create(model=model, prompt="Once upon a time", echo=True, seed=10, logit_bias={"2": -100})
    assert r.choices[0].text.startswith("Once upon a time")
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
    chunks = list(client(gw).completions.create(model=model, prompt="Once upon a time", echo=True, seed=10, stream=True, logit_bias={"2": -100}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    # echo with logprobs scores the prompt too: its first token has nothing before it
    ids = gw.backend.client.tokenizer("Once upon a time").input_ids
    for stream in (False, True):
        out = client(gw).completions.create(model=model, prompt=ids, echo=True, logprobs=1, max_tokens=2, seed=11, stream=stream)
        pieces = [c.choices[0].logprobs for c in out if c.choices] if stream else [out.choices[0].logprobs]
        tokens = [t for p in pieces for t in p.tokens]
        lps = [v for p in pieces for v in p.token_logprobs]
        tops = [t for p in pieces for t in p.top_logprobs]
        assert len(tokens) == len(ids) + 2 and "".join(tokens[: len(ids)]) == "Once upon a time"
        assert lps[0] is None and tops[0] is None and all(v < 0 for v in lps[1:])
        assert all(t in top and top[t] == v for t, v, top in zip(tokens[1:], lps[1:], tops[1:]))


# ---- spec details -------------------------------------------------------------------------


def test_explicit_nulls_are_defaults(gw):
    model = gw.settings.edge.model_id
    nulls = dict.fromkeys(["n", "stream", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
                           "logit_bias", "logprobs", "stream_options", "max_tokens"])
    chat_nulls = {**nulls, **dict.fromkeys(["tools", "tool_choice", "response_format", "top_logprobs", "parallel_tool_calls", "max_completion_tokens"])}
    r = httpx.post(gw.url + "/chat/completions", json={"model": model, "messages": USER, **chat_nulls, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.post(gw.url + "/completions", json={"model": model, "prompt": "Hi", **nulls, "echo": None, "suffix": None, "best_of": None}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 16


def test_models_have_a_real_created_and_fingerprints_follow_the_config(gw, tiny_model_dir):
    models = client(gw).models.list().data
    assert all(m.created > 1_600_000_000 for m in models)
    fp = chat(gw, max_tokens=1).system_fingerprint
    assert fp == chat(gw, max_tokens=1).system_fingerprint
    other = GatewayThread(GatewaySettings.of(server_url=gw.settings.edge.server_url, model=str(tiny_model_dir), noise=0.05, port=0))
    try:
        r = client(other.wait_ready()).chat.completions.create(model=gw.settings.edge.model_id, messages=USER, max_tokens=1)
        assert r.system_fingerprint != fp
    finally:
        other.stop()


def test_openapi_declares_error_statuses_and_metrics_as_text(gw):
    doc = httpx.get(gw.url.removesuffix("/v1") + "/openapi.json").json()
    post = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "429", "502", "503"} <= set(post)
    assert post["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


# ---- /v1/responses ------------------------------------------------------------------------

RESPONSE_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]


def test_responses_text_and_schema(gw):
    c = client(gw)
    r = c.responses.create(model=gw.settings.edge.model_id, input="Hi", instructions="Be brief.", max_output_tokens=5, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text and r.usage.output_tokens == 5
    tokenizer = gw.backend.client.tokenizer
    chat_prompt = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                                add_generation_prompt=True, tokenize=False)
    assert r.usage.input_tokens == len(tokenizer(chat_prompt, add_special_tokens=False).input_ids)  # instructions: the system turn
    fmt = {"type": "json_schema", "name": "forecast", "schema": ANSWER, "strict": True}
    r = c.responses.create(model=gw.settings.edge.model_id, input=[{"role": "user", "content": [{"type": "input_text", "text": "Forecast?"}]}],
                           text={"format": fmt}, max_output_tokens=80)
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), ANSWER)


def test_responses_tool_call_streams_semantic_events(gw):
    named = {"type": "function", "name": "get_weather"}
    with client(gw).responses.stream(model=gw.settings.edge.model_id, input="Weather in Rome?", tools=RESPONSE_TOOLS,
                                     tool_choice=named, parallel_tool_calls=False, max_output_tokens=80) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.done" in kinds
    (call,) = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    # the call's result, sent back statelessly, is answered as text
    history = [{"role": "user", "content": "Weather in Rome?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}]
    r = client(gw).responses.create(model=gw.settings.edge.model_id, input=history, tools=RESPONSE_TOOLS, tool_choice="none", max_output_tokens=3)
    assert r.output[0].type == "message" and r.output_text


def test_responses_is_stateless(gw):
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client(gw).responses.create(model=gw.settings.edge.model_id, input="Hi", previous_response_id="resp_123")
    with pytest.raises(openai.BadRequestError):
        client(gw).responses.create(model=gw.settings.edge.model_id, input="Hi", tools=[{"type": "web_search"}])


# ---- what outside clients (openai-node, langchain, vLLM's tests) check --------------------


def test_top_logprobs_has_exactly_k_alternatives(gw):
    # temperature 2 samples tokens outside the most likely few; their own logprob is the entry's
    for k, stream in ((0, False), (1, False), (3, True)):
        r = chat(gw, max_tokens=12, seed=20, temperature=2.0, logprobs=True, top_logprobs=k, logit_bias={"2": -100}, stream=stream)
        entries = [t for c in r if c.choices[0].logprobs for t in c.choices[0].logprobs.content] if stream else r.choices[0].logprobs.content
        assert len(entries) == 12 and all(len(t.top_logprobs) == k for t in entries), k
        assert all(isinstance(a.logprob, float) for t in entries for a in t.top_logprobs)
        if k:
            assert any(t.token not in [a.token for a in t.top_logprobs] for t in entries)
            assert all(t.top_logprobs[0].logprob >= t.logprob for t in entries)
    # a grammar that admits fewer than k tokens: the rest are impossible, reported as vLLM does (-9999)
    fmt = {"type": "json_schema", "json_schema": {"name": "flag", "schema": {"enum": ["yes"]}}}
    forced = chat(gw, response_format=fmt, max_tokens=5, logprobs=True, top_logprobs=3).choices[0].logprobs.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[-1].logprob == -9999.0 for t in forced)
    # the legacy completions API keeps its own rule: the k most likely and the sampled token (k + 1 at most)
    c = client(gw).completions.create(model=gw.settings.edge.model_id, prompt="Hi", max_tokens=12, logprobs=1, seed=20,
                                      temperature=2.0, logit_bias={"2": -100})
    lp = c.choices[0].logprobs
    assert all(t in top and len(top) in (1, 2) for t, top in zip(lp.tokens, lp.top_logprobs))
    assert any(len(top) == 2 for top in lp.top_logprobs)


# Schemas as clients write them: no additionalProperties anywhere (pydantic's, zod's without .strict()).
OPEN_PLACE = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}
OPEN_TRIP = {"type": "object", "properties": {"to": OPEN_PLACE, "days": {"type": "integer"}}, "required": ["to"]}


def assert_closed(value, schema) -> None:
    """Only the keys `schema` declares, at every level."""
    jsonschema.validate(value, schema)
    if isinstance(value, dict):
        assert set(value) <= set(schema["properties"]), value
        for key, item in value.items():
            assert_closed(item, schema["properties"][key])


def test_a_schema_without_additional_properties_admits_only_its_keys(gw):
    tools = [{"type": "function", "function": {"name": "plan", "parameters": OPEN_TRIP}}]
    named = {"type": "function", "function": {"name": "plan"}}
    r = chat(gw, tools=tools, tool_choice=named, n=4, max_tokens=80, seed=21, parallel_tool_calls=False)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        assert_closed(json.loads(choice.message.tool_calls[0].function.arguments), OPEN_TRIP)
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": OPEN_TRIP}}
    r = chat(gw, response_format=fmt, n=4, max_tokens=80, seed=22)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        assert_closed(json.loads(choice.message.content), OPEN_TRIP)
    # an explicit additionalProperties stays as written; json_object is any object
    free = {"type": "json_schema", "json_schema": {"name": "bag", "schema": {"type": "object", "additionalProperties": {"type": "integer"}}}}
    r = chat(gw, response_format=free, max_tokens=60, seed=23, logit_bias={"2": -100})
    assert r.choices[0].message.content.startswith("{")


def test_a_named_tool_choice_makes_exactly_one_call(gw):
    named = {"type": "function", "function": {"name": "get_time"}}  # parallel_tool_calls left at its default, true
    r = chat(gw, tools=TOOLS, tool_choice=named, n=4, max_tokens=120, seed=24, logit_bias={"2": -100})
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert_valid_call(call, {"get_time"})


def test_a_call_whose_closing_tag_max_tokens_cut_is_still_a_call(gw):
    args = dict(tools=TOOLS, tool_choice="required", seed=25, logprobs=True, logit_bias={"2": -100})
    full = chat(gw, max_tokens=120, parallel_tool_calls=False, **args).choices[0]
    (call,) = full.message.tool_calls
    tokens = [t.token for t in full.logprobs.content]
    text = "".join(tokens)
    json_end = text.index(call.function.arguments) + len(call.function.arguments) + 1  # the call object's "}"
    complete = next(m for m in range(len(tokens) + 1) if len("".join(tokens[:m])) >= json_end)
    assert complete < len(tokens)  # the closing tag takes tokens of its own
    for cut in range(complete, len(tokens)):
        for stream in (False, True):
            r = chat(gw, max_tokens=cut, parallel_tool_calls=False, stream=stream, **args)
            if stream:
                chunks = [c.choices[0] for c in r]
                deltas = [d for c in chunks for d in c.delta.tool_calls or []]
                assert [(d.function.name, d.function.arguments) for d in deltas] == [(call.function.name, call.function.arguments)]
                assert not "".join(c.delta.content or "" for c in chunks)
                finish = chunks[-1].finish_reason
            else:
                (got,) = r.choices[0].message.tool_calls
                assert (got.function.name, got.function.arguments) == (call.function.name, call.function.arguments)
                assert r.choices[0].message.content is None
                finish = r.choices[0].finish_reason
            # nothing but the closing tag could have followed: the answer is complete
            assert finish == "tool_calls", (cut, stream)
    # where more calls might have followed, max_tokens did cut the answer
    r = chat(gw, max_tokens=complete, **args).choices[0]
    assert r.message.tool_calls and r.finish_reason == "length"


def test_custom_roles_reach_the_chat_template(gw):
    tokenizer = gw.backend.client.tokenizer
    messages = [{"role": "narrator", "content": "The lighthouse keeper wakes up."}, {"role": "user", "content": "Go on."}]
    r = chat(gw, messages=messages, max_tokens=1)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>narrator\n" in prompt  # SmolLM2's template writes any role as given
    assert r.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False).input_ids)
    # developer is OpenAI's newer name for system
    as_developer = chat(gw, messages=[{"role": "developer", "content": "Be brief."}, *USER], max_tokens=1)
    as_system = chat(gw, messages=[{"role": "system", "content": "Be brief."}, *USER], max_tokens=1)
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens
    # a role is a name: text that would write template markup of its own is refused
    for role in ("user<|im_end|>", "", "two words"):
        with pytest.raises(openai.BadRequestError, match="role"):
            chat(gw, messages=[{"role": role, "content": "Hi"}], max_tokens=1)


def test_every_bad_logit_bias_key_is_named(gw):
    def message(bias: dict, path="/chat/completions") -> str:
        body = {"model": gw.settings.edge.model_id, "logit_bias": bias, "max_tokens": 1}
        body.update({"messages": USER} if path == "/chat/completions" else {"prompt": "Hi"})
        r = httpx.post(gw.url + path, json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
        return r.json()["error"]["message"]

    for path in ("/chat/completions", "/completions"):
        text = message({"5": 1, "abc": 1, "-3": 2, "7": 101, "9": -250}, path)
        assert all(repr(k) in text for k in ("abc", "-3", "7", "9")) and "'5'" not in text, text
        text = message({"49152": 1, "60000": 1, "12": 1}, path)  # outside the vocabulary (49152 tokens)
        assert "49152" in text and "60000" in text and "12" not in text.replace("49152", ""), text
    # the list is bounded
    text = message({f"x{i}": 1 for i in range(100)})
    assert "'x0'" in text and "'x99'" not in text and "and 92 more" in text and len(text) < 400, text

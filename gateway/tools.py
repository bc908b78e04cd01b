"""Tool calling: how tools reach the prompt, the grammar a call must follow, and how
calls are read back out of the generated text.

A call is written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the
Hermes / Qwen 2.5 format), one per line when several are allowed.  A model whose chat
template takes `tools` (Qwen 2.5, Hermes, Llama 3.1+) gets them through its template;
for any other template (the default SmolLM2's) a system message describes the tools and
this format, and tool results come back as `<tool_response>` user turns.  The grammar
makes every call name a declared function with arguments valid against its schema
(no undeclared keys: `schemas.closed`):
always with tool_choice "required" or a named function, and with "auto" as soon as the
answer opens with `<tool_call>`.
"""

from __future__ import annotations

import json
import uuid

from edge_runtime.constraints import JSON_STYLE

from . import schemas as s

OPEN, CLOSE = "<tool_call>", "</tool_call>"

GENERIC_PROMPT = """# Tools

You may call functions to answer. Each function, as JSON (its name, description, and the JSON Schema of its arguments):
{tools}

To call a function, answer only with
<tool_call>{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}</tool_call>
{several}Each result comes back to you inside <tool_response></tool_response>."""


def template_takes_tools(tokenizer) -> bool:
    return "tools" in (tokenizer.chat_template or "")


def chat_messages(messages: list[s.ChatMessage], tools: list[s.Tool] | None, native: bool, parallel: bool) -> list[dict]:
    """The conversation as the chat template gets it, tool calls and results included."""
    out: list[dict] = []
    after_result = False  # the turn before is a tool result, in the generic format
    for m in messages:
        msg = m.for_template()
        if native:
            if m.tool_calls:
                msg["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                    for c in m.tool_calls
                ]
            if m.role == "tool":
                msg["tool_call_id"] = m.tool_call_id
        elif m.tool_calls:
            calls = [format_call(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls]
            msg["content"] = "\n".join(filter(None, [msg["content"], *calls]))
        elif m.role == "tool":
            response = f"<tool_response>\n{msg['content']}\n</tool_response>"
            if after_result:  # results of parallel calls: one turn
                out[-1]["content"] += "\n" + response
                continue
            msg = {"role": "user", "content": response}
        after_result = m.role == "tool" and not native
        out.append(msg)
    if tools and not native:
        described = "\n".join(json.dumps(t.function.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
        several = "with one such line per call, when several calls are needed. " if parallel else ""
        prompt = GENERIC_PROMPT.format(tools=described, several=several)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def format_call(name: str, arguments: dict) -> str:
    return OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + CLOSE


def call_grammar(tools: list[s.Tool], mode: str, parallel: bool, answer_schema: dict | None = None) -> str:
    """A Lark grammar (llguidance's dialect) of the answer.

    `mode` "required"/"auto": calls to any declared function; otherwise the named one.
    With `answer_schema` ("auto" with a response_format) the answer is either calls or
    JSON following that schema."""
    functions = [t.function for t in tools if mode in ("auto", "required") or t.function.name == mode]
    call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": f.argument_schema},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in functions
        ],
        "x-guidance": JSON_STYLE,
    }
    rules = [
        "calls: call" + (' ("\\n" call)*' if parallel else ""),
        f'call: "{OPEN}" arguments "{CLOSE}"',
        f"arguments: %json {json.dumps(call)}",
    ]
    if answer_schema is not None:
        rules.insert(0, "start: calls | answer")
        rules.append(f"answer: %json {json.dumps({**answer_schema, 'x-guidance': JSON_STYLE})}")
    elif mode == "auto":  # replayed from the answer's start, which may be blank
        rules.insert(0, "start: calls | BLANK calls")
        rules.append("BLANK: /[ \\t\\r\\n]+/")
    else:
        rules.insert(0, "start: calls")
    return "\n".join(rules)


class CallParser:
    """Reads one choice's text as it streams: calls at the start of the answer become
    ToolCalls, anything else is content.  Text that may still turn out to begin a call
    is held back until it is known.

    A call whose JSON is complete is a call even if the answer was cut (max_tokens, a
    stop string) inside its closing tag: the grammar forces that tag, so no sampling
    was needed for it."""

    def __init__(self, names: set[str], several: bool = True):
        """`several`: whether more calls may follow one (False: the answer is complete
        once its call is)."""
        self.names = names
        self.several = several
        self.pending = ""
        self.content = False  # the answer is plain text from here on
        self.calls = 0
        self.cut_close = False  # the last call's closing tag was cut off

    def feed(self, text: str) -> list[str | s.ToolCall]:
        if self.content:
            return [text] if text else []
        self.pending += text
        out: list[str | s.ToolCall] = []
        while True:
            rest = self.pending.lstrip()
            if rest.startswith(OPEN):
                end = rest.find(CLOSE)
                if end < 0:
                    break
                block, self.pending = rest[: end + len(CLOSE)], rest[end + len(CLOSE) :]
                out.append(self._call(block[len(OPEN) : end]) or block)
            elif not OPEN.startswith(rest):
                self.content = True
                out.append(self.pending)
                self.pending = ""
                break
            else:
                break
        return out

    def finish(self) -> list[str | s.ToolCall]:
        """What was held back: a call cut in its closing tag, or else content (e.g. a
        call cut off by max_tokens inside its JSON)."""
        rest, self.pending = self.pending, ""
        body = rest.lstrip().removeprefix(OPEN)
        if body != rest.lstrip():
            try:
                _, end = json.JSONDecoder().raw_decode(body)
            except ValueError:
                end = None
            call = self._call(body[:end]) if end is not None and CLOSE.startswith(body[end:]) else None
            if call is not None:
                self.cut_close = True
                return [call]
        return [rest] if rest.strip() else []

    @property
    def complete(self) -> bool:
        """The answer holds a call and nothing more could have followed it."""
        return self.calls > 0 and self.cut_close and not self.several

    def _call(self, payload: str) -> s.ToolCall | None:
        try:
            call = json.loads(payload)
        except ValueError:
            return None
        if not (isinstance(call, dict) and call.get("name") in self.names and isinstance(call.get("arguments"), dict)):
            return None
        self.calls += 1
        arguments = json.dumps(call["arguments"], ensure_ascii=False)
        return s.ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=s.ToolCallFunction(name=call["name"], arguments=arguments))

"""POST /v1/responses, stateless: a Responses request is rewritten as the chat request it
means (so it is validated, constrained and generated exactly like one), and the chat
answer is written back as a Response object or as the stream of semantic events.

Nothing is stored: `previous_response_id` is refused, `store` is ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from . import schemas as s
from .outputs import ChatOutput


class ResponsesRequest(s._Request):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None

    def chat_request(self) -> dict:
        """The equivalent /v1/chat/completions body (validated by its own model)."""
        if self.previous_response_id:
            raise ValueError("previous_response_id is not supported: this server stores no responses; send the whole conversation as input")
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        for item in items:
            kind = item.get("type", "message")
            if kind == "message":
                content = item.get("content")
                if isinstance(content, list):  # input_text / output_text parts
                    content = [{"type": "text", "text": p.get("text")} if p.get("type") in ("input_text", "output_text", "text") else p for p in content]
                messages.append({"role": item.get("role"), "content": content})
            elif kind == "function_call":
                call = {"id": item.get("call_id"), "type": "function", "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
                if messages and messages[-1].get("tool_calls"):  # parallel calls: one assistant turn
                    messages[-1]["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")})
            else:
                raise ValueError(f"input items of type {kind!r} are not supported")
        body = {
            "model": self.model, "messages": messages, "max_tokens": self.max_output_tokens, "temperature": self.temperature,
            "top_p": self.top_p, "stream": self.stream, "parallel_tool_calls": self.parallel_tool_calls,
        }
        if self.tools is not None:
            body["tools"] = [_chat_tool(t) for t in self.tools]
        if isinstance(self.tool_choice, dict):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.get("name")}}
        else:
            body["tool_choice"] = self.tool_choice
        fmt = (self.text or {}).get("format")
        if fmt and fmt.get("type") == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {k: fmt.get(k) for k in ("name", "description", "schema", "strict")}}
        elif fmt:
            body["response_format"] = {"type": fmt.get("type")}
        return body


def _chat_tool(tool: dict) -> dict:
    if tool.get("type") != "function":
        raise ValueError(f"tools of type {tool.get('type')!r} are not supported; only function tools")
    return {"type": "function", "function": {k: tool.get(k) for k in ("name", "description", "parameters", "strict")}}


class ResponseOutput:
    """Writes one chat choice as a Response, whole or as semantic stream events; it
    stands in for the chat Output when the gateway answers (add, opening, chunk, response)."""

    def __init__(self, req: ResponsesRequest, chat: ChatOutput):
        self.req = req
        self.chat = chat
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.seq = 0
        self.items: list[dict] = []  # output items so far
        self.open_message: dict | None = None  # the message item text is streaming into

    def snapshot(self, status: str = "completed", finish: str | None = None) -> dict:
        incomplete = finish == "length"
        usage = self.chat.usage()
        return {
            "id": self.id, "object": "response", "created_at": self.created, "model": self.req.model,
            "status": "incomplete" if incomplete else status,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "error": None, "output": self.items, "instructions": self.req.instructions,
            "max_output_tokens": self.req.max_output_tokens, "temperature": self.req.temperature, "top_p": self.req.top_p,
            "tools": self.req.tools or [], "tool_choice": self.req.tool_choice or "auto",
            "parallel_tool_calls": self.req.parallel_tool_calls is not False, "text": self.req.text or {"format": {"type": "text"}},
            "store": False, "metadata": {}, "previous_response_id": None,
            "usage": {
                "input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens, "total_tokens": usage.total_tokens,
                "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0},
            },
        }

    def add(self, index: int, event) -> None:
        self.chat.add(index, event)

    def response(self) -> dict:
        choice = self.chat.response().choices[0]
        if choice.message.content:
            self.items.append(_message(choice.message.content))
        for call in choice.message.tool_calls or []:
            self.items.append(_function_call(call))
        return self.snapshot(finish=choice.finish_reason)

    # ---- streaming ------------------------------------------------------------------------

    def opening(self) -> list[bytes]:
        snapshot = self.snapshot(status="in_progress")
        return [self._event("response.created", response=snapshot), self._event("response.in_progress", response=snapshot)]

    def chunk(self, index: int, event) -> bytes | None:
        """The events (already framed) the chat chunk of this token makes."""
        chunk = self.chat.chunk(index, event)
        return b"".join(self._events(chunk)) or None if chunk is not None else None

    def _events(self, chunk: s.ChatCompletionChunk) -> list[bytes]:
        choice = chunk.choices[0]
        out = []
        if choice.delta.content:
            if self.open_message is None:
                self.open_message = _message("", status="in_progress")
                self.items.append(self.open_message)
                out += [self._event("response.output_item.added", output_index=len(self.items) - 1, item=self.open_message),
                        self._event("response.content_part.added", **self._part_ref(), part=_text_part(""))]
            self.open_message["content"][0]["text"] += choice.delta.content
            out.append(self._event("response.output_text.delta", **self._part_ref(), delta=choice.delta.content, logprobs=[]))
        for delta in choice.delta.tool_calls or []:
            out += self._close_message()
            item = _function_call(s.ToolCall(id=delta.id, function=s.ToolCallFunction(name=delta.function.name, arguments=delta.function.arguments)))
            self.items.append(item)
            index = len(self.items) - 1
            out += [
                self._event("response.output_item.added", output_index=index, item={**item, "arguments": "", "status": "in_progress"}),
                self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=item["arguments"]),
                self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index, arguments=item["arguments"]),
                self._event("response.output_item.done", output_index=index, item=item),
            ]
        if choice.finish_reason:
            out += self._close_message()
            final = self.snapshot(finish=choice.finish_reason)
            out.append(self._event(f"response.{final['status']}", response=final))
        return out

    def _part_ref(self) -> dict:
        return {"item_id": self.open_message["id"], "output_index": self.items.index(self.open_message), "content_index": 0}

    def _close_message(self) -> list[bytes]:
        if self.open_message is None:
            return []
        item, ref = self.open_message, self._part_ref()
        self.open_message = None
        item["status"] = "completed"
        part = item["content"][0]
        return [
            self._event("response.output_text.done", **ref, text=part["text"], logprobs=[]),
            self._event("response.content_part.done", **ref, part=part),
            self._event("response.output_item.done", output_index=ref["output_index"], item=item),
        ]

    def _event(self, kind: str, **fields) -> bytes:
        self.seq += 1
        data = {"type": kind, "sequence_number": self.seq - 1, **fields}
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant", "content": [_text_part(text)]}


def _function_call(call: s.ToolCall) -> dict:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.id, "name": call.function.name,
            "arguments": call.function.arguments, "status": "completed"}

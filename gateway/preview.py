"""What leaves the device for a chat request: the templated text the edge encodes, with
the pseudonymizer's surrogates in place, and each hidden span.  Nothing is sent to the
server (POST /fedsea/v1/preview, `fedsea preview`)."""

from __future__ import annotations

from edge_runtime.pseudonyms import Pseudonymizer, chat_text, sent_spans

from . import limits, tools
from .schemas import ChatCompletionRequest, Preview, PreviewSpan


def template_input(req: ChatCompletionRequest, tokenizer, context: int | None = None) -> tuple[list[dict], list[dict] | None]:
    """(the messages the chat template gets, the tools it gets itself or None) for this
    request; a 400 for text that cannot fit `context` tokens."""
    mode = req.tool_mode
    native = mode is not None and tools.template_takes_tools(tokenizer)
    messages = tools.chat_messages(req.messages, req.tools if mode else None, native, req.parallel_calls)
    if context is not None:
        limits.refuse_overlong_text([str(m.get("content") or "") for m in messages], tokenizer, context, "messages")
    return messages, [t.model_dump(exclude_none=True) for t in req.tools] if native else None


def preview(tokenizer, pseudonymizer: Pseudonymizer | None, messages: list[dict], native_tools: list[dict] | None) -> Preview:
    """What `chat_text` makes of `template_input`'s messages and tools."""
    text, pseudonyms = chat_text(tokenizer, pseudonymizer, messages, native_tools)
    return Preview(sent_text=text, spans=[
        PreviewSpan(kind=r.kind, text=r.original, surrogate=r.surrogate, start=start, end=end)
        for r, start, end in sent_spans(text, pseudonyms)
    ])

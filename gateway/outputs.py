"""Turning the edge's token events into OpenAI responses and stream chunks.

One `Output` per request collects every choice's events (for the non-streaming answer
and the usage counts) and formats each event as a chunk when streaming.  The chat and
text-completion endpoints differ only in these shapes.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from edge_runtime.client import TokenEvent

from . import schemas as s

FINGERPRINT = "fedsea"


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    events: list[TokenEvent] = field(default_factory=list)
    chars: int = 0  # length of the text so far
    finish_reason: str | None = None


class Output:
    prefix = ""

    def __init__(self, model: str, tokenizer, num_choices: int, prompt_tokens: int, with_logprobs: bool):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        self.with_logprobs = with_logprobs
        self.choices = [_Choice() for _ in range(num_choices)]

    def add(self, index: int, event: TokenEvent) -> None:
        c = self.choices[index]
        c.text.append(event.text)
        c.chars += len(event.text)
        c.events.append(event)
        c.finish_reason = event.finish_reason or c.finish_reason

    def usage(self) -> s.Usage:
        completion = sum(len(c.events) for c in self.choices)  # every sampled token, EOS included
        return s.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion, total_tokens=self.prompt_tokens + completion)

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _common(self) -> dict:
        return dict(id=self.id, created=self.created, model=self.model, system_fingerprint=FINGERPRINT)

    # Each endpoint also defines response(), chunk(index, event) and usage_chunk().
    def opening(self) -> list:
        """Chunks that open a stream, before any token."""
        return []


class ChatOutput(Output):
    prefix = "chatcmpl"

    def _logprobs(self, events: list[TokenEvent]) -> s.ChatLogprobs | None:
        if not self.with_logprobs:
            return None
        return s.ChatLogprobs(content=[
            s.TokenLogprob(
                **self._alt(e.token_id, e.logprob),
                top_logprobs=[s.TopLogprob(**self._alt(t, lp)) for t, lp in e.top_logprobs or []],
            )
            for e in events
        ])

    def _alt(self, token_id: int, logprob: float) -> dict:
        text = self.token(token_id)
        return dict(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    def response(self) -> s.ChatCompletion:
        return s.ChatCompletion(
            **self._common(),
            choices=[
                s.ChatChoice(index=i, message=s.AssistantMessage(content="".join(c.text)), logprobs=self._logprobs(c.events), finish_reason=c.finish_reason)
                for i, c in enumerate(self.choices)
            ],
            usage=self.usage(),
        )

    def opening(self) -> list[s.ChatCompletionChunk]:
        return [
            s.ChatCompletionChunk(**self._common(), choices=[s.ChatChunkChoice(index=i, delta=s.ChatDelta(role="assistant", content=""))])
            for i in range(len(self.choices))
        ]

    def chunk(self, index: int, event: TokenEvent) -> s.ChatCompletionChunk | None:
        if not (event.text or event.finish_reason or self.with_logprobs):
            return None  # nothing to say yet (a character or a possible stop string is incomplete)
        choice = s.ChatChunkChoice(
            index=index, delta=s.ChatDelta(content=event.text), logprobs=self._logprobs([event]), finish_reason=event.finish_reason
        )
        return s.ChatCompletionChunk(**self._common(), choices=[choice])

    def usage_chunk(self) -> s.ChatCompletionChunk:
        return s.ChatCompletionChunk(**self._common(), choices=[], usage=self.usage())


class CompletionOutput(Output):
    prefix = "cmpl"

    def _logprobs(self, events: list[TokenEvent], offset: int) -> s.CompletionLogprobs | None:
        if not self.with_logprobs:
            return None
        offsets = []
        for e in events:
            offsets.append(offset)
            offset += len(e.text)
        return s.CompletionLogprobs(
            tokens=[self.token(e.token_id) for e in events],
            token_logprobs=[e.logprob for e in events],
            top_logprobs=[{self.token(t): lp for t, lp in e.top_logprobs or []} for e in events],
            text_offset=offsets,
        )

    def response(self) -> s.TextCompletion:
        return s.TextCompletion(
            **self._common(),
            choices=[
                s.CompletionChoice(index=i, text="".join(c.text), logprobs=self._logprobs(c.events, 0), finish_reason=c.finish_reason)
                for i, c in enumerate(self.choices)
            ],
            usage=self.usage(),
        )

    def chunk(self, index: int, event: TokenEvent) -> s.TextCompletion | None:
        if not (event.text or event.finish_reason or self.with_logprobs):
            return None
        # add() has already counted this event: its offset is the text before it.
        offset = self.choices[index].chars - len(event.text)
        choice = s.CompletionChoice(index=index, text=event.text, logprobs=self._logprobs([event], offset), finish_reason=event.finish_reason)
        return s.TextCompletion(**self._common(), choices=[choice])

    def usage_chunk(self) -> s.TextCompletion:
        return s.TextCompletion(**self._common(), choices=[], usage=self.usage())

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
from edge_runtime.pseudonyms import restored

from . import schemas as s
from .tools import CallParser

# What an alternative the grammar ruled out (logprob -inf, which JSON cannot carry) is
# reported with, as vLLM does.
MIN_LOGPROB = -9999.0


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    events: list[TokenEvent] = field(default_factory=list)
    chars: int = 0  # length of the text so far
    finish_reason: str | None = None


@dataclass
class Vocab:
    """What formatting needs of the model's vocabulary."""

    tokenizer: object
    token_bytes: object  # token id -> its raw bytes
    eos_ids: set[int]


class Output:
    prefix = ""

    def __init__(self, model: str, vocab: Vocab, num_choices: int, prompt_tokens: int, with_logprobs: bool,
                 fingerprint: str):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.vocab = vocab
        self.tokenizer = vocab.tokenizer
        self.prompt_tokens = prompt_tokens
        self.with_logprobs = with_logprobs
        self.fingerprint = fingerprint
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
        return dict(id=self.id, created=self.created, model=self.model, system_fingerprint=self.fingerprint)

    # Each endpoint also defines response(), chunk(index, event) and usage_chunk().
    def opening(self) -> list:
        """Chunks that open a stream, before any token."""
        return []


class ChatOutput(Output):
    prefix = "chatcmpl"

    def __init__(self, *args, tools: set[str] | None = None, several_calls: bool = True, **kwargs):
        """`tools`: the names of the functions the answer may call (None: no tools);
        `several_calls`: whether an answer may hold more than one call."""
        super().__init__(*args, **kwargs)
        self.tools = tools
        self.several_calls = several_calls
        self.parsers = [self._parser() for _ in self.choices] if tools else None

    def _parser(self) -> CallParser:
        return CallParser(self.tools, self.several_calls)

    def _logprobs(self, events: list[TokenEvent]) -> s.ChatLogprobs | None:
        if not self.with_logprobs:
            return None
        return s.ChatLogprobs(content=[
            s.TokenLogprob(
                **self._alt(e.token_id, e.logprob),
                top_logprobs=[s.TopLogprob(**self._alt(t, lp)) for t, lp in e.top_logprobs or []],
            )
            for e in events
            if e.token_id not in self.vocab.eos_ids  # the end of the turn is not content
        ])

    def _alt(self, token_id: int, logprob: float) -> dict:
        return dict(token=self.token(token_id), logprob=max(logprob, MIN_LOGPROB), bytes=list(self.vocab.token_bytes(token_id)))

    def _finish(self, finish_reason: str | None, parser: CallParser) -> str | None:
        if parser.calls and (finish_reason == "stop" or parser.complete):
            return "tool_calls"
        return finish_reason

    def response(self) -> s.ChatCompletion:
        choices = []
        for i, c in enumerate(self.choices):
            text, calls, finish = "".join(c.text), [], c.finish_reason
            if self.tools:
                parser = self._parser()
                pieces = parser.feed(text) + parser.finish()
                text = "".join(p for p in pieces if isinstance(p, str))
                calls = [p for p in pieces if isinstance(p, s.ToolCall)]
                finish = self._finish(finish, parser)
            message = s.AssistantMessage(content=text if text or not calls else None, tool_calls=calls or None)
            choices.append(s.ChatChoice(index=i, message=message, logprobs=self._logprobs(c.events), finish_reason=finish))
        return s.ChatCompletion(**self._common(), choices=choices, usage=self.usage())

    def opening(self) -> list[s.ChatCompletionChunk]:
        return [
            s.ChatCompletionChunk(**self._common(), choices=[s.ChatChunkChoice(index=i, delta=s.ChatDelta(role="assistant", content=""))])
            for i in range(len(self.choices))
        ]

    def chunk(self, index: int, event: TokenEvent) -> s.ChatCompletionChunk | None:
        text, calls, finish = event.text, [], event.finish_reason
        if self.parsers:
            parser = self.parsers[index]
            before = parser.calls
            pieces = parser.feed(text) + (parser.finish() if finish else [])
            text = "".join(p for p in pieces if isinstance(p, str))
            calls = [
                s.ToolCallDelta(index=before + k, id=p.id, type="function", function=s.ToolCallFunctionDelta(**p.function.model_dump()))
                for k, p in enumerate(p for p in pieces if isinstance(p, s.ToolCall))
            ]
            finish = self._finish(finish, parser)
        if not (text or calls or finish or self.with_logprobs):
            return None  # nothing to say yet (a character, a possible stop string or tool call is incomplete)
        delta = s.ChatDelta(content=text or None, tool_calls=calls or None)
        choice = s.ChatChunkChoice(index=index, delta=delta, logprobs=self._logprobs([event]), finish_reason=finish)
        return s.ChatCompletionChunk(**self._common(), choices=[choice])

    def usage_chunk(self) -> s.ChatCompletionChunk:
        return s.ChatCompletionChunk(**self._common(), choices=[], usage=self.usage())


class CompletionOutput(Output):
    prefix = "cmpl"

    def __init__(self, *args, echo: list[list[int]] | None = None, **kwargs):
        """`echo`: each choice's prompt, to put before its answer (None: no echo); with
        logprobs, its tokens are scored too (the first has no logprob: nothing precedes it)."""
        super().__init__(*args, **kwargs)
        self.echo = echo

    def _echoed(self, index: int) -> str:
        return restored(self.echo[index], self.tokenizer.decode(self.echo[index])) if self.echo else ""

    def _prompt_entries(self, index: int, first: TokenEvent) -> list[tuple]:
        if not self.echo:
            return []
        ids = self.echo[index]
        scored = [(lp, self._top(t, lp, top)) for t, (lp, top) in zip(ids[1:], first.prompt_logprobs or [])]
        return [(self.token(t), *score) for t, score in zip(ids, [(None, None), *scored])]

    def _top(self, token_id: int, logprob: float, top: list[tuple[int, float]] | None) -> dict[str, float]:
        """The legacy API's alternatives: the k most likely and the chosen token, so up to
        k + 1 (OpenAI's reference for `logprobs`)."""
        alternatives = {self.token(t): max(lp, MIN_LOGPROB) for t, lp in top or []}
        alternatives.setdefault(self.token(token_id), logprob)
        return alternatives

    def _logprobs(self, entries: list[tuple], offset: int) -> s.CompletionLogprobs | None:
        """Entries: (token text, logprob, top alternatives) in order from `offset`."""
        if not self.with_logprobs:
            return None
        offsets = []
        for text, _, _ in entries:
            offsets.append(offset)
            offset += len(text)
        return s.CompletionLogprobs(
            tokens=[e[0] for e in entries], token_logprobs=[e[1] for e in entries],
            top_logprobs=[e[2] for e in entries], text_offset=offsets,
        )

    def _entries(self, events: list[TokenEvent]) -> list[tuple]:
        return [(self.token(e.token_id), e.logprob, self._top(e.token_id, e.logprob, e.top_logprobs)) for e in events]

    def response(self) -> s.TextCompletion:
        choices = []
        for i, c in enumerate(self.choices):
            entries = self._prompt_entries(i, c.events[0]) + self._entries(c.events)
            text = self._echoed(i) + "".join(c.text)
            choices.append(s.CompletionChoice(index=i, text=text, logprobs=self._logprobs(entries, 0), finish_reason=c.finish_reason))
        return s.TextCompletion(**self._common(), choices=choices, usage=self.usage())

    def chunk(self, index: int, event: TokenEvent) -> s.TextCompletion | None:
        first = len(self.choices[index].events) == 1  # add() has already counted this event
        if not (event.text or event.finish_reason or self.with_logprobs or (first and self.echo)):
            return None
        if first:  # the echoed prompt comes with the first token, which brings its scores
            text, entries, offset = self._echoed(index) + event.text, self._prompt_entries(index, event) + self._entries([event]), 0
        else:
            text, entries = event.text, self._entries([event])
            offset = len(self._echoed(index)) + self.choices[index].chars - len(event.text)
        choice = s.CompletionChoice(index=index, text=text, logprobs=self._logprobs(entries, offset), finish_reason=event.finish_reason)
        return s.TextCompletion(**self._common(), choices=[choice])

    def usage_chunk(self) -> s.TextCompletion:
        return s.TextCompletion(**self._common(), choices=[], usage=self.usage())

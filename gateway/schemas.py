"""Request and response bodies of the OpenAI-compatible API (the part fedsea serves).

Requests ignore fields they do not know (clients send many); the ranges follow OpenAI's
API reference, so a request OpenAI would refuse gets a 400 here too, and an explicit
null means the default wherever OpenAI allows null.  Fields OpenAI defines but fedsea
cannot honour (suffix, best_of != n, non-text content) are refused with a 400 that
says so, rather than silently ignored.  JSON Schemas (tool parameters, json_schema
answers) are enforced as in OpenAI's strict mode: an object admits only the keys it
declares unless it says otherwise (`closed`).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from edge_runtime.sampling import BOUNDS, LOGIT_BIAS, SamplingParams, describe, within

Penalty = Annotated[float, Field(**BOUNDS["presence_penalty"])]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
MAX_STOPS = 4
MAX_CHOICES = 128  # OpenAI's limit on n; applied to prompts x n of a batch too
MAX_TOOLS = 128  # OpenAI's limit on tools per request
COMPLETION_MAX_TOKENS = 16  # /v1/completions' default max_tokens, as OpenAI's
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
LISTED = 8  # offending items an error names, of however many


def listed(items: list) -> str:
    """Items for an error message: every one, up to LISTED of them."""
    shown = ", ".join(map(repr, items[:LISTED]))
    return shown + (f" and {len(items) - LISTED} more" if len(items) > LISTED else "")


# JSON Schema keywords whose values are schemas: one, a list of them, or a map of them.
_SUBSCHEMA = ("additionalProperties", "items", "additionalItems", "unevaluatedItems", "contains", "not", "if", "then", "else")
_SUBSCHEMA_LIST = ("anyOf", "oneOf", "prefixItems", "items")
_SUBSCHEMA_MAP = ("properties", "patternProperties", "dependentSchemas", "$defs", "definitions")


def closed(schema: Any, part: bool = False) -> Any:
    """`schema` with every object schema that does not say `additionalProperties` (or
    `unevaluatedProperties`) admitting only the keys it declares: additionalProperties
    false by default, as OpenAI's strict mode and xgrammar.  Without it a small model
    adds keys until max_tokens.  The members of an allOf, and the schema holding it,
    stay as written: one object's keys are spread over them."""
    if not isinstance(schema, dict):
        return schema  # true, false, or what the grammar compiler will refuse
    out = {}
    for key, value in schema.items():
        if key in _SUBSCHEMA_MAP and isinstance(value, dict):
            out[key] = {name: closed(sub) for name, sub in value.items()}
        elif key in (*_SUBSCHEMA_LIST, "allOf") and isinstance(value, list):
            out[key] = [closed(sub, part=key == "allOf") for sub in value]
        elif key in _SUBSCHEMA:
            out[key] = closed(value)
        else:
            out[key] = value
    kind = schema.get("type")
    is_object = kind == "object" or isinstance(kind, list) and "object" in kind or "properties" in schema
    if is_object and not part and "allOf" not in schema and not {"additionalProperties", "unevaluatedProperties"} & set(schema):
        out["additionalProperties"] = False
    return out


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        # Every nullable field here has null as its default, so an explicit null is
        # the same as leaving the field out.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class ContentPart(_Request):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text" or self.text is None:
            raise ValueError(f"content parts of type {self.type!r} are not supported; this model reads text parts only")
        return self


class FunctionCall(_Request):
    name: FunctionName
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments):
        if not arguments.strip():  # some clients send "" for a call without arguments
            return "{}"
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError("a tool call's arguments must be a JSON object")
        return arguments


class MessageToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    # OpenAI's roles, or any other name (as vLLM): passed to the chat template as given,
    # which writes it (SmolLM2's, ChatML's) or refuses it (a 400 that says so).  A name,
    # so that a role cannot carry template markup of its own.
    role: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    content: str | list[ContentPart] | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool

    @model_validator(mode="after")
    def _has_content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        """The message as the chat template expects it: plain text; `developer` is
        OpenAI's newer name for `system`."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text}


class FunctionDefinition(_Request):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON Schema; none: no arguments
    strict: bool | None = None  # the parameters are enforced either way, as in strict mode

    @property
    def argument_schema(self) -> dict:
        """What a call's arguments must follow (see `closed`: no undeclared keys)."""
        return closed(self.parameters or {"type": "object", "properties": {}})


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: FunctionName


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Request):
    include_usage: bool = False


class JSONSchemaFormat(_Request):
    name: FunctionName
    description: str | None = None
    schema_: Annotated[dict[str, Any], Field(alias="schema")] = {}
    strict: bool | None = None  # the schema is enforced either way, as in strict mode (see `closed`)


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self

    @property
    def answer_schema(self) -> dict | None:
        """The JSON Schema the answer must follow (None: free text); json_object: any object."""
        if self.type == "json_object":
            return {"type": "object"}
        return closed(self.json_schema.schema_) if self.type == "json_schema" else None


class _SamplingRequest(_Request):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str
    max_tokens: Annotated[int, Field(**BOUNDS["max_tokens"])] | None = None
    temperature: Annotated[float, Field(**BOUNDS["temperature"])] | None = None
    top_p: Annotated[float, Field(**BOUNDS["top_p"])] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None  # token id (a decimal string) -> bias (LOGIT_BIAS)
    # Extras (vLLM's names): top_k -1 or 0 means no cut, repetition_penalty is HF's.
    top_k: Annotated[int, Field(ge=-1)] | None = None
    repetition_penalty: Annotated[float, Field(**BOUNDS["repetition_penalty"])] | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        if isinstance(stop, list) and len(stop) > MAX_STOPS:
            raise ValueError(f"stop takes at most {MAX_STOPS} sequences")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, bias):
        bad = [k for k, v in bias.items() if not (re.fullmatch(r"[0-9]{1,9}", k) and within(v, LOGIT_BIAS))]
        if bad:
            raise ValueError(f"logit_bias maps token ids to biases {describe(LOGIT_BIAS)}; these entries do not: {listed(bad)}")
        return bias

    @model_validator(mode="after")
    def _check(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, logprobs: int | None, prompt_logprobs: bool = False) -> SamplingParams:
        """Sampling parameters for the edge (max_tokens and seed are set per choice)."""
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        if top_p == 0:  # the smallest nucleus is the single most likely token
            temperature, top_p = 0.0, 1.0
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=max(self.top_k or 0, 0),
            seed=self.seed,
            stop=stop,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logprobs=logprobs,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            prompt_logprobs=logprobs if prompt_logprobs else None,
        )


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(**BOUNDS["max_tokens"])] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(**BOUNDS["logprobs"])] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct function names")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice requires tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools")
        if self.answer_schema is not None and self.tool_mode not in (None, "auto"):
            raise ValueError("response_format and a required tool call cannot both constrain the answer")
        return self

    @property
    def answer_schema(self) -> dict | None:
        return self.response_format.answer_schema if self.response_format else None

    @property
    def tool_mode(self) -> str | None:
        """None (no tools in play), "auto", "required", or the one function's name."""
        choice = self.tool_choice or ("auto" if self.tools else "none")
        if choice == "none" or not self.tools:
            return None
        return choice if isinstance(choice, str) else choice.function.name

    @property
    def parallel_calls(self) -> bool:
        """Whether the answer may hold several calls: a named tool_choice calls that
        function once, whatever parallel_tool_calls says (as OpenAI)."""
        return self.parallel_tool_calls and self.tool_mode in ("auto", "required")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_alternatives(self) -> int | None:
        """How many alternatives per token the edge returns; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.suffix:
            raise ValueError("suffix is not supported: the model does not do fill-in-the-middle")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (it must equal n when given)")
        return self

    @property
    def token_limit(self) -> int:
        return self.max_tokens or COMPLETION_MAX_TOKENS

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


# ---- responses -------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer
    def _calls_when_made(self) -> dict:
        out = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return out


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallFunctionDelta(BaseModel):
    name: str | None = None
    arguments: str


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallFunctionDelta

    @model_serializer
    def _present_only(self) -> dict:
        fn = {k: v for k, v in (("name", self.function.name), ("arguments", self.function.arguments)) if v is not None}
        out = {"index": self.index, "id": self.id, "type": self.type, "function": fn}
        return {k: v for k, v in out.items() if v is not None}


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer
    def _present_only(self) -> dict:  # a delta carries only what changed
        out = {"role": self.role, "content": self.content, "tool_calls": self.tool_calls and [c.model_dump() for c in self.tool_calls]}
        return {k: v for k, v in out.items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # only the final chunk of an include_usage stream sets it


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None for an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class TextCompletion(BaseModel):
    """A /v1/completions response, and (with usage None) each chunk of its stream."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fedsea"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PreviewSpan(BaseModel):
    kind: str = Field(description="first / last (parts of a name), email, phone, card, iban, address, postcode, dob, "
                                  "ssn, ip, id, number")
    text: str = Field(description="the span as the user wrote it; it stays on the device")
    surrogate: str = Field(description="what is sent in its place")
    start: int = Field(description="where the surrogate starts in sent_text (characters)")
    end: int


class Preview(BaseModel):
    sent_text: str = Field(description="the templated text the edge encodes, surrogates in place: what the server's "
                                       "hidden states can be read back to")
    spans: list[PreviewSpan]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

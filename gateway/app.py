"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/responses,
/v1/models, /health and /metrics, in front of the gateway's one edge client; and
/fedsea/v1/preview, what a chat request would send (gateway.preview)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import AsyncIterator

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from edge_runtime.constraints import GrammarError
from edge_runtime.pii import TextTooLong
from fedsea_shared.threads import serial

from . import errors, limits, page, tools
from .backend import Backend, GatewaySettings
from .errors import APIError, json_response
from .inspection import Inspector, InspectRequest
from .metrics import GatewayMetrics, RequestCounter
from .outputs import ChatOutput, CompletionOutput, Output, Vocab
from .preview import preview, template_input
from .responses import ResponseOutput, ResponsesRequest
from .schemas import (MAX_CHOICES, ChatCompletionRequest, CompletionRequest, ErrorResponse, ModelCard, ModelList,
                      Preview, listed)

log = logging.getLogger("fedsea.gateway")

DONE = b"data: [DONE]\n\n"
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
# Far above any prompt that fits the context (128 prompts x 8k token ids fit); a larger
# body is refused with 413 before it is read into memory.
MAX_BODY_BYTES = 16 * 2**20
# The statuses the API answers with, for the OpenAPI document (all in the error envelope).
ERRORS = {
    code: {"model": ErrorResponse, "description": why}
    for code, why in {
        400: "invalid request", 401: "missing or wrong API key", 404: "unknown model", 413: "body too large, or more text than the pseudonymizer takes",
        429: "the server runtime is at capacity", 502: "the server runtime failed or refused",
        503: "not ready (loading or not connected)",
    }.items()
}


def fingerprint(settings: GatewaySettings, adapter: str | None) -> str:
    """Names the configuration that shapes outputs: model, split, noise and adapter."""
    s = settings.edge
    parts = [s.model, s.head, s.tail, s.noise, adapter, s.adapters.get(adapter) if adapter else None]
    return "fp_" + hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def create_app(settings: GatewaySettings) -> FastAPI:
    metrics = GatewayMetrics()
    backend = Backend(settings, metrics)
    model_id = settings.edge.model_id
    # Model ids clients may ask for -> the adapter that serves them (None: the base model).
    served: dict[str, str | None] = {model_id: None, **{name: name for name in settings.edge.adapters}}
    created = int(time.time())  # models are reported as created when this gateway loaded them

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # The threads that load the edge and tokenize for the event loop stay out of OpenMP
        # (fedsea_shared.threads: one team per process).
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(thread_name_prefix="fedsea-gateway-io", initializer=serial))
        backend.start()
        yield
        await backend.close()

    # The schema is served below, behind the key when the status pages are protected.
    app = FastAPI(title="fedsea gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  max_body_size=MAX_BODY_BYTES)
    app.state.backend = backend
    app.state.model_id = model_id
    errors.install(app)

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    def check_model(name: str) -> str | None:
        """The adapter serving model `name` (None: the base model); 404 if none does."""
        if name not in served:
            raise APIError(404, f"the model {name!r} does not exist; this gateway serves {sorted(served)}", param="model", code="model_not_found")
        return served[name]

    def check_bias(bias: dict | None, vocab: int) -> None:
        too_big = [k for k in bias or {} if int(k) >= vocab]
        if too_big:
            raise errors.bad_request(f"logit_bias names tokens outside the vocabulary (size {vocab}): {listed(too_big)}", param="logit_bias")

    async def vocab_of(client, logprobs: bool) -> Vocab:
        if logprobs:  # token bytes come from the grammar library's view of the vocabulary: built once, ~1 s
            await asyncio.to_thread(getattr, client.grammars, "lltokenizer")
        return Vocab(client.tokenizer, client.grammars.token_bytes, client.eos_ids)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)], responses=ERRORS)

    @v1.get("/models")
    async def models() -> Response:
        return json_response(ModelList(data=[ModelCard(id=name, created=created) for name in served]))

    @v1.get("/models/{name:path}")
    async def model(name: str) -> Response:
        check_model(name)
        return json_response(ModelCard(id=name, created=created))

    @v1.post("/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        out, events = await start_chat(req)
        return await respond(request, events, out, req.stream, req.include_usage)

    @v1.post("/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        try:
            req = ChatCompletionRequest.model_validate(body.chat_request())
        except (ValueError, ValidationError) as e:
            detail = e.errors()[0] if isinstance(e, ValidationError) else None
            message = f"{'.'.join(map(str, detail['loc']))}: {detail['msg']}" if detail else str(e)
            raise errors.bad_request(message.replace("Value error, ", "")) from e
        out, events = await start_chat(req)
        return await respond(request, events, ResponseOutput(body, out), req.stream, include_usage=False)

    async def start_chat(req: ChatCompletionRequest) -> tuple[ChatOutput, AsyncIterator]:
        adapter = check_model(req.model)
        client = backend.require_client()
        check_bias(req.logit_bias, client.config.vocab_size)
        # Off the event loop: pseudonymizing, templating and tokenizing a long message takes seconds.
        prompt = await templated(client.chat_prompt, *chat_input(req, client))
        constraint = await answer_constraint(client, req)
        logprobs = req.top_alternatives
        names = {t.function.name for t in req.tools} if req.tool_mode else None
        out = ChatOutput(req.model, await vocab_of(client, logprobs is not None), req.n, len(prompt), logprobs is not None, fingerprint(settings, adapter), tools=names, several_calls=req.parallel_calls)
        return out, backend.generate([prompt], req.n, req.sampling(logprobs), req.token_limit, adapter, constraint)

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        adapter = check_model(req.model)
        client = backend.require_client()
        vocab = client.config.vocab_size
        check_bias(req.logit_bias, vocab)
        if not 1 <= len(req.prompts) * req.n <= MAX_CHOICES:
            raise errors.bad_request(f"a request makes 1 to {MAX_CHOICES} choices (prompts x n)", param="prompt")
        prompts = []
        for p in req.prompts:
            if isinstance(p, str):
                limits.refuse_overlong_text([p], client.tokenizer, client.config.max_position_embeddings, "prompt")
            try:
                ids = await asyncio.to_thread(client.text_prompt, p) if isinstance(p, str) else p
            except TextTooLong as e:
                raise errors.APIError(413, str(e), param="prompt", code="text_too_long") from e
            except ValueError as e:  # the pseudonymizer refuses a prompt it cannot map back
                raise errors.bad_request(str(e), param="prompt") from e
            if not ids:
                raise errors.bad_request("the prompt is empty", param="prompt")
            if max(ids) >= vocab:
                raise errors.bad_request(f"token id {max(ids)} is outside the vocabulary (size {vocab})", param="prompt")
            prompts.append(ids)
        echo = [p for p in prompts for _ in range(req.n)] if req.echo else None
        out = CompletionOutput(
            req.model, await vocab_of(client, False), len(prompts) * req.n, sum(map(len, prompts)), req.logprobs is not None,
            fingerprint(settings, adapter), echo=echo,
        )
        events = backend.generate(prompts, req.n, req.sampling(req.logprobs, prompt_logprobs=req.echo), req.token_limit, adapter)
        return await respond(request, events, out, req.stream, req.include_usage)

    app.include_router(v1)

    # What leaves the device, computed on it (the chat page's calls, `fedsea preview`).
    fedsea = APIRouter(prefix="/fedsea/v1", dependencies=[Depends(check_key)], responses=ERRORS)
    inspector: Inspector | None = None  # made with the edge client, on first use

    @fedsea.post("/preview", response_model=Preview)
    async def preview_request(req: ChatCompletionRequest) -> Response:
        """What this chat request would send: the templated text with the pseudonymizer's
        surrogates in place, and each hidden span.  Nothing reaches the server."""
        check_model(req.model)
        client = backend.require_client()
        return json_response(await templated(preview, client.tokenizer, client.pseudonymizer, *chat_input(req, client)))

    @fedsea.post("/inspect")
    async def inspect(req: InspectRequest) -> Response:
        """What the server receives for this chat request (the body of a
        /v1/chat/completions call): the text the edge encodes with its surrogates, the
        hidden states and bytes sent, and with `reconstruct` what the audit's attack reads
        back from those noised states about the last message."""
        nonlocal inspector
        adapter = check_model(req.model)
        client = backend.require_client()
        if inspector is None:
            inspector = Inspector(client)
        report = await templated(inspector.inspect, *chat_input(req, client), adapter, req.reconstruct)
        return Response(orjson.dumps(report), media_type="application/json")

    @fedsea.get("/status")
    async def status(request: Request) -> Response:
        """What the chat page's status strip shows; no keys."""
        return Response(orjson.dumps(describe(settings, backend, request.url.scheme == "https", list(served))),
                        media_type="application/json")

    app.include_router(fedsea)
    page.install(app)
    status_auth = [Depends(check_key)] if settings.protect_status else []

    @app.get("/openapi.json", dependencies=status_auth, include_in_schema=False)
    async def openapi() -> Response:
        return Response(orjson.dumps(app.openapi()), media_type="application/json")

    @app.get("/health", dependencies=status_auth)
    async def health() -> Response:
        if backend.ready:
            return Response(orjson.dumps({"status": "ok"}), 200, media_type="application/json")
        return Response(orjson.dumps({"status": "unavailable", "detail": backend.problem}), 503, media_type="application/json")

    @app.get("/metrics", dependencies=status_auth, response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {}}}})
    async def prometheus() -> Response:
        if backend.client is not None:
            metrics.observe_edge_prefixes(backend.client.prefixes.stats())
            metrics.observe_servers(backend.client.server_stats())
        body = metrics.render()
        if settings.server_metrics is not None:  # `fedsea serve`: the embedded server runtime's too
            body += settings.server_metrics()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    paths = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/responses",
             "/", "/fedsea/v1/preview", "/fedsea/v1/inspect", "/fedsea/v1/status"}
    app.add_middleware(RequestCounter, metrics=metrics, paths=paths)
    return app


def chat_input(req: ChatCompletionRequest, client) -> tuple[list[dict], list[dict] | None]:
    """The chat template's input for this request, refused where its text cannot fit."""
    return template_input(req, client.tokenizer, client.config.max_position_embeddings)


async def templated(fn, *args):
    """`fn(*args)` (pseudonymize and template a chat) in a worker thread, its refusals as API errors."""
    try:
        return await asyncio.to_thread(fn, *args)
    except APIError:
        raise
    except TextTooLong as e:
        raise errors.APIError(413, str(e), param="messages", code="text_too_long") from e
    except Exception as e:  # templates may refuse, e.g. roles that do not alternate
        raise errors.template_rejected(e) from e


def describe(settings: GatewaySettings, backend: Backend, https: bool, models: list[str]) -> dict:
    """The deployment as the chat page shows it: servers (replicas sessions spread over;
    `connected` marks the supervisor's link), TLS on each hop, noise and pseudonymization."""
    client, link, edge = backend.client, backend.link, settings.edge
    welcome = link.welcome if link is not None and not link.closed else None
    return {
        "ready": backend.ready,
        "problem": None if backend.ready else backend.problem,
        "model": edge.model_id,
        "models": models,
        "adapters": sorted(edge.adapters),
        "servers": [{"url": _without_userinfo(u), "tls": u.startswith("wss://"),
                     "connected": welcome is not None and link.url == u} for u in edge.servers],
        "api_tls": https,
        "noise": edge.noise,
        "noise_bounds": [welcome.noise_min, welcome.noise_max] if welcome else None,
        "pseudonymize": edge.pseudonymize,
        "split": {"head": edge.head, "tail": edge.tail,
                  "server_layers": list(welcome.layers) if welcome else None},
        "hidden_size": client.config.hidden_size if client else None,
        "wire_dtype": client.settings.wire_dtype if client else None,
        "auth": settings.api_key is not None,
    }


def _without_userinfo(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    return scheme + sep + host.rpartition("@")[2] + slash + path


async def answer_constraint(client, req: ChatCompletionRequest):
    """A factory of the grammar state each choice follows (None: free text), or a 400 if
    the schema or a tool's parameters cannot be enforced."""
    mode, schema = req.tool_mode, req.answer_schema
    try:
        if mode is not None:
            param = "tools"
            grammar = client.grammars.lark(tools.call_grammar(req.tools, mode, req.parallel_calls, schema))
        elif schema is not None:
            param = "response_format"
            grammar = client.grammars.json_schema(schema)
        else:
            return None
        await asyncio.to_thread(client.grammars.check, grammar)  # builds the vocabulary view on first use
    except GrammarError as e:
        raise errors.bad_request(f"cannot enforce this schema: {e}", param=param, code="invalid_schema") from e
    if mode == "auto" and schema is None:
        return lambda: client.grammars.triggered(grammar, tools.OPEN)
    return lambda: client.grammars.constraint(grammar)


async def respond(request: Request, events: AsyncIterator, out: Output | ResponseOutput, stream: bool, include_usage: bool) -> Response:
    if not stream:
        return await _collect_unless_disconnected(request, events, out)

    # Wait for the first token before answering, so that a request refused up front
    # (capacity, unreachable server) gets a real status code rather than a broken stream.
    first = await anext(events)

    async def body():
        exclude = None if include_usage else {"usage"}  # other chunks: usage null only if asked
        try:
            for chunk in out.opening():
                yield _sse(chunk, exclude)
            item = first
            while item is not None:
                index, event = item
                out.add(index, event)
                chunk = out.chunk(index, event)
                if chunk is not None:
                    yield _sse(chunk, exclude)
                item = await anext(events, None)
            if include_usage:
                yield _sse(out.usage_chunk())
            yield DONE
        except APIError as e:  # failed mid-stream: the status is sent, so say it in the stream
            yield _sse(e.body)
        finally:
            # Reached on a client disconnect too: cancels the generations, which close
            # their server sessions.
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _collect_unless_disconnected(request: Request, events: AsyncIterator, out: Output) -> Response:
    """A non-streaming answer.  Nothing is written until it is complete, so a client that
    gives up is only seen by polling: then the generations are cancelled, which closes
    their server sessions, instead of running to max_tokens for nobody."""

    async def collect() -> None:
        try:
            async for index, event in events:
                out.add(index, event)
        finally:
            await events.aclose()

    task = asyncio.create_task(collect())
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            log.info("client disconnected before its answer was complete; generation cancelled")
            return Response(status_code=499)
    task.result()  # re-raises an APIError for the error envelope
    return json_response(out.response())


def _sse(model, exclude: set[str] | None = None) -> bytes:
    if isinstance(model, bytes):  # framed already (the Responses API's named events)
        return model
    return b"data: " + orjson.dumps(model.model_dump(mode="json", exclude=exclude)) + b"\n\n"

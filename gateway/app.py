"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models,
/health and /metrics, in front of the gateway's one edge client."""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from . import errors
from .backend import Backend, GatewaySettings
from .errors import APIError, json_response
from .metrics import GatewayMetrics, RequestCounter
from .outputs import ChatOutput, CompletionOutput, Output
from .schemas import MAX_CHOICES, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

log = logging.getLogger("fedsea.gateway")

DONE = b"data: [DONE]\n\n"
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
# Far above any prompt that fits the context (128 prompts x 8k token ids fit); a larger
# body is refused with 413 before it is read into memory.
MAX_BODY_BYTES = 16 * 2**20


def create_app(settings: GatewaySettings) -> FastAPI:
    metrics = GatewayMetrics()
    backend = Backend(settings, metrics)
    model_id = settings.model_id
    # Model ids clients may ask for -> the adapter that serves them (None: the base model).
    served: dict[str, str | None] = {model_id: None, **{name: name for name in settings.adapters}}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.start()
        yield
        await backend.close()

    app = FastAPI(title="fedsea gateway", lifespan=lifespan, docs_url=None, redoc_url=None, max_body_size=MAX_BODY_BYTES)
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

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models")
    async def models() -> Response:
        return json_response(ModelList(data=[ModelCard(id=name, created=0) for name in served]))

    @v1.get("/models/{name:path}")
    async def model(name: str) -> Response:
        check_model(name)
        return json_response(ModelCard(id=name, created=0))

    @v1.post("/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        adapter = check_model(req.model)
        client = backend.require_client()
        try:
            prompt = client.chat_prompt([m.for_template() for m in req.messages])
        except Exception as e:  # templates may refuse, e.g. roles that do not alternate
            raise errors.bad_request(f"the model's chat template rejected these messages: {e}", param="messages") from e
        logprobs = req.top_alternatives
        out = ChatOutput(req.model, client.tokenizer, req.n, len(prompt), logprobs is not None)
        events = backend.generate([prompt], req.n, req.sampling(logprobs), req.token_limit, adapter)
        return await respond(request, events, out, req.stream, req.include_usage)

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        adapter = check_model(req.model)
        client = backend.require_client()
        vocab = client.config.vocab_size
        if not 1 <= len(req.prompts) * req.n <= MAX_CHOICES:
            raise errors.bad_request(f"a request makes 1 to {MAX_CHOICES} choices (prompts x n)", param="prompt")
        prompts = []
        for p in req.prompts:
            ids = client.tokenizer(p).input_ids if isinstance(p, str) else p
            if not ids:
                raise errors.bad_request("the prompt is empty", param="prompt")
            if max(ids) >= vocab:
                raise errors.bad_request(f"token id {max(ids)} is outside the vocabulary (size {vocab})", param="prompt")
            prompts.append(ids)
        out = CompletionOutput(req.model, client.tokenizer, len(prompts) * req.n, sum(map(len, prompts)), req.logprobs is not None)
        events = backend.generate(prompts, req.n, req.sampling(req.logprobs), req.token_limit, adapter)
        return await respond(request, events, out, req.stream, req.include_usage)

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        if backend.ready:
            return Response(orjson.dumps({"status": "ok"}), 200, media_type="application/json")
        return Response(orjson.dumps({"status": "unavailable", "detail": backend.problem}), 503, media_type="application/json")

    @app.get("/metrics")
    async def prometheus() -> Response:
        if backend.client is not None:
            metrics.observe_edge_prefixes(backend.client.prefixes.stats())
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    paths = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}
    app.add_middleware(RequestCounter, metrics=metrics, paths=paths)
    return app


async def respond(request: Request, events: AsyncIterator, out: Output, stream: bool, include_usage: bool) -> Response:
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
    return b"data: " + orjson.dumps(model.model_dump(mode="json", exclude=exclude)) + b"\n\n"

"""Errors in OpenAI's envelope, {"error": {"message", "type", "param", "code"}}, with the
status codes OpenAI clients expect; and the mapping from edge/server failures to them."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from websockets.exceptions import WebSocketException

from edge_runtime.connection import BadReply, ConnectionLost, ServerError
from fedsea_shared.protocol import ErrorCode

from .schemas import ErrorBody, ErrorResponse

log = logging.getLogger("fedsea.gateway")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))

    def response(self) -> Response:
        return json_response(self.body, self.status)


def json_response(model, status: int = 200) -> Response:
    """`model`: a pydantic model or an already plain dict."""
    body = model if isinstance(model, dict) else model.model_dump(mode="json")
    return Response(orjson.dumps(body), status, media_type="application/json")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def context_too_long(message: str) -> APIError:
    return APIError(400, message, param="messages", code="context_length_exceeded")


def template_rejected(cause: Exception) -> APIError:
    return bad_request(f"the model's chat template rejected these messages: {cause}", param="messages")


def unreachable(url: str, cause: BaseException) -> APIError:
    return APIError(502, f"the server runtime at {url} is unreachable ({str(cause) or type(cause).__name__})", "api_connection_error", code="server_unreachable")


def from_edge(error: BaseException, server_url: str) -> APIError:
    """Translate a failure of a generation into the error its client should see."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ConnectionLost) or isinstance(error, (OSError, TimeoutError, WebSocketException)):
        return unreachable(server_url, error)
    if isinstance(error, BadReply):
        return APIError(502, error.message, "server_error", code=error.code)
    if isinstance(error, ServerError):
        if error.code in (ErrorCode.CAPACITY.value, ErrorCode.PREEMPTED.value):  # preempted: retries ran out
            return APIError(503, f"the server runtime is at capacity: {error.message}", "server_error", code="capacity")
        if error.code == ErrorCode.LIMIT.value:
            return APIError(429, f"too many generations in flight: {error.message}", "rate_limit_error", code="limit")
        if error.code == ErrorCode.CONTEXT_OVERFLOW.value:
            return context_too_long(error.message)
        return APIError(502, f"the server runtime refused the request: {error.message} ({error.code})", "server_error", code=error.code)
    if isinstance(error, ValueError):
        return bad_request(str(error))
    log.error("generation failed", exc_info=error)
    return APIError(500, "internal error in the gateway", "server_error", code="internal")


def install(app: FastAPI) -> None:
    """Answer every failure, FastAPI's own included, in OpenAI's envelope."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> Response:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Response:
        errors = e.errors()
        # A failed union lists every branch; the validator's own message says the most.
        error = next((x for x in errors if x["type"] == "value_error"), errors[0])
        loc = [str(p) for p in error["loc"] if p != "body" and not _is_union_tag(p)]
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "json_invalid":
            message, loc = f"the body is not valid JSON: {error['ctx'].get('error', '')}", []
        param = ".".join(loc) or None
        return bad_request(f"Invalid '{param}': {message}" if param else message, param=param).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> Response:
        return APIError(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error").response()


def _is_union_tag(part) -> bool:
    # pydantic names union branches in error locations, e.g. 'list[ContentPart]' or 'str'
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part or "function-" in part)

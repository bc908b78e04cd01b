"""The chat page at `/`: static files shipped in this package (gateway/static), no build
step and nothing fetched from another origin.  The page only calls this gateway's own API
(`/v1/...`, `/fedsea/v1/...`) with relative URLs, so it works behind https and a path
prefix; it loads without the API key and sends the key the user gives it with each call."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

# Model output is rendered as HTML (sanitized Markdown): the policy is the second wall, so
# that a script or remote resource slipped through the sanitizer still does not run or load.
CSP = "; ".join([
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self'", "connect-src 'self'",
    "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
])
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class PageHeaders:
    """ASGI middleware adding the page's security headers to `/` and `/static/...`
    (plain ASGI, like gateway.metrics.RequestCounter, so streams pass untouched)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not (scope["path"] == "/" or scope["path"].startswith("/static/")):
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def install(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(PageHeaders)

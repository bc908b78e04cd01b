"""Running the gateway under uvicorn: in the foreground (`fedsea serve`, `fedsea gateway`)
or on a background thread (tests and benchmarks; port 0 picks a free port)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time

import uvicorn

from fedsea_shared.threads import serial

from .app import create_app
from .backend import GatewaySettings

log = logging.getLogger("fedsea.gateway")

GRACEFUL_SHUTDOWN_S = 5


def _config(settings: GatewaySettings, log_level: str) -> uvicorn.Config:
    # On shutdown, streams still running after the grace period are cut (they would
    # otherwise hold the process until their max_tokens).
    return uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
        lifespan="on", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile,
    )


def api_url(host: str, port: int, https: bool = False) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else f"[{host}]" if ":" in host else host
    return f"{'https' if https else 'http'}://{shown}:{port}/v1"


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_gateway(settings: GatewaySettings, log_level: str = "info") -> None:
    """Serve until interrupted; the edge loads and connects in the background."""
    if settings.api_key is None and not _is_loopback(settings.host):
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", settings.host)
    print(f"fedsea gateway: OpenAI-compatible API at {api_url(settings.host, settings.port, bool(settings.ssl_certfile))} "
          f"(model {settings.edge.model_id}; /health answers 503 until the edge is ready)", flush=True)
    serial()  # the event loop only moves small tensors; the edge worker computes
    uvicorn.Server(_config(settings, log_level)).run()


class GatewayThread:
    """A gateway (edge + HTTP API) on its own thread, listening on `settings.port`."""

    def __init__(self, settings: GatewaySettings, log_level: str = "warning"):
        self.settings = settings
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((settings.host, settings.port))
        self.port = self._sock.getsockname()[1]
        config = _config(settings, log_level)
        self.app = config.app
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="fedsea-gateway", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        serial()
        self._server.run(sockets=[self._sock])

    @property
    def url(self) -> str:
        """The OpenAI base URL, http(s)://HOST:PORT/v1."""
        return api_url(self.settings.host, self.port, bool(self.settings.ssl_certfile))

    @property
    def backend(self):
        return self.app.state.backend

    def wait_ready(self, timeout: float = 60) -> "GatewayThread":
        deadline = time.monotonic() + timeout
        while not (self._server.started and self.backend.ready):
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"gateway not ready: {self.backend.problem}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()

"""Deployment defaults shared by `fedsea serve`, `fedsea server` and `fedsea gateway`, so
each starts with no flags beyond addresses and they agree on the split."""

from .models import DEFAULT_MODEL

MODEL = DEFAULT_MODEL
HEAD = 2  # blocks before the server's range, on the edge
TAIL = 2  # blocks after it, on the edge
NOISE = 0.1  # relative to per-token RMS; see fedsea_shared.noise and the README's privacy section
SERVER_PORT = 8765
GATEWAY_PORT = 8000

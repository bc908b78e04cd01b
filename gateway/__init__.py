"""The OpenAI-compatible gateway: FastAPI in front of one in-process edge client."""

from .app import create_app
from .backend import GatewaySettings
from .server import GatewayThread, run_gateway

__all__ = ["GatewaySettings", "GatewayThread", "create_app", "run_gateway"]

"""The edge runtime: embedding, head and tail blocks, LM head and sampling, on the user's
device.  Text and token ids stay here; only noised hidden states go to the server."""

from .client import AsyncEdgeClient, Completion, EdgeClient, TokenEvent
from .connection import ServerError
from .sampling import SamplingParams

__all__ = ["AsyncEdgeClient", "Completion", "EdgeClient", "SamplingParams", "ServerError", "TokenEvent"]

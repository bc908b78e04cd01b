"""Every setting of an edge, with its default, in one place: `AsyncEdgeClient` and
`EdgeClient` take these as keyword arguments, the gateway's settings contain one, and the
CLI's flags are checked against it (tests/test_settings.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fedsea_shared import defaults
from fedsea_shared.protocol import WIRE_DTYPES
from fedsea_shared.threads import run_here


@dataclass
class EdgeSettings:
    # One server runtime, or several of the same model and cut to fail over between.
    server_url: str | list[str] = f"ws://127.0.0.1:{defaults.SERVER_PORT}"
    model: str = defaults.MODEL  # an alias (fedsea_shared.models) or a checkpoint directory
    head: int = defaults.HEAD
    tail: int = defaults.TAIL
    noise: float = defaults.NOISE  # relative to per-token RMS (fedsea_shared.noise)
    dtype: str = "float32"  # the edge shard's compute dtype
    wire_dtype: str = "float32"  # hidden states on the wire (fedsea_shared.protocol.WIRE_DTYPES)
    device: str = "cpu"
    server_api_key: str | None = None  # the key this edge presents to the server runtime
    adapters: dict[str, str] = field(default_factory=dict)  # fine-tuned LoRA adapters: name -> directory
    noise_key: bytes | None = None  # the noise's secret (default: this installation's, edge_runtime.keys)
    edge_cache_memory: int = 256 * 2**20  # bytes of recent conversations kept for prefix reuse (0: off)
    server_ca: str | None = None  # PEM verifying a wss:// server (default: the system trust store)
    # Send the chat template's public prefix un-noised (fedsea_shared.noise.public_prefix_len).
    public_template: bool = defaults.PUBLIC_TEMPLATE
    # Names, numbers, e-mails -> keyed surrogates before tokenization (edge_runtime.pseudonyms).
    pseudonymize: bool = defaults.PSEUDONYMIZE
    # Runs the edge's forward passes: on the edge worker's thread, or (fedsea serve) the
    # process's shared ComputeThread.run (fedsea_shared.threads).
    compute: Callable = run_here
    linear_kernel: str = "auto"  # the shard's matmuls (fedsea_shared.shard.apply_linear_kernel)
    block_ops: str = "auto"  # norms, rotary, SiLU, decode attention (fedsea_shared.shard.make_block_ops)
    # A packed copy of an LM head tied to the embedding: the embedding's size again (113 MB
    # for SmolLM2-135M), about twice as fast at 8-16 rows, for an edge serving many generations.
    lm_head_copy: bool = True
    weights: str = field(default_factory=defaults.weights)  # the shard's format (fedsea_shared.layers.linear.resolve_weights)

    def __post_init__(self) -> None:
        if not (self.noise >= 0 and math.isfinite(self.noise)):  # NaN fails both
            raise ValueError(f"noise must be a finite number >= 0, got {self.noise}")
        for name in ("dtype", "wire_dtype"):
            if getattr(self, name) not in WIRE_DTYPES:
                raise ValueError(f"{name} must be one of {sorted(WIRE_DTYPES)}, got {getattr(self, name)!r}")
        if not self.servers:
            raise ValueError("server_url names no server runtime")

    @property
    def servers(self) -> list[str]:
        return [self.server_url] if isinstance(self.server_url, str) else list(self.server_url)

    @property
    def model_id(self) -> str:
        """The name clients use: the alias, or the checkpoint directory's name."""
        return Path(self.model).name

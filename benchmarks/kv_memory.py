"""How many concurrent 256-token sessions one KV budget holds: the paged pool (measured,
by filling a real server engine until it refuses) against Petals' contiguous per-session
reservation of max_length=2048 tokens (computed with Petals' own admission rule: a
session is admitted if its whole reservation fits in what is left of the budget).

    python benchmarks/kv_memory.py [--budget 256MiB] [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fedsea_shared import defaults
from fedsea_shared.protocol import ProtocolError
from fedsea_shared.shard import head_dim
from server_runtime.app import ServerRuntime, ServerSettings
from server_runtime.engine import EngineSettings
from server_runtime.kv_pool import parse_memory

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=defaults.MODEL)
    p.add_argument("--budget", default="256MiB")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--reservation", type=int, default=2048, help="Petals' default inference max_length")
    args = p.parse_args()
    settings = ServerSettings(model=args.model, kv_cache_memory=args.budget, port=0, kv_quota=1.0,  # one tenant fills it
                              engine=EngineSettings(wait_timeout=0.2))
    runtime = ServerRuntime(settings)
    cfg, engine = runtime.config, runtime.engine
    layers = len(runtime.partition.server_layers)
    bytes_per_token = 2 * layers * cfg.num_key_value_heads * head_dim(cfg) * 4
    budget = parse_memory(args.budget)
    admitted = 0
    try:
        while True:
            key = (0, admitted)
            engine.open(key).result()
            engine.step(key, 0, torch.randn(args.tokens, cfg.hidden_size)).result()
            admitted += 1
    except ProtocolError as e:
        assert e.code.value == "capacity", e
    finally:
        runtime.close()
    contiguous = budget // (args.reservation * bytes_per_token)
    result = {
        "model": args.model, "budget_bytes": budget, "kv_bytes_per_token": bytes_per_token,
        "block_size": settings.block_size, "session_tokens": args.tokens,
        "paged_sessions": admitted, "contiguous_sessions": contiguous,
        "ratio": admitted / contiguous if contiguous else float("inf"),
    }
    print(f"KV budget {budget / 2**20:.0f} MiB, {bytes_per_token} B/token over {layers} middle blocks")
    print(f"{'allocation':>28} {'sessions of ' + str(args.tokens) + ' tokens':>22}")
    print(f"{'paged (fedsea, measured)':>28} {admitted:>22}")
    print(f"{f'contiguous {args.reservation} (Petals)':>28} {contiguous:>22}")
    print(f"{'ratio':>28} {result['ratio']:>21.1f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kv_memory.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Aggregate decode throughput of the batching server runtime with 1, 4 and 16
concurrent sessions, against the same sessions served one at a time (the Petals-style
baseline: no batching across sessions), measured in one run.

End to end: one edge process (this one, batching its head/tail work too) and one
`fedsea server` subprocess on the same machine, default model, greedy, noise 0.

    python benchmarks/server_throughput.py [--sessions 1 4 16] [--tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
from pathlib import Path

import torch

from edge_runtime.client import AsyncEdgeClient
from edge_runtime.sampling import SamplingParams
from fedsea_shared import defaults
from fedsea_shared.models import resolve_model
from server_runtime.process import server_process

RESULTS = Path(__file__).parent / "results"
TOPICS = ["the sea", "a city at night", "an old library", "mountains", "a train journey", "a garden",
          "a storm", "the moon", "a market", "a forest", "winter", "a lighthouse", "a desert", "a river",
          "a bakery", "a concert"]


async def generate(client: AsyncEdgeClient, prompt: list[int], tokens: int) -> tuple[int, float]:
    """Returns (generated tokens, seconds spent decoding after the first token)."""
    params = SamplingParams(max_tokens=tokens, temperature=0)
    n, first = 0, None
    async for _ in client.stream_tokens(prompt, params):
        n += 1
        if first is None:
            first = time.perf_counter()
    return n, time.perf_counter() - first


def prompts(client: AsyncEdgeClient, n: int) -> list[list[int]]:
    return [client.chat_prompt([{"role": "user", "content": f"Write a long poem about {TOPICS[i % len(TOPICS)]}."}])
            for i in range(n)]


def tick_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's tokens-per-tick histogram, from its /metrics."""
    port = url.rsplit(":", 1)[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
        values = {line.split()[0]: float(line.split()[1]) for line in r.read().decode().splitlines()
                  if line.startswith("fedsea_tokens_per_tick_")}
    return values["fedsea_tokens_per_tick_sum"], values["fedsea_tokens_per_tick_count"]


async def concurrent(client, ps, tokens) -> float:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(generate(client, p, tokens) for p in ps))
    return sum(n for n, _ in results) / (time.perf_counter() - t0)


async def serial(client, ps, tokens) -> float:
    t0 = time.perf_counter()
    total = 0
    for p in ps:
        total += (await generate(client, p, tokens))[0]
    return total / (time.perf_counter() - t0)


async def run(args) -> dict:
    model_dir = resolve_model(args.model)
    with server_process(model_dir, args.head, args.tail) as url:
        client = AsyncEdgeClient(url, model=str(model_dir), head=args.head, tail=args.tail, noise=0.0)
        await generate(client, prompts(client, 1)[0], 4)  # warm-up
        rows = []
        for n in args.sessions:
            ps = prompts(client, n)
            serial_tps = await serial(client, ps, args.tokens)
            before = tick_stats(url)
            batched_tps = await concurrent(client, ps, args.tokens)
            after = tick_stats(url)
            per_tick = (after[0] - before[0]) / (after[1] - before[1])
            rows.append({"sessions": n, "serial_tokens_per_s": serial_tps, "batched_tokens_per_s": batched_tps,
                         "ratio": batched_tps / serial_tps, "mean_tokens_per_tick": per_tick})
            print(f"{n:>3} sessions: serial {serial_tps:6.1f} tok/s, batched {batched_tps:6.1f} tok/s, "
                  f"{batched_tps / serial_tps:.2f}x, {per_tick:.1f} tokens per server tick", flush=True)
        await client.aclose()
    return {"model": args.model, "head": args.head, "tail": args.tail, "tokens_per_session": args.tokens,
            "torch_threads": torch.get_num_threads(), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=defaults.MODEL)
    p.add_argument("--head", type=int, default=defaults.HEAD)
    p.add_argument("--tail", type=int, default=defaults.TAIL)
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per session")
    args = p.parse_args()
    result = asyncio.run(run(args))
    print(f"\n{'sessions':>8} {'serial tok/s':>13} {'batched tok/s':>14} {'ratio':>6} {'tokens/tick':>12}")
    for r in result["rows"]:
        print(f"{r['sessions']:>8} {r['serial_tokens_per_s']:>13.1f} {r['batched_tokens_per_s']:>14.1f} "
              f"{r['ratio']:>5.2f}x {r['mean_tokens_per_tick']:>12.1f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "server_throughput.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

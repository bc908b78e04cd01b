"""Decode tokens/s of the split per weight format (both sides in the format), one process
(in-process server runtime and edge sharing one compute thread, as `fedsea serve`),
default model, greedy, noise 0.  Formats take turns for `--rounds` rounds and each
cell is the median, so load from other processes spreads over all of them.

    python benchmarks/weight_formats_decode.py [--formats float32 int8 int4] [--clients 1 8] [--tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from edge_runtime.client import AsyncEdgeClient
from edge_runtime.sampling import SamplingParams
from fedsea_shared import threads
from server_runtime.app import ServerSettings, ServerThread

RESULTS = Path(__file__).parent / "results"
TOPICS = ["the sea", "a city at night", "an old library", "mountains", "a train journey", "a garden", "a storm", "the moon"]


async def tokens_per_s(client: AsyncEdgeClient, clients: int, tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0)
    prompts = [client.chat_prompt([{"role": "user", "content": f"Write a long poem about {TOPICS[i % len(TOPICS)]}."}])
               for i in range(clients)]

    async def one(prompt):
        n = 0
        async for _ in client.stream_tokens(prompt, params):
            n += 1
        return n

    t0 = time.perf_counter()
    n = sum(await asyncio.gather(*(one(p) for p in prompts)))
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--formats", nargs="+", default=["float32", "int8", "int4"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    n, _ = threads.compute_threads(None)
    threads.apply(n)
    threads.serial()
    compute = threads.ComputeThread()
    sides = {}
    for fmt in args.formats:
        server = ServerThread(ServerSettings(model=args.model, port=0, kv_quota=1.0, weights=fmt), compute.run)
        sides[fmt] = server, AsyncEdgeClient(server.url, model=args.model, noise=0.0, compute=compute.run,
                                             weights=fmt)
    loop = asyncio.new_event_loop()
    runs: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for clients in args.clients:
            for fmt, (_, client) in sides.items():
                tps = loop.run_until_complete(tokens_per_s(client, clients, args.tokens))
                runs.setdefault((fmt, clients), []).append(tps)
                print(f"  {fmt} {clients} clients: {tps:.1f} tokens/s", flush=True)
    results = []
    for (fmt, clients), values in runs.items():
        base = statistics.median(runs[args.formats[0], clients])
        tps = statistics.median(values)
        results.append({"weights": fmt, "clients": clients, "tokens_per_s": round(tps, 1),
                        "vs_" + args.formats[0]: round(tps / base, 2), "runs": [round(v, 1) for v in values]})
        print(f"{fmt:>9} {clients:>2} clients: {tps:7.1f} tokens/s  {tps / base:5.2f}x {args.formats[0]}  {values}")
    for server, client in sides.values():
        loop.run_until_complete(client.aclose())
        server.stop()
    compute.close()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "weight_formats_decode.json"
    path.write_text(json.dumps({"model": args.model, "threads": n, "tokens": args.tokens, "results": results}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

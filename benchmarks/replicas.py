"""What spreading sessions over replicas costs on one machine: one `fedsea gateway` in front
of 1 and then 2 `fedsea server` processes (default model and split), 16 concurrent greedy
streaming chats (vs_peers' workload).  On a machine with few cores the replicas share them,
so no gain is expected: this measures the overhead of the spread (and shows the spread
itself: sessions opened per server, from the gateway's /metrics), not a speed-up.

    python benchmarks/replicas.py [--clients 16] [--max-tokens 48] [--repeat 2] [--threads N]

The two set-ups run in turn `--repeat` times; each figure is reported as the median, every
run is kept.  Writes benchmarks/results/replicas.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.vs_peers import _process, run_level, stream_chat  # noqa: E402
from fedsea_shared import defaults  # noqa: E402
from server_runtime.process import free_port  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def replicas(count: int, threads: int, stack: ExitStack) -> str:
    """`count` servers and a gateway in front of them; returns the gateway's /v1 URL."""
    env = {"OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads in each process
    urls = []
    for i in range(count):
        port = free_port()
        stack.enter_context(_process(f"server{i}", [sys.executable, "-m", "fedsea.cli", "server", "--port", str(port)],
                                     port, "/health", env=env))
        urls.append(f"ws://127.0.0.1:{port}")
    port = free_port()
    servers = [a for url in urls for a in ("--server", url)]
    cmd = [sys.executable, "-m", "fedsea.cli", "gateway", "--port", str(port), *servers]
    gateway, _ = stack.enter_context(_process("gateway", cmd, port, "/health", env=env))
    return gateway


def opens_per_server(gateway: str) -> dict[str, float]:
    """Sessions opened on each server since the gateway started (home + away)."""
    opens: dict[str, float] = {}
    for line in httpx.get(gateway.removesuffix("/v1") + "/metrics", timeout=10).text.splitlines():
        if line.startswith("fedsea_gateway_server_opens{"):
            labels, value = line[len("fedsea_gateway_server_opens{"):].rsplit("} ", 1)
            server = labels.split('server="')[1].split('"')[0]
            opens[server] = opens.get(server, 0) + float(value)
    return opens


async def measure(gateway: str, clients: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=gateway, timeout=600) as http:  # warm-up: first-request costs
        await stream_chat(http, "Hi", 4)
    before = opens_per_server(gateway)
    level = await run_level(gateway, clients, 1, max_tokens)
    after = opens_per_server(gateway)
    level["opens_per_server"] = sorted(after[s] - before.get(s, 0) for s in after)
    return level


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="torch threads of each process (default: half the cores)")
    p.add_argument("--out", type=Path, default=RESULTS / "replicas.json")
    args = p.parse_args()
    runs: dict[str, list[dict]] = {"1": [], "2": []}
    for r in range(args.repeat):
        for count in (1, 2):
            with ExitStack() as stack:
                gateway = replicas(count, args.threads, stack)
                level = asyncio.run(measure(gateway, args.clients, args.max_tokens))
            runs[str(count)].append(level)
            print(f"run {r + 1}, {count} server(s): {level['tok_s']:.1f} tok/s, TTFT {level['mean_ttft_s']:.2f} s, "
                  f"sessions per server {level['opens_per_server']}", flush=True)
    median = {n: statistics.median(run["tok_s"] for run in rs) for n, rs in runs.items()}
    result = {
        "what": f"{args.clients} concurrent greedy streaming chats of {args.max_tokens} tokens through one gateway "
                f"to 1 vs 2 `fedsea server` replicas ({defaults.MODEL}, default split and noise), same machine",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads_per_process": args.threads},
        "median_tok_s": median,
        "ratio_2_vs_1": median["2"] / median["1"],
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"median tok/s: 1 server {median['1']:.1f}, 2 servers {median['2']:.1f}: ratio {result['ratio_2_vs_1']:.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""When the edge and the server engine of `fedsea serve` compute, apart or together.

Runs what `fedsea serve` runs in one process (the server runtime on a loopback port, the
edge client, one compute thread for both sides' forward passes), without the HTTP layer,
drives N concurrent greedy generations of the default model (the prompts of benchmarks/vs_peers.py), and records each
edge batch (head, tail) and each engine tick with its start, end and size.  Reported per
level: tokens/s, time to first token, process CPU per token, the share of the wall time in
which the edge computes, the engine computes, both (overlap) or neither, batch sizes, and
the machine's idle share (/proc/stat: other jobs included).

    python benchmarks/serve_timeline.py [--clients 1 8 16] [--threads N] [--separate]

`--separate`: the previous layout instead, the edge worker and the engine each running
their own forward passes with half the cores (`--threads` each).

Writes benchmarks/results/serve_timeline.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.vs_peers import PROMPTS, RESULTS, _cpu_times  # noqa: E402
from fedsea_shared import threads  # noqa: E402

Span = tuple[str, float, float, int]  # (what, start, end, sequences)


def record(spans: list[Span]) -> None:
    """Time every edge batch and engine tick into `spans`."""
    from edge_runtime.model import EdgeModel
    from server_runtime.model_runner import ModelRunner

    # Sizes: the edge's batch items, or the sequences of the tick's plan.
    for cls, name, what, size in ((EdgeModel, "head", "edge head", len), (EdgeModel, "tail", "edge tail", len),
                                  (ModelRunner, "execute", "engine tick", lambda plan: len(plan.seq_lens))):
        real = getattr(cls, name)

        def timed(self, items, real=real, what=what, size=size):
            t0 = time.monotonic()
            try:
                return real(self, items)
            finally:
                spans.append((what, t0, time.monotonic(), size(items)))

        setattr(cls, name, timed)


def busy(spans: list[Span], since: float, prefixes: tuple[str, ...]) -> float:
    """Seconds in which at least one span whose name starts with one of `prefixes` ran."""
    total, end = 0.0, since
    for _, a, b, _ in sorted((s for s in spans if s[0].startswith(prefixes)), key=lambda s: s[1]):
        a = max(a, end)
        if b > a:
            total, end = total + b - a, b
    return total


async def level(client, spans: list[Span], clients: int, rounds: int, max_tokens: int) -> dict:
    async def one(c: int, r: int) -> tuple[int, float]:
        t0, first, n = time.monotonic(), None, 0
        chat = [{"role": "user", "content": PROMPTS[(c + clients * r) % len(PROMPTS)]}]
        async for _ in client.stream(chat, max_tokens=max_tokens, temperature=0):
            first, n = first or time.monotonic(), n + 1
        return n, first - t0

    spans.clear()
    (idle0, total0), cpu0, t0 = _cpu_times(), time.process_time(), time.monotonic()
    runs = []
    for r in range(rounds):
        runs += await asyncio.gather(*(one(c, r) for c in range(clients)))
    wall, cpu, (idle1, total1) = time.monotonic() - t0, time.process_time() - cpu0, _cpu_times()
    tokens = sum(n for n, _ in runs)
    edge, engine, either = (busy(spans, t0, p) for p in (("edge",), ("engine",), ("edge", "engine")))
    sizes = {what: [n for w, _, _, n in spans if w == what] for what in ("edge head", "edge tail", "engine tick")}
    return {
        "clients": clients, "tokens": tokens, "tok_s": tokens / wall, "mean_ttft_s": sum(f for _, f in runs) / len(runs),
        "process_cpu_ms_per_token": 1000 * cpu / tokens, "process_cpu_share": cpu / wall / os.cpu_count(),
        "machine_idle_pct": 100 * (idle1 - idle0) / max(total1 - total0, 1), "loadavg": os.getloadavg(),
        "edge_busy": edge / wall, "engine_busy": engine / wall, "both_busy": (edge + engine - either) / wall,
        "neither_busy": 1 - either / wall,
        "mean_sequences": {w: sum(v) / len(v) for w, v in sizes.items() if v},
        "calls": {w: len(v) for w, v in sizes.items()},
    }


async def run(args, url: str, compute) -> list[dict]:
    from edge_runtime.client import AsyncEdgeClient

    spans: list[Span] = []
    record(spans)
    client = AsyncEdgeClient(url, edge_cache_memory=0, compute=compute,  # no prefix reuse: every request does the full work
                             linear_kernel=args.linear_kernel)  # as fedsea serve
    await client.generate([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)  # warm-up
    out = []
    for c in args.clients:
        out.append(await level(client, spans, c, max(args.rounds, 4) if c == 1 else args.rounds, args.max_tokens))
        lv = out[-1]
        print(f"{c:>2} clients: {lv['tok_s']:6.1f} tok/s, TTFT {lv['mean_ttft_s']:.3f} s, CPU {lv['process_cpu_ms_per_token']:.0f} ms/token "
              f"({100 * lv['process_cpu_share']:.0f}% of the machine; machine idle {lv['machine_idle_pct']:.0f}%, load {lv['loadavg'][0]:.1f}); "
              f"edge {100 * lv['edge_busy']:.0f}%, engine {100 * lv['engine_busy']:.0f}%, both {100 * lv['both_busy']:.0f}%, "
              f"neither {100 * lv['neither_busy']:.0f}% of the time; sequences per call "
              + ", ".join(f"{w} {n:.1f}" for w, n in lv["mean_sequences"].items()), flush=True)
    await client.aclose()
    return out


def workload_args(ap: argparse.ArgumentParser) -> None:
    """The streaming workload's levels, shared with step_trace.py."""
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--rounds", type=int, default=2, help="requests each client sends in a row (1 client: at least 4)")
    ap.add_argument("--max-tokens", type=int, default=48)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(ap)
    ap.add_argument("--threads", type=int, help="intra-op threads of the compute thread (default: fedsea serve's)")
    ap.add_argument("--separate", action="store_true", help="edge and engine compute on their own threads")
    ap.add_argument("--linear-kernel", default="auto", choices=["auto", "onednn", "torch"], help="both sides' matmuls")
    args = ap.parse_args()
    if args.separate:
        n, source = args.threads or max(1, threads.core_budget() // 2), "each of edge worker and engine"
        compute = None
    else:
        (n, source), compute = threads.compute_threads(args.threads), threads.ComputeThread()
    threads.apply(n)
    threads.serial()  # this thread runs the edge's event loop
    print(f"intra-op threads: {n} ({source})")
    from server_runtime.app import ServerSettings, ServerThread

    run_on = compute.run if compute else threads.run_here
    server = ServerThread(ServerSettings(port=0, kv_quota=1.0, linear_kernel=args.linear_kernel), run_on)
    try:
        levels = asyncio.run(run(args, server.url, run_on))
    finally:
        server.stop()
        if compute:
            compute.close()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "serve_timeline.json"
    out.write_text(json.dumps({"threads": n, "threads_source": source, "layout": "separate" if args.separate else "shared", "settings": vars(args), "levels": levels}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

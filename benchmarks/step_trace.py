"""Where one decode step's wall time goes in `fedsea serve`, phase by phase.

Runs what `fedsea serve` runs in one process (server runtime, edge client, one compute
thread for both sides), with the two joined by the in-process link `fedsea serve` uses and,
alternating with it in the same run, by a loopback websocket (the split over a network,
minus the network); drives N concurrent greedy generations of
vs_peers.py's prompts, and times every edge batch (head, tail) and engine tick.  A decode
step of N sessions is a cycle tick -> tail -> head -> next tick on the compute thread;
the gaps between them are the time the compute thread waits on the rest of the system:

- tick -> tail: the server's reply (encode, link or websocket, the edge's decode and checks);
- tail -> head: sampling, then the edge worker taking the next heads (and any linger);
- head -> tick: noise, encode, link or websocket, the server's decode, the engine's tick plan.

Reported per level: the mean of each phase over the cycles in which all N sessions
decode together (prompts, and the ends of generations with fewer sessions, left out),
the cycle's tokens/s, and each level's mean time to first token.  Timing only: run it
when nothing else runs.

    python benchmarks/step_trace.py [--clients 1 8 16] [--rounds 2] [--repeat 2]

Writes benchmarks/results/step_trace.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.serve_timeline import Span, record, workload_args  # noqa: E402
from benchmarks.vs_peers import PROMPTS, RESULTS  # noqa: E402
from fedsea_shared import threads  # noqa: E402

PHASES = ("tick", "tick->tail", "tail", "tail->head", "head", "head->tick")
CYCLE = ["engine tick", "edge tail", "edge head", "engine tick"]  # serve_timeline.record's span names


def cycles(spans: list[Span], sessions: int) -> list[dict[str, float]]:
    """Phase durations (s) of each tick -> tail -> head -> tick cycle of `sessions` sequences."""
    out = []
    order = sorted(spans, key=lambda s: s[1])
    for i in range(len(order) - 3):
        window = order[i:i + 4]
        if [w[0] for w in window] != CYCLE or any(w[3] != sessions for w in window):
            continue
        (_, t0, t1, _), (_, a0, a1, _), (_, h0, h1, _), (_, n0, _, _) = window
        out.append(dict(zip(PHASES, (t1 - t0, a0 - t1, a1 - a0, h0 - a1, h1 - h0, n0 - h1))))
    return out


async def run_level(client, spans, clients: int, rounds: int, max_tokens: int) -> dict:
    async def one(c: int, r: int) -> float:
        t0, first = time.monotonic(), None
        chat = [{"role": "user", "content": PROMPTS[(c + clients * r) % len(PROMPTS)]}]
        async for _ in client.stream(chat, max_tokens=max_tokens, temperature=0):
            first = first or time.monotonic()
        return first - t0

    spans.clear()
    ttft = []
    for r in range(rounds):
        ttft += await asyncio.gather(*(one(c, r) for c in range(clients)))
    found = cycles(spans, clients)
    mean = {p: sum(c[p] for c in found) / len(found) for p in PHASES} if found else {}
    cycle = sum(mean.values())
    return {"clients": clients, "cycles": len(found), "phases_ms": {p: 1000 * v for p, v in mean.items()},
            "cycle_ms": 1000 * cycle, "cycle_tok_s": clients / cycle if cycle else None,
            "mean_ttft_s": sum(ttft) / len(ttft)}


async def trace(url: str, compute, clients: int, rounds: int, max_tokens: int) -> dict:
    from edge_runtime.client import AsyncEdgeClient

    spans: list = []
    record(spans)
    client = AsyncEdgeClient(url, compute=compute)  # as fedsea serve
    try:
        await client.generate([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)  # warm-up
        return await run_level(client, spans, clients, max(rounds, 4) if clients == 1 else rounds, max_tokens)
    finally:
        await client.aclose()


def median_level(runs: list[dict]) -> dict:
    """Phase by phase, the median over repeats of a level."""
    found = [r for r in runs if r["phases_ms"]]
    if not found:
        return runs[0]
    phases = {p: statistics.median(r["phases_ms"][p] for r in found) for p in PHASES}
    cycle = sum(phases.values())
    return {"clients": runs[0]["clients"], "cycles": sum(r["cycles"] for r in found), "phases_ms": phases,
            "cycle_ms": cycle, "cycle_tok_s": 1000 * runs[0]["clients"] / cycle,
            "mean_ttft_s": statistics.median(r["mean_ttft_s"] for r in runs), "repeats": len(runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(ap)
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of each transport per level (medians)")
    ap.add_argument("--out", type=Path, default=RESULTS / "step_trace.json")
    args = ap.parse_args()
    if args.max_tokens < 2 or args.rounds < 1 or args.repeat < 1 or any(c < 1 for c in args.clients):
        ap.error("--max-tokens must be >= 2, --rounds, --repeat and --clients >= 1")
    (n, source), compute = threads.compute_threads(None), threads.ComputeThread()
    threads.apply(n)
    threads.serial()  # this thread runs the edge's event loop
    from server_runtime.app import ServerSettings, ServerThread

    # One model for both transports: the websocket's server runs on its own loop thread (as
    # `fedsea server` does), the in-process link on the edge's loop (as `fedsea serve` does).
    server = ServerThread(ServerSettings(port=0, kv_quota=1.0), compute.run)
    urls = {"in-process": server.runtime.listen_in_process("step-trace"), "websocket": server.url}
    runs: dict[tuple[str, int], list[dict]] = {}
    try:
        for c in args.clients:
            for _ in range(args.repeat):
                for transport, url in urls.items():
                    runs.setdefault((transport, c), []).append(
                        asyncio.run(trace(url, compute.run, c, args.rounds, args.max_tokens)))
    finally:
        server.stop()
        compute.close()
    levels = [dict(median_level(r), transport=t) for (t, _), r in runs.items()]
    print(f"\nms per decode step of all sessions ({n} threads, {source}); medians of {args.repeat} alternating runs; "
          "cycles: steps in which all decode together")
    print(f"{'transport':>10} {'clients':>7} {'cycles':>6} " + " ".join(f"{p:>10}" for p in PHASES)
          + f" {'cycle':>7} {'tok/s':>6} {'TTFT s':>7}")
    for lv in levels:
        ph = lv["phases_ms"]
        cells = " ".join(f"{ph[p]:10.2f}" if ph else f"{'-':>10}" for p in PHASES)
        rate = f"{lv['cycle_tok_s']:6.1f}" if lv["cycle_tok_s"] else f"{'-':>6}"
        print(f"{lv['transport']:>10} {lv['clients']:>7} {lv['cycles']:>6} {cells} {lv['cycle_ms']:7.2f} {rate} "
              f"{lv['mean_ttft_s']:7.3f}")
    for c in args.clients:
        a, b = (median_level(runs[(t, c)]) for t in urls)
        if a["phases_ms"] and b["phases_ms"]:
            print(f"{c:>3} clients: in-process / websocket step time {a['cycle_ms'] / b['cycle_ms']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": n, "settings": {k: str(v) for k, v in vars(args).items()},
                                    "load_average": os.getloadavg(), "levels": levels}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Resident memory under varied traffic (issue 27, "memory that stays flat"): `--clients` (8)
clients send chat completions of 5-120 random words with `max_tokens` 8-64 through one
`fedsea gateway` in front of one `fedsea server` (separate processes on loopback, the default
model, a 64 MiB KV pool) for `--minutes` (30).  Each process's RSS is sampled every
`--every` seconds (5), together with the gateway's edge prefix store bytes (a cache that is
meant to grow until its budget is full).

It prints RSS at minutes 5, 10, 20, 30 and the growth from minute 5 to the end, and writes
JSON and a PNG under benchmarks/results/.

    nice -n 10 python benchmarks/memory_soak.py [--minutes 30] [--clients 8] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.soak import RESULTS, Process, metrics  # noqa: E402
from fedsea_shared import defaults  # noqa: E402
from fedsea_shared.models import resolve_model  # noqa: E402
from server_runtime.process import free_port  # noqa: E402

MARKS_MIN = (5, 10, 20, 30)
SERIES = ("server", "server_anonymous", "gateway", "gateway_anonymous", "edge_prefix_mib")


def resident_mib(pid: int) -> tuple[float, float]:
    """A process's resident memory and the anonymous part of it (heap, tensors: what is not
    a mapped library or file, whose pages the kernel may drop and read back under pressure)."""
    kb = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value, *_ = line.split()
        kb[key.rstrip(":")] = int(value)
    return kb["Rss"] / 1024, kb["Anonymous"] / 1024


def vocabulary(model: str) -> list[str]:
    """Whole lowercase words of the model's tokenizer: prompts of random words tokenize to
    ever-new lengths and contents, so no two requests share a prefix."""
    vocab = json.loads((resolve_model(model) / "tokenizer.json").read_text())["model"]["vocab"]
    return sorted(t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower() and len(t) > 3)


async def client(i: int, url: str, model: str, words: list[str], until: float, outcomes: Counter) -> None:
    rng = random.Random(i)
    async with httpx.AsyncClient(base_url=url, timeout=900) as http:
        while time.monotonic() < until:
            prompt = " ".join(rng.choices(words, k=rng.randint(5, 120)))
            body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": rng.randint(8, 64), "temperature": 0.8}
            try:
                r = await http.post("/chat/completions", json=body)
                outcomes["ok" if r.status_code == 200 else f"http_{r.status_code}"] += 1
            except httpx.HTTPError as e:
                outcomes[f"client:{type(e).__name__}"] += 1


async def drive(args, procs: dict[str, Process], gateway_port: int, words: list[str]) -> dict:
    outcomes: Counter = Counter()
    memory: list[dict] = []
    t_start = time.monotonic()
    until = t_start + args.minutes * 60

    async def sample():
        while time.monotonic() < until:
            m = await asyncio.to_thread(metrics, gateway_port)
            row = {"t": round(time.monotonic() - t_start, 1), "requests": sum(outcomes.values()),
                   "edge_prefix_mib": m.get("fedsea_gateway_edge_prefix_bytes", 0) / 2**20}
            for name, proc in procs.items():
                row[name], row[f"{name}_anonymous"] = resident_mib(proc.proc.pid)
            memory.append(row)
            await asyncio.sleep(args.every)

    url = f"http://127.0.0.1:{gateway_port}/v1"
    await asyncio.gather(sample(), *(client(i, url, args.model, words, until, outcomes) for i in range(args.clients)))
    return {"outcomes": dict(outcomes), "memory": memory}


def at_minute(memory: list[dict], name: str, minute: float) -> float | None:
    """The sample nearest to `minute`, if the run got that far."""
    t = minute * 60
    if not memory or memory[-1]["t"] < t - 30:
        return None
    return min(memory, key=lambda m: abs(m["t"] - t))[name]


def summarize(memory: list[dict], names: list[str], minutes: float) -> dict:
    out = {}
    for name in names:
        marks = {f"min_{m}": at_minute(memory, name, m) for m in MARKS_MIN if m <= minutes}
        after = [m[name] for m in memory if m["t"] >= 300 and m[name]]
        start, end = at_minute(memory, name, 5), memory[-1][name]
        out[name] = {**marks, "end": end, "max_after_5min": max(after, default=None),
                     "growth_from_min_5": None if start is None else (end - start) / start}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    t = [m["t"] / 60 for m in result["memory"]]
    for name in SERIES:
        label = "gateway's edge prefix store" if name == "edge_prefix_mib" else name.replace("_", ", ")
        ax.plot(t, [m[name] for m in result["memory"]], label=label, linestyle=":" if "anonymous" in name else "-",
                color={"server": "C0", "gateway": "C1"}.get(name.split("_")[0], "C2"))
    ax.axvline(5, color="grey", linestyle=":")
    ax.set_xlabel("minutes")
    ax.set_ylabel("resident memory, MiB")
    ax.set_ylim(bottom=0)
    ax.set_title(f"fedsea RSS: {result['clients']} clients, random prompts, {result['kv_cache_memory']} KV pool")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--every", type=float, default=5, help="seconds between RSS samples")
    p.add_argument("--model", default=defaults.MODEL)
    p.add_argument("--kv-cache-memory", default="64MiB")
    p.add_argument("--edge-cache-memory", default="16MiB",
                   help="the gateway's store of recent conversations (its own default: 256MiB), which grows until "
                        "full by design: a budget this traffic fills in the first minutes (default: %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS / "memory_soak.json")
    args = p.parse_args(argv)
    words = vocabulary(args.model)
    log_dir = Path(tempfile.mkdtemp(prefix="fedsea-memory-soak-"))
    server_port, gateway_port = free_port(), free_port()
    procs = {
        "server": Process("server", ["server", "--model", args.model, "--port", str(server_port),
                                     "--kv-cache-memory", args.kv_cache_memory, "--kv-quota", "1"], server_port, log_dir),
        "gateway": Process("gateway", ["gateway", "--model", args.model, "--port", str(gateway_port),
                                       "--edge-cache-memory", args.edge_cache_memory, "--server", f"ws://127.0.0.1:{server_port}"],
                           gateway_port, log_dir),
    }
    load_before = os.getloadavg()
    try:
        for proc in procs.values():
            proc.start()
        result = asyncio.run(drive(args, procs, gateway_port, words))
    finally:
        for proc in reversed(procs.values()):
            proc.stop()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result.update(minutes=args.minutes, clients=args.clients, model=args.model, kv_cache_memory=args.kv_cache_memory,
                  edge_cache_memory=args.edge_cache_memory,
                  commit=commit, logs=str(log_dir), date=time.strftime("%Y-%m-%d %H:%M"),
                  machine=f"{platform.machine()}, {os.cpu_count()} cores",
                  load_before=load_before, load_after=os.getloadavg())
    result["summary"] = summarize(result["memory"], SERIES, args.minutes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print(f"requests: {result['outcomes']}; load {load_before[0]:.1f} before, {result['load_after'][0]:.1f} after")
    marks = [f"min {m}" for m in MARKS_MIN if m <= args.minutes]
    print(f"{'MiB':>18} " + " ".join(f"{m:>8}" for m in marks) + f" {'end':>8} {'5 → end':>8}")
    for name, s in result["summary"].items():
        cells = [s[f"min_{m}"] for m in MARKS_MIN if m <= args.minutes] + [s["end"]]
        growth = "" if s["growth_from_min_5"] is None else f"{s['growth_from_min_5']:+.1%}"
        print(f"{name:>18} " + " ".join(f"{'-' if c is None else f'{c:.0f}':>8}" for c in cells) + f" {growth:>8}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}; logs in {log_dir}")


if __name__ == "__main__":
    main()

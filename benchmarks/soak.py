"""Soak test (issue 14, item 4): `--sessions` (16) concurrent multi-turn chats through one
`fedsea gateway` in front of two `fedsea server`s (subprocesses on loopback) for
`--minutes` (10), some streams aborted by their client at random; at the middle, server A
is killed (SIGKILL: a crash, not a clean shutdown) and restarted on its port 10 s later.

It reports the errors clients saw, by kind (an HTTP status and error code, an error event
in a stream, a stream without [DONE], a client-side exception), the KV blocks each server
still holds after every session closed (from /metrics: leaked blocks), and the resident
memory of the three processes over time (a PNG and JSON in benchmarks/results/).

The servers get a small KV pool (`--kv-cache-memory`, 160 MiB: 250 blocks of the default
model, less than 16 long chats need at once), so preemption happens too, and no per-tenant
quota (the gateway is their only tenant).

    nice -n 10 python benchmarks/soak.py [--minutes 10] [--sessions 16] [--model NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import httpx
import orjson
import psutil

from fedsea_shared import defaults
from server_runtime.process import _healthy, free_port

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["the sea", "bread", "a card game", "rivers", "a mountain hike", "fractions", "bees", "a wedding speech"]
RESTART_AFTER_S = 10.0


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        rows = [line.split() for line in r.read().decode().splitlines() if line and not line.startswith("#")]
    return {row[0]: float(row[1]) for row in rows if len(row) == 2}


class Process:
    """One `fedsea` subprocess, restartable on the same port."""

    def __init__(self, name: str, args: list[str], port: int, log_dir: Path):
        self.name, self.args, self.port = name, args, port
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> None:
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "fedsea.cli", *self.args], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while not _healthy(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not become healthy; see {self.log_path}")
            time.sleep(0.2)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def rss_mib(self) -> float | None:
        try:
            return psutil.Process(self.proc.pid).memory_info().rss / 2**20 if self.proc.poll() is None else None
        except psutil.NoSuchProcess:
            return None


async def chat_turn(http: httpx.AsyncClient, model: str, messages: list[dict], rng: random.Random) -> tuple[str, str]:
    """One streamed turn; returns (outcome, the reply's text).  Outcome: ok, aborted, or an error kind."""
    abort_after = rng.randint(1, 20) if rng.random() < 0.15 else None
    body = {"model": model, "messages": messages, "max_tokens": rng.randint(8, 48), "temperature": 0.7, "stream": True}
    text, chunks = "", 0
    try:
        async with http.stream("POST", "/chat/completions", json=body) as r:
            if r.status_code != 200:
                code = orjson.loads(await r.aread()).get("error", {}).get("code")
                return f"http_{r.status_code}:{code}", ""
            async for line in r.aiter_lines():
                if not line:
                    continue
                if line == "data: [DONE]":
                    return "ok", text
                event = orjson.loads(line[6:])
                if "error" in event:
                    return f"stream_error:{event['error'].get('code')}", text
                for choice in event["choices"]:  # none in a usage chunk
                    text += choice["delta"].get("content") or ""
                chunks += 1
                if abort_after is not None and chunks >= abort_after:
                    return "aborted", text  # leaving the block closes the stream mid-way
        return "no_done", text
    except httpx.HTTPError as e:
        return f"client:{type(e).__name__}", text


async def chatter(i: int, url: str, model: str, until: float, outcomes: Counter, turns: list) -> None:
    rng = random.Random(i)
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        messages: list[dict] = []
        while time.monotonic() < until:
            if len(messages) >= 8:  # 4 turns: a new conversation
                messages = []
            messages.append({"role": "user", "content": f"Chat {i}: tell me something about {rng.choice(TOPICS)}."})
            t0 = time.monotonic()
            outcome, text = await chat_turn(http, model, messages, rng)
            outcomes[outcome] += 1
            turns.append({"t": round(t0, 2), "chat": i, "outcome": outcome, "s": round(time.monotonic() - t0, 2)})
            if outcome == "ok":
                messages.append({"role": "assistant", "content": text})
            else:
                messages = []


async def soak(args, procs: dict[str, Process], gateway_url: str) -> dict:
    outcomes: Counter = Counter()
    turns: list[dict] = []
    memory: list[dict] = []
    t_start = time.monotonic()
    until = t_start + args.minutes * 60
    events: list[dict] = []

    async def sample_memory():
        while time.monotonic() < until:
            memory.append({"t": round(time.monotonic() - t_start, 1), **{n: p.rss_mib() for n, p in procs.items()}})
            await asyncio.sleep(5)

    async def crash_and_restart():
        await asyncio.sleep(args.minutes * 30)
        events.append({"t": round(time.monotonic() - t_start, 1), "event": "server_a killed"})
        procs["server_a"].kill()
        await asyncio.sleep(RESTART_AFTER_S)
        await asyncio.to_thread(procs["server_a"].start)
        events.append({"t": round(time.monotonic() - t_start, 1), "event": "server_a healthy again"})

    await asyncio.gather(sample_memory(), crash_and_restart(),
                         *(chatter(i, gateway_url, args.model, until, outcomes, turns) for i in range(args.sessions)))
    for row in turns:
        row["t"] = round(row["t"] - t_start, 2)
    return {"outcomes": dict(outcomes), "turns": turns, "memory": memory, "events": events}


def leaked_blocks(procs: dict[str, Process]) -> dict[str, dict]:
    """KV blocks still used once every session closed (the gateway closed them all)."""
    out = {}
    for name in ("server_a", "server_b"):
        deadline = time.monotonic() + 30
        while True:
            m = metrics(procs[name].port)
            if m.get("fedsea_sessions", 0) == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        out[name] = {"sessions": m.get("fedsea_sessions"), "kv_blocks_used": m.get("fedsea_kv_blocks_used"),
                     "preemptions": m.get("fedsea_preemptions_total"), "tokens": m.get("fedsea_tokens_total")}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name in ("gateway", "server_a", "server_b"):
        rss = [float("nan") if m[name] is None else m[name] for m in result["memory"]]  # a gap while it is down
        ax.plot([m["t"] for m in result["memory"]], rss, label=name)
    for e in result["events"]:
        ax.axvline(e["t"], color="grey", linestyle=":")
    ax.set_xlabel("seconds")
    ax.set_ylabel("resident memory, MiB")
    ax.set_title(f"fedsea soak: {result['sessions']} chats, {result['minutes']} min, server A killed mid-way")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--model", default=defaults.MODEL)
    p.add_argument("--kv-cache-memory", default="160MiB", help="KV pool of each server (default: %(default)s)")
    p.add_argument("--edge-cache-memory", default="256MiB",
                   help="the gateway's cache of recent conversations (default: %(default)s, the gateway's own): "
                        "its resident memory grows until this fills")
    p.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = p.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="fedsea-soak-"))
    ports = {name: free_port() for name in ("server_a", "server_b", "gateway")}
    procs = {
        name: Process(name, ["server", "--model", args.model, "--port", str(ports[name]),
                             "--kv-cache-memory", args.kv_cache_memory, "--kv-quota", "1"], ports[name], log_dir)
        for name in ("server_a", "server_b")
    }
    servers = [a for name in ("server_a", "server_b") for a in ("--server", f"ws://127.0.0.1:{ports[name]}")]
    procs["gateway"] = Process("gateway", ["gateway", "--model", args.model, "--port", str(ports["gateway"]),
                                           "--edge-cache-memory", args.edge_cache_memory, *servers],
                               ports["gateway"], log_dir)
    try:
        for proc in procs.values():
            proc.start()
        result = asyncio.run(soak(args, procs, f"http://127.0.0.1:{ports['gateway']}/v1"))
        result["kv_after"] = leaked_blocks(procs)
    finally:
        for proc in procs.values():
            proc.stop()
    result.update(minutes=args.minutes, sessions=args.sessions, model=args.model, kv_cache_memory=args.kv_cache_memory, edge_cache_memory=args.edge_cache_memory,
                  logs=str(log_dir),
                  machine=f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    errors = {k: v for k, v in result["outcomes"].items() if k not in ("ok", "aborted")}
    mem = result["memory"]
    half = len(mem) // 2
    result["summary"] = {
        "turns": sum(result["outcomes"].values()), "errors": errors,
        "leaked_blocks": {n: r["kv_blocks_used"] for n, r in result["kv_after"].items()},
        # Warm-up is the first half; "flat" compares the last sample with the median of the second half.
        "rss_mib_second_half": {n: [min(m[n] for m in mem[half:] if m[n]), max(m[n] for m in mem[half:] if m[n])]
                                for n in ("gateway", "server_b")} if half else {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}; logs in {log_dir}")


if __name__ == "__main__":
    main()

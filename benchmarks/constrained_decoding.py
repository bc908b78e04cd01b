"""What grammar-constrained decoding costs per token: the same chat requests free,
with a json_schema response_format, and with a required tool call, at 1 and 8
concurrent streams, through the in-process gateway and server runtime (default model,
split and noise; greedy and seeded).  Also the grammar work alone per token (mask +
advance), outside the decode loop, along a random walk of admitted tokens.

    python benchmarks/constrained_decoding.py [--max-tokens 48] [--rounds 3] [--model DIR]

ms/token is each stream's time between its first and last token over its tokens - 1,
averaged over the streams.  Each round runs every mode once, in turn, and the table
gives each mode's median over the rounds, so that load from others on a shared machine
falls on all modes alike rather than on whichever ran during it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import openai
import torch

from fedsea_shared import defaults
from gateway import GatewaySettings, GatewayThread
from server_runtime.app import ServerSettings, ServerThread

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "Describe three cities you would like to visit and why.",
    "List some facts about the moon.",
    "Tell me about your favourite book.",
    "Plan a weekend trip to the mountains.",
    "Explain how to make bread.",
    "What should I pack for a beach holiday?",
    "Describe a day in the life of a farmer.",
    "Give advice to a new programmer.",
]
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "points": {"type": "array", "items": {"type": "string", "maxLength": 80}, "maxItems": 8},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["title", "points", "rating"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {
    "name": "save_notes", "description": "Save notes about the topic",
    "parameters": {"type": "object", "properties": {"topic": {"type": "string", "maxLength": 60},
                                                    "notes": {"type": "array", "items": {"type": "string", "maxLength": 80}}},
                   "required": ["topic", "notes"], "additionalProperties": False},
}}]
MODES = {
    "free": {},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}},
    "tool_required": {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
}


async def one(client: openai.AsyncOpenAI, model: str, prompt: str, seed: int, max_tokens: int, extra: dict) -> dict:
    times = []
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0, seed=seed,
        max_tokens=max_tokens, stream=True, logprobs=True, **extra,  # logprobs: one chunk per token
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs:
            times += [time.perf_counter()] * len(chunk.choices[0].logprobs.content)
    tokens = len(times)
    return {"tokens": tokens, "ms_per_token": 1e3 * (times[-1] - times[0]) / (tokens - 1) if tokens > 1 else None}


async def run_mode(url: str, model: str, concurrency: int, max_tokens: int, extra: dict) -> dict:
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    runs = await asyncio.gather(*(one(client, model, PROMPTS[i], i, max_tokens, extra) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    ms = [r["ms_per_token"] for r in runs if r["ms_per_token"] is not None]
    tokens = sum(r["tokens"] for r in runs)
    return {"ms_per_token": sum(ms) / len(ms), "tokens": tokens, "tok_s": tokens / wall}


def grammar_alone(client, steps: int = 300) -> dict:
    """Mask + advance per token with the json_schema grammar, outside any decode loop,
    choosing each next token at random among those the grammar admits."""
    grammars = client.grammars
    grammar = grammars.json_schema(SCHEMA)
    grammars.check(grammar)
    gen = torch.Generator().manual_seed(0)
    times = []
    while len(times) < steps:
        c = grammars.constraint(grammar)
        while not c.finished and len(times) < steps:
            t0 = time.perf_counter()
            admitted = torch.nonzero(c.allowed()).flatten()
            token = int(admitted[torch.randint(len(admitted), (1,), generator=gen)])
            c.advance(token)
            times.append(time.perf_counter() - t0)
    return {"ms_per_token": 1e3 * statistics.mean(times), "max_ms": 1e3 * max(times), "tokens": len(times)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=defaults.MODEL)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "constrained_decoding.json")
    args = ap.parse_args(argv)

    server = ServerThread(ServerSettings(model=args.model, port=0))
    gw = GatewayThread(GatewaySettings.of(server_url=server.url, model=args.model, port=0))
    try:
        gw.wait_ready(timeout=300)
        model = gw.settings.edge.model_id
        for extra in MODES.values():  # warm-up: first-use costs (the grammar's vocabulary view)
            asyncio.run(run_mode(gw.url, model, 1, 4, extra))
        load_before = os.getloadavg()
        rows = []
        for c in args.concurrency:
            runs = {name: [] for name in MODES}
            for _ in range(args.rounds):
                for name, extra in MODES.items():
                    runs[name].append(asyncio.run(run_mode(gw.url, model, c, args.max_tokens, extra)))
            row = {"concurrency": c}
            for name, rs in runs.items():
                row[name] = {key: statistics.median(r[key] for r in rs) for key in ("ms_per_token", "tokens", "tok_s")}
                row[name]["rounds_ms_per_token"] = [r["ms_per_token"] for r in rs]
            rows.append(row)
        alone = grammar_alone(gw.backend.client)
    finally:
        gw.stop()
        server.stop()

    result = {
        "model": args.model, "max_tokens": args.max_tokens, "rows": rows, "grammar_alone": alone,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, load average "
                   f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after",
    }
    print(f"{'streams':>7} | {'mode':<14} | {'ms/token':>8} | {'vs free':>7} | {'tokens':>6} | {'tok/s':>6}")
    for row in rows:
        for name in MODES:
            r = row[name]
            print(f"{row['concurrency']:>7} | {name:<14} | {r['ms_per_token']:8.1f} | {r['ms_per_token'] / row['free']['ms_per_token']:7.2f} | {r['tokens']:>6.0f} | {r['tok_s']:6.1f}")
    print(f"grammar alone (mask + advance): {alone['ms_per_token']:.3f} ms/token (max {alone['max_ms']:.1f}) over {alone['tokens']} tokens")
    print(result["machine"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

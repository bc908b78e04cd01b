"""What grammar-constrained decoding costs per token: the same chat requests free,
with a json_schema response_format, and with a required tool call, at 1 and 8
concurrent streams, through the in-process gateway and server runtime (default model,
split and noise; greedy and seeded).  Also the grammar work alone per token (mask +
advance), measured outside the decode loop.

    python benchmarks/constrained_decoding.py [--max-tokens 48] [--model DIR]

ms/token is each stream's time between its first and last token over its tokens - 1,
averaged over the streams; the modes run back to back in one process, so a noisy
machine shifts them alike more than it shifts their difference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
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


def grammar_alone(client, steps: int = 200) -> dict:
    """Mask + advance per token with the json_schema grammar, outside any decode loop."""
    grammars = client.grammars
    grammar = grammars.json_schema(SCHEMA)
    grammars.check(grammar)
    answer = json.dumps({"title": "A trip", "points": ["pack light"] * 6, "rating": 4})
    ids = client.tokenizer(answer, add_special_tokens=False).input_ids
    total, n = 0.0, 0
    while n < steps:
        c = grammars.constraint(grammar)
        for t in ids:
            t0 = time.perf_counter()
            c.allowed()
            c.advance(t)
            total += time.perf_counter() - t0
            n += 1
    return {"ms_per_token": 1e3 * total / n, "tokens": n}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=defaults.MODEL)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", type=Path, default=RESULTS / "constrained_decoding.json")
    args = ap.parse_args(argv)

    server = ServerThread(ServerSettings(model=args.model, port=0))
    gw = GatewayThread(GatewaySettings(server_url=server.url, model=args.model, port=0))
    try:
        gw.wait_ready(timeout=300)
        model = gw.settings.model_id
        for extra in MODES.values():  # warm-up: first-use costs (the grammar's vocabulary view)
            asyncio.run(run_mode(gw.url, model, 1, 4, extra))
        rows = []
        for c in args.concurrency:
            row = {"concurrency": c}
            for name, extra in MODES.items():
                row[name] = asyncio.run(run_mode(gw.url, model, c, args.max_tokens, extra))
            rows.append(row)
        alone = grammar_alone(gw.backend.client)
    finally:
        gw.stop()
        server.stop()

    result = {
        "model": args.model, "max_tokens": args.max_tokens, "rows": rows, "grammar_alone": alone,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, shared with other jobs",
    }
    print(f"{'streams':>7} | {'mode':<14} | {'ms/token':>8} | {'vs free':>7} | {'tokens':>6} | {'tok/s':>6}")
    for row in rows:
        for name in MODES:
            r = row[name]
            print(f"{row['concurrency']:>7} | {name:<14} | {r['ms_per_token']:8.1f} | {r['ms_per_token'] / row['free']['ms_per_token']:7.2f} | {r['tokens']:>6} | {r['tok_s']:6.1f}")
    print(f"grammar alone (mask + advance): {alone['ms_per_token']:.3f} ms/token over {alone['tokens']} tokens")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

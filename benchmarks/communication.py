"""Communication of the split: bytes on the wire per token, and decode speed of
KV-cache collaboration against the naive split that re-sends the whole sequence every
step (FL-GLM style, the baseline of the FedSEA-LLaMA paper).

Both methods run in the same process against the same `fedsea server` subprocess, on the
default model, noise 0, greedy.  The naive split keeps no KV cache on either side: every
step the edge re-runs its head blocks over the whole sequence, sends all of it, the
server re-runs the middle over all of it in a fresh session, and the edge re-runs the tail.

    python benchmarks/communication.py [--contexts 128 512 1024] [--steps 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import torch

from edge_runtime.client import AsyncEdgeClient
from edge_runtime.model import SequenceCache
from fedsea_shared import defaults
from fedsea_shared.models import resolve_model
from fedsea_shared.protocol import Step, encode, tensor_meta
from server_runtime.process import server_process

RESULTS = Path(__file__).parent / "results"


def frame_bytes(tokens: int, hidden: int, dtype: torch.dtype, sid: int = 0, pos: int = 0) -> int:
    """Exact size of one Step (or Output) frame carrying `tokens` hidden states of one session."""
    t = torch.zeros(tokens, hidden, dtype=dtype)
    return len(encode(Step(rows=[(sid, pos, tokens)], tensor=tensor_meta(t)), t))


async def kv_collaboration(client: AsyncEdgeClient, prompt: list[int], steps: int) -> list[float]:
    """Per decode step seconds: one hidden state each way."""
    worker = client.worker
    session = await client.new_session(0.0).open()
    cache = SequenceCache()
    x, pos, times = torch.tensor(prompt), 0, []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        out = await session.step(await worker.head(cache, pos, x), x.tolist())
        logits = await worker.tail(cache, pos, out)
        pos += x.shape[0]
        x = torch.tensor([int(logits.argmax())])
        if i:  # step 0 is the prefill
            times.append(time.perf_counter() - t0)
    await session.close()
    return times


async def naive_split(client: AsyncEdgeClient, prompt: list[int], steps: int) -> list[float]:
    """Per decode step seconds when nothing is cached: everything is recomputed and re-sent."""
    worker = client.worker
    seq, times = list(prompt), []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        session = await client.new_session(0.0).open()
        cache = SequenceCache()
        out = await session.step(await worker.head(cache, 0, torch.tensor(seq)), seq)
        logits = await worker.tail(cache, 0, out)
        await session.close()
        seq.append(int(logits.argmax()))
        if i:
            times.append(time.perf_counter() - t0)
    return times


async def run(args) -> dict:
    model_dir = resolve_model(args.model)
    with server_process(model_dir, args.head, args.tail) as url:
        client = AsyncEdgeClient(url, model=str(model_dir), head=args.head, tail=args.tail, noise=0.0)
        hidden = client.config.hidden_size
        torch.manual_seed(0)
        rows = []
        for ctx in args.contexts:
            prompt = torch.randint(100, client.config.vocab_size, (ctx,)).tolist()
            await kv_collaboration(client, prompt[:32], 2)  # warm-up
            kv = await kv_collaboration(client, prompt, args.steps)
            naive = await naive_split(client, prompt, args.steps)
            kv_ms, naive_ms = 1000 * sum(kv) / len(kv), 1000 * sum(naive) / len(naive)
            rows.append({
                "context": ctx,
                "kv_ms_per_token": kv_ms,
                "naive_ms_per_token": naive_ms,
                "speedup": naive_ms / kv_ms,
                "kv_bytes_per_token": 2 * frame_bytes(1, hidden, torch.float32),
                "naive_bytes_per_token": 2 * frame_bytes(ctx, hidden, torch.float32),
            })
        await client.aclose()
    wire = {
        name: {
            "prefill_bytes_per_prompt_token": frame_bytes(512, hidden, dt) / 512,
            "decode_bytes_per_generated_token": 2 * frame_bytes(1, hidden, dt, sid=12345, pos=1000),
        }
        for name, dt in [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)]
    }
    return {"model": args.model, "head": args.head, "tail": args.tail, "hidden_size": hidden,
            "steps": args.steps, "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
            "wire": wire, "decode": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=defaults.MODEL)
    p.add_argument("--head", type=int, default=defaults.HEAD)
    p.add_argument("--tail", type=int, default=defaults.TAIL)
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024])
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()
    result = asyncio.run(run(args))
    print(f"\nBytes on the wire (hidden {result['hidden_size']}, both directions for decode):")
    print(f"{'dtype':>9} {'prefill B/prompt token':>24} {'decode B/generated token':>26}")
    for name, w in result["wire"].items():
        print(f"{name:>9} {w['prefill_bytes_per_prompt_token']:>24.1f} {w['decode_bytes_per_generated_token']:>26}")
    print(f"\nDecode, {result['steps']} steps, float32 wire:")
    print(f"{'context':>8} {'KV-collab ms/tok':>17} {'naive ms/tok':>13} {'speedup':>8} {'KV B/tok':>9} {'naive B/tok':>12}")
    for r in result["decode"]:
        print(f"{r['context']:>8} {r['kv_ms_per_token']:>17.1f} {r['naive_ms_per_token']:>13.1f} "
              f"{r['speedup']:>7.1f}x {r['kv_bytes_per_token']:>9} {r['naive_bytes_per_token']:>12}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "communication.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {RESULTS / 'communication.json'}")


if __name__ == "__main__":
    main()

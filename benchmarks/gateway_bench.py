"""The gateway as users run it: `fedsea serve` (default model, default split and noise) in
a subprocess, driven over HTTP by the official `openai` client.

1. Concurrency: the same 8 chat requests (greedy, seeded, so each produces the same
   tokens both ways) run one at a time, then all 8 as concurrent streams; aggregate
   tokens/s of each, their ratio, and whether every concurrent stream matches its lone run.
2. Latency: time to first token and decode tokens/s of `fedsea serve` next to
   transformers' `generate` of the full model (same prompts, greedy), in this process
   after the gateway phase (never at the same time).

    python benchmarks/gateway_bench.py [--max-tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from fedsea_shared import defaults
from fedsea_shared.models import resolve_model
from server_runtime.process import _healthy, free_port

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain in detail how photosynthesis works.",
    "Give me ten tips for learning a new language.",
    "Describe the water cycle step by step.",
    "Write a poem about the sea at night.",
    "What are the main causes of the French Revolution?",
    "Explain how a bicycle stays upright.",
    "Write a recipe for a simple tomato soup.",
]


@contextmanager
def fedsea_serve(log_path: Path, threads: int):
    """`fedsea serve` with its defaults on a free port; yields the /v1 URL once healthy."""
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads in that process
    with open(log_path, "w") as log:
        cmd = [sys.executable, "-m", "fedsea.cli", "serve", "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 300
            while not _healthy(port):  # the gateway's /health: 200 once the edge is connected
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fedsea serve did not become healthy; see {log_path}")
                time.sleep(0.2)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


async def stream_chat(client: openai.AsyncOpenAI, prompt: str, seed: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = last = None
    text, usage, finish = [], None, None
    stream = await client.chat.completions.create(
        model=defaults.MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, seed=seed,
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
    )
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
            continue
        first = first or now  # the gateway sends its first chunk once the first token exists
        last = now
        text.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    tokens = usage.completion_tokens
    return {
        "text": "".join(text), "tokens": tokens, "finish_reason": finish,
        "ttft_s": first - t0, "seconds": last - t0,
        "decode_tok_s": (tokens - 1) / (last - first) if tokens > 1 and last > first else None,
    }


async def gateway_phase(url: str, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    await stream_chat(client, "Hi", 0, 4)  # warm-up
    t0 = time.perf_counter()
    alone = [await stream_chat(client, p, i, max_tokens) for i, p in enumerate(PROMPTS)]
    alone_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    together = await asyncio.gather(*(stream_chat(client, p, i, max_tokens) for i, p in enumerate(PROMPTS)))
    together_wall = time.perf_counter() - t0
    await client.close()
    tokens = sum(r["tokens"] for r in alone)
    return {
        "alone": alone, "together": together,
        "alone_tok_s": tokens / alone_wall,
        "together_tok_s": sum(r["tokens"] for r in together) / together_wall,
        "all_completed": all(r["finish_reason"] in ("stop", "length") for r in together),
        "matching_streams": sum(a["text"] == b["text"] for a, b in zip(alone, together)),
    }


class _Clock(BaseStreamer):
    """Times each token `generate` emits (its first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def transformers_phase(max_tokens: int) -> list[dict]:
    model_dir = resolve_model(defaults.MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for i, prompt in enumerate(["Hi"] + PROMPTS):  # the first is a warm-up
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        clock = _Clock()
        t0 = time.perf_counter()
        with torch.no_grad():
            seq = model.generate(**ids, max_new_tokens=4 if i == 0 else max_tokens, do_sample=False, streamer=clock)
        tokens = seq.shape[1] - ids["input_ids"].shape[1]
        first, last = clock.times[1], clock.times[-1]
        if i:
            out.append({"tokens": tokens, "ttft_s": first - t0, "decode_tok_s": (tokens - 1) / (last - first) if tokens > 1 else None})
    return out


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads of both (default: %(default)s)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    load_before = os.getloadavg()
    with fedsea_serve(Path(tempfile.gettempdir()) / "fedsea_gateway_bench_serve.log", args.threads) as url:
        gw = asyncio.run(gateway_phase(url, args.max_tokens))
    hf = transformers_phase(args.max_tokens)
    load_after = os.getloadavg()

    alone, together = gw["alone"], gw["together"]
    print(f"\n1. {len(PROMPTS)} streaming chat requests, max_tokens {args.max_tokens}, greedy + seeded (fedsea serve defaults)")
    print(f"{'':24}{'aggregate tok/s':>16}{'mean TTFT s':>13}{'mean stream tok/s':>19}")
    for name, rows, agg in (("one at a time", alone, gw["alone_tok_s"]), ("8 concurrent", together, gw["together_tok_s"])):
        print(f"{name:24}{agg:16.1f}{_mean(r['ttft_s'] for r in rows):13.3f}{_mean(r['decode_tok_s'] for r in rows):19.1f}")
    ratio = gw["together_tok_s"] / gw["alone_tok_s"]
    print(f"concurrent / alone aggregate: {ratio:.2f}x; all completed: {gw['all_completed']}; "
          f"streams identical to their lone run: {gw['matching_streams']}/{len(PROMPTS)}")

    print(f"\n2. time to first token and decode speed, same {len(PROMPTS)} prompts, greedy")
    print(f"{'':34}{'mean TTFT s':>13}{'mean decode tok/s':>19}")
    rows = {"fedsea serve (split, noise %.1f)" % defaults.NOISE: alone, "transformers generate (full)": hf}
    for name, rs in rows.items():
        print(f"{name:34}{_mean(r['ttft_s'] for r in rs):13.3f}{_mean(r['decode_tok_s'] for r in rs):19.1f}")
    ttft_ratio = _mean(r["ttft_s"] for r in alone) / _mean(r["ttft_s"] for r in hf)
    decode_ratio = _mean(r["decode_tok_s"] for r in alone) / _mean(r["decode_tok_s"] for r in hf)
    print(f"fedsea / transformers: TTFT {ttft_ratio:.2f}x, decode speed {decode_ratio:.2f}x")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (machine shared with other jobs)")

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "settings": {"model": defaults.MODEL, "head": defaults.HEAD, "tail": defaults.TAIL, "noise": defaults.NOISE, "max_tokens": args.max_tokens, "threads": args.threads},
        "concurrency": gw | {"ratio": ratio},
        "latency": {"fedsea_serve": alone, "transformers": hf, "ttft_ratio": ttft_ratio, "decode_ratio": decode_ratio},
    }
    out = RESULTS / f"gateway_bench_threads{args.threads}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

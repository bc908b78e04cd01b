"""An 8-turn chat through `fedsea serve` (default model, split and noise): time to first
token and bytes sent upstream (edge -> server runtime) per turn, with prefix reuse on
(the default) and off (`--edge-cache-memory 0`: every turn recomputes and re-sends its
whole history).  Both run at once, two `fedsea serve` processes, turn by turn in
alternation, so a busy shared machine slows both alike.  Each turn adds a user message and
a greedy reply, about 175 new tokens together.

A vLLM-CPU run of the same conversation is not part of this script yet (vllm is not
installed here); it says so in its output and JSON.

    python benchmarks/multiturn.py [--turns 8] [--reply-tokens 50]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

import openai

from fedsea_shared import defaults
from server_runtime.process import _healthy, free_port

RESULTS = Path(__file__).parent / "results"
TOPICS = [
    "the history of the lighthouse on the northern cape, who built it, how its lamp was lit before electricity",
    "how a small bakery could plan its week: ordering flour, shaping dough overnight, and pricing bread",
    "the rules of a card game my grandmother taught me, where each player draws three cards and passes one",
    "why the river in our town floods every spring and what the council could do about the old bridge",
    "a plan for a two-day hike in the mountains with a tent, a small stove and water filters",
    "how to explain fractions to a ten year old using pizza slices, measuring cups and a ruler",
    "the differences between keeping bees in wooden hives and in straw skeps, and which is kinder",
    "a short speech for my sister's wedding that is funny but not embarrassing, mentioning her cat",
]


def user_message(turn: int) -> str:
    topic = TOPICS[turn % len(TOPICS)]
    return (f"Turn {turn + 1}. I would like to talk about {topic}. Please keep in mind everything we said "
            f"before, be concrete, and give me a few numbered points with short explanations. Also tell me "
            f"one thing people often get wrong about it, and one question I should ask an expert about {topic}. "
            f"I have been thinking about it for a while.")


def server_bytes(port: int) -> float:
    """Bytes the embedded server runtime has received (its metrics are in the gateway's /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("fedsea_received_bytes_total "):
                return float(line.split()[1])
    raise RuntimeError("fedsea serve reports no fedsea_received_bytes_total")


@contextmanager
def fedsea_serve(log_path: Path, extra: list[str]):
    port = free_port()
    cmd = [sys.executable, "-m", "fedsea.cli", "serve", "--port", str(port), *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            deadline = time.monotonic() + 300
            while not _healthy(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fedsea serve did not become healthy; see {log_path}")
                time.sleep(0.2)
            yield f"http://127.0.0.1:{port}/v1", port
        finally:
            proc.terminate()
            proc.wait(timeout=30)


class Conversation:
    def __init__(self, url: str, port: int, reply_tokens: int):
        self.client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        self.port, self.reply_tokens = port, reply_tokens
        self.messages: list[dict] = []
        self.rows: list[dict] = []

    def turn(self, turn: int) -> dict:
        self.messages.append({"role": "user", "content": user_message(turn)})
        sent_before = server_bytes(self.port)
        t0 = time.perf_counter()
        first, text, usage = None, [], None
        stream = self.client.chat.completions.create(
            model=defaults.MODEL, messages=self.messages, temperature=0, max_tokens=self.reply_tokens, stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].delta.content)
        self.messages.append({"role": "assistant", "content": "".join(text)})
        self.rows.append({
            "turn": turn + 1, "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "ttft_s": round(first - t0, 3), "upstream_bytes": int(server_bytes(self.port) - sent_before),
        })
        return self.rows[-1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--reply-tokens", type=int, default=50)
    p.add_argument("--out", type=Path, default=RESULTS / "multiturn.json")
    args = p.parse_args(argv)
    modes = {"reuse": [], "no_reuse": ["--edge-cache-memory", "0"]}
    with ExitStack() as stack:
        chats = {}
        for name, extra in modes.items():
            print(f"{name}: fedsea serve {' '.join(extra)}", flush=True)
            log = Path(tempfile.gettempdir()) / f"fedsea_multiturn_{name}.log"
            url, port = stack.enter_context(fedsea_serve(log, extra))
            chats[name] = Conversation(url, port, args.reply_tokens)
        for turn in range(args.turns):
            for name, chat in chats.items():
                print(f"  {name} turn {turn + 1}: {chat.turn(turn)}", flush=True)
    results = {name: chat.rows for name, chat in chats.items()}
    vllm = ("skipped: vllm is not installed" if importlib.util.find_spec("vllm") is None
            else "skipped: vllm is installed, but this script has no vLLM driver yet")
    print(f"vLLM-CPU: {vllm}")

    print(f"\n{'turn':>4} {'prompt':>7} {'new':>5} | {'TTFT reuse':>10} {'bytes reuse':>12} | {'TTFT off':>9} {'bytes off':>11}")
    previous = 0
    for a, b in zip(results["reuse"], results["no_reuse"]):
        new, previous = a["prompt_tokens"] - previous, a["prompt_tokens"]  # last reply + new message
        print(f"{a['turn']:>4} {a['prompt_tokens']:>7} {new:>5} | {a['ttft_s']:>9.2f}s {a['upstream_bytes']:>12,} | "
              f"{b['ttft_s']:>8.2f}s {b['upstream_bytes']:>11,}")
    summary = {}
    for name, rows in results.items():
        if len(rows) >= 2:
            summary[name] = {"ttft_last_over_turn2": round(rows[-1]["ttft_s"] / rows[1]["ttft_s"], 2)}
    print(f"turn {args.turns} TTFT / turn 2 TTFT: " + ", ".join(f"{k} {v['ttft_last_over_turn2']}x" for k, v in summary.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
        "model": defaults.MODEL, "turns": args.turns, "reply_tokens": args.reply_tokens,
        "results": results, "summary": summary, "vllm": vllm,
    }, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""fedsea against centralized servers on the same machine, model and precision.

The same OpenAI streaming workload (chat prompts, 48-token greedy answers) at 1, 8 and 16
concurrent streaming clients, against each server started here on a free loopback port and
stopped after, every one with room for the same 16 x 512 tokens of KV cache:

- `fedsea serve` with its defaults (split, default noise), once per `--weights` format,
- llama.cpp's `llama-server` (a GGUF of the same weights at the same bits: f32, bf16, Q8_0 for
  fedsea's int8, Q4_0 for its int4; `-t 2 -np 16`, continuous batching),
- vLLM's OpenAI server (CPU build, `--enforce-eager`, fp32; float32 only),

plus transformers' `generate` of the full model, single stream, in this process.  Reported:
aggregate tokens/s and mean time to first token per level, fedsea's ratio against each peer
at the same weight format, the CPU idle share during each 8-client run (from /proc/stat, so it
counts the whole machine, other jobs included), each server's resident memory after its
runs (its whole process tree), and the memory roofline of a single stream (read bandwidth
measured with a torch sum over 1 GiB, divided by the model's bytes in each format).  A peer that is not set up
is skipped with a message; set them up (outside the repo) with

    bash benchmarks/setup_llamacpp.sh      # llama-server + f32/Q8_0/Q4_0 GGUFs (~10 min on 2 cores)
    bash benchmarks/setup_vllm.sh          # vLLM CPU venv (~3.4 GB, ~3 min)
    python benchmarks/vs_peers.py [--peers-dir DIR] [--clients 1 8 16] [--repeat 3] [--only fedsea llamacpp ...]
    python benchmarks/vs_peers.py --weights int8 int4 --only fedsea llamacpp   # fedsea int8 vs Q8_0, int4 vs Q4_0
    python benchmarks/vs_peers.py --baseline DIR --only fedsea fedsea-baseline   # this commit vs another

This shared VM's speed drifts by a third within minutes: `--repeat N` runs the servers in
turn N times and reports each number's median (every run is kept in the JSON).

Writes benchmarks/results/vs_peers.json and vs_peers.png (or --out and its .png).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.gateway_bench import transformers_phase  # noqa: E402
from fedsea_shared import defaults  # noqa: E402
from fedsea_shared.models import resolve_model  # noqa: E402
from fedsea_shared.protocol import WIRE_DTYPES  # noqa: E402
from fedsea_shared.shard import Partition  # noqa: E402
from server_runtime.kv_pool import KVPool  # noqa: E402
from server_runtime.process import free_port  # noqa: E402
from server_runtime.worker import resolve_kv_dtype  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# fedsea's --weights beside the GGUF type llama.cpp serves at the same bits.
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0", "int4": "q4_0"}
BITS = {"float32": 32, "bfloat16": 16, "int8": 8, "int4": 4}
SLOTS, SLOT_TOKENS = 16, 512  # every server's KV cache holds 16 streams of 512 tokens
LOGS = Path(tempfile.gettempdir()) / "fedsea_vs_peers"
MODEL_NAME = defaults.MODEL  # every server is asked for this name (vLLM is told to serve it)
# Sixteen distinct prompts, each asking for more than 48 tokens, so no two concurrent streams
# share a prompt (vLLM's prefix cache would otherwise get them for free).
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain in detail how photosynthesis works.",
    "Give me ten tips for learning a new language.",
    "Describe the water cycle step by step.",
    "Write a poem about the sea at night.",
    "What are the main causes of the French Revolution?",
    "Explain how a bicycle stays upright.",
    "Write a recipe for a simple tomato soup.",
    "Describe how a computer boots, from power button to desktop.",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain the rules of chess to a beginner.",
    "List the planets of the solar system and describe each one.",
    "Explain how vaccines train the immune system.",
    "Write a dialogue between a cat and a dog about breakfast.",
    "Describe the history of the printing press.",
    "Give advice to someone starting their first job.",
]


# --- servers -------------------------------------------------------------------------------

@contextmanager
def _process(name: str, cmd: list[str], port: int, health: str, env: dict | None = None, timeout: float = 600):
    """Runs `cmd`, yields (its /v1 URL, its pid) once GET `health` answers 200, terminates it after."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ | (env or {}))
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not become healthy in {timeout:.0f} s; see {log_path}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}{health}", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            yield f"http://127.0.0.1:{port}/v1", proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


REPO = Path(__file__).resolve().parent.parent


def kv_cache_bytes(weights: str) -> int:
    """The server's KV pool for SLOTS x SLOT_TOKENS tokens of its middle blocks, in the dtype
    `fedsea serve` stores them in under these weights (the edge keeps its own blocks' cache
    per conversation)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(defaults.MODEL))
    layers = len(Partition(config.num_hidden_layers, defaults.HEAD, defaults.TAIL).server_layers)
    head_dim = config.hidden_size // config.num_attention_heads
    kv_dtype = WIRE_DTYPES[resolve_kv_dtype("auto", "float32", weights, converts=True)]
    return SLOTS * SLOT_TOKENS * KVPool.bytes_per_block(layers, 1, config.num_key_value_heads, head_dim, kv_dtype)


def fedsea_server(peers: Path, threads: int, tree: Path = REPO, name: str = "fedsea", weights: str = "float32"):
    """`fedsea serve` from the checkout at `tree` (another commit's worktree: --baseline)."""
    port = free_port()
    cmd = [sys.executable, "-m", "fedsea.cli", "serve", "--port", str(port), "--kv-cache-memory", str(kv_cache_bytes(weights))]
    if tree == REPO or weights != "float32":  # older commits (--baseline) know no --weights
        cmd += ["--weights", weights]
    return _process(name, cmd, port, "/health", env={"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(tree)})


def llamacpp_server(peers: Path, threads: int, weights: str = "float32"):
    binary = peers / "llamacpp/bin/llama-server"
    gguf = peers / f"llamacpp/smollm2-135m-instruct-{GGUF_TYPES[weights]}.gguf"
    if not (binary.is_file() and gguf.is_file()):
        return f"not set up ({binary} / {gguf} missing): run bash benchmarks/setup_llamacpp.sh"
    port = free_port()
    # One slot per stream of the 16-client level, each of SLOT_TOKENS.
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "-np", str(SLOTS), "-c", str(SLOTS * SLOT_TOKENS), "-cb", "--jinja"]
    if weights in ("int8", "int4"):
        # Repacking Q8_0/Q4_0 for its CPU kernels crashed llama-server at start on the Xeon VM
        # (SIGSEGV after "threadpool init", llama-cpp-python 0.3.36's llama.cpp).
        cmd.append("--no-repack")
    return _process(f"llamacpp-{GGUF_TYPES[weights]}", cmd, port, "/health")


def vllm_server(peers: Path, threads: int, weights: str = "float32"):
    python = peers / "vllm-venv/bin/python"
    if not python.is_file():
        return f"not set up ({python} missing): run bash benchmarks/setup_vllm.sh"
    port = free_port()
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model(defaults.MODEL)),
           "--served-model-name", MODEL_NAME, "--dtype", "float32", "--enforce-eager", "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "2048", "--max-num-seqs", "16", "--seed", "0"]
    # 1 GiB of KV cache is plenty for 16 x 512 tokens of this model (vLLM's CPU default is larger).
    return _process("vllm", cmd, port, "/health", env={"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=900)


SERVERS = {"fedsea": fedsea_server, "vllm": vllm_server, "llamacpp": llamacpp_server}
BASELINE = "fedsea-baseline"
LABELS = {"fedsea": f"fedsea serve (split, noise {defaults.NOISE})", "llamacpp": "llama.cpp llama-server (f32)",
          "vllm": "vLLM CPU (eager, fp32)", "transformers": "transformers generate (full)"}


def variant(server: str, weights: str) -> str:
    """A server's name at a weight format: the float32 one keeps the plain name."""
    return server if weights == "float32" else f"{server} {weights}"


def weights_of(name: str) -> str:
    return name.split(" ", 1)[1] if " " in name else "float32"


def label(name: str) -> str:
    server, weights = name.split(" ", 1)[0], weights_of(name)
    if weights == "float32":
        return LABELS[server]
    if server == "llamacpp":
        return f"llama.cpp llama-server ({GGUF_TYPES[weights].upper()})"
    return f"{LABELS[server]} {weights}"


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` and all its descendants (vLLM's engine runs in a child)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total / 1024


# --- workload ------------------------------------------------------------------------------

async def stream_chat(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    """One greedy streaming chat completion; times its first and last content chunks."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "seed": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    chunks, usage = 0, None
    async with client.stream("POST", "/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    first, last, chunks = first or now, now, chunks + 1
    if first is None:
        raise RuntimeError(f"no content streamed for {prompt!r}")
    # Servers stream one chunk per token; usage (where sent) is the exact count.
    tokens = usage["completion_tokens"] if usage else chunks
    return {"tokens": tokens, "ttft_s": first - t0, "seconds": last - t0}


def _client(url: str, clients: int) -> httpx.AsyncClient:
    # A fresh loopback connection per request: llama-server closes idle keep-alive
    # connections after a few seconds, and a request sent on one fails midway.
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=0)
    return httpx.AsyncClient(base_url=url, timeout=600, limits=limits)


def _cpu_times() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])  # user..steal; guest is already inside user


async def run_level(url: str, clients: int, rounds: int, max_tokens: int) -> dict:
    """`clients` concurrent streams, each sending `rounds` requests one after another."""
    async with _client(url, clients) as http:
        async def client(c: int) -> list[dict]:
            return [await stream_chat(http, PROMPTS[(c + clients * r) % len(PROMPTS)], max_tokens) for r in range(rounds)]

        idle0, total0 = _cpu_times()
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
        idle1, total1 = _cpu_times()
    rows = [r for rs in per_client for r in rs]
    return {
        "clients": clients, "requests": len(rows), "wall_s": wall,
        "tokens": sum(r["tokens"] for r in rows),
        "tok_s": sum(r["tokens"] for r in rows) / wall,
        "mean_ttft_s": sum(r["ttft_s"] for r in rows) / len(rows),
        "cpu_idle_pct": 100 * (idle1 - idle0) / max(total1 - total0, 1),
        "loadavg": os.getloadavg(),
    }


async def bench_server(url: str, pid: int, levels: list[int], rounds: int, max_tokens: int) -> dict:
    async with _client(url, 1) as http:  # warm-up: first-request costs
        await stream_chat(http, "Hi", 4)
    out = {}
    for c in levels:
        # The lone stream runs a few requests back to back so its numbers are not one sample.
        out[str(c)] = await run_level(url, c, max(rounds, 4) if c == 1 else rounds, max_tokens)
        out[str(c)]["rss_mib"] = rss_mib(pid)
        print(f"  {c:>2} clients: {out[str(c)]['tok_s']:6.1f} tok/s, TTFT {out[str(c)]['mean_ttft_s']:.3f} s, "
              f"CPU idle {out[str(c)]['cpu_idle_pct']:.0f}%, RSS {out[str(c)]['rss_mib']:.0f} MiB", flush=True)
    return out


# --- roofline ------------------------------------------------------------------------------

def memory_roofline(threads: int, formats: list[str]) -> dict:
    """Read bandwidth (best of 5 sums over 1 GiB of fp32) and the single-stream bound per
    weight format: every decode step reads every weight once, so tokens/s <= bandwidth /
    model bytes (scales and zeros left out)."""
    from safetensors import safe_open

    torch.set_num_threads(threads)
    x = torch.ones(2**28)  # 1 GiB
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    bandwidth = x.numel() * 4 / best
    del x
    model_bytes = 0
    for path in resolve_model(defaults.MODEL).glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                numel = 1
                for d in t.get_shape():
                    numel *= d
                model_bytes += numel * 4
    return {"read_gb_s": bandwidth / 1e9, "model_fp32_bytes": model_bytes, "tok_s": bandwidth / model_bytes,
            "tok_s_by_format": {f: bandwidth / (model_bytes * BITS[f] / 32) for f in formats}}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --- report --------------------------------------------------------------------------------

def median_levels(runs: list[dict]) -> dict:
    """Per level, the median of each number over a server's repeated runs (of one run: it)."""
    out = {}
    for level, first in runs[0].items():
        rows = [r[level] for r in runs]
        out[level] = {k: statistics.median(row[k] for row in rows) if isinstance(v, (int, float)) else rows[-1][k]
                      for k, v in first.items()}
    return out


def ratios(results: dict, levels: list[int]) -> dict:
    """Each fedsea variant's tokens/s over each peer's at the same weight format (>1 means
    fedsea is faster) and TTFT over theirs (<1 means fedsea answers sooner), per level, keyed
    "fedsea / peer"."""
    out = {}
    for own, fed in results.items():
        if own.split(" ", 1)[0] != "fedsea" or not isinstance(fed, dict):
            continue
        for peer, res in results.items():
            if peer.split(" ", 1)[0] == "fedsea" or weights_of(peer) != weights_of(own) or not isinstance(res, dict):
                continue
            out[f"{own} / {peer}"] = {str(c): {"tok_s": fed[str(c)]["tok_s"] / res[str(c)]["tok_s"],
                                               "ttft": fed[str(c)]["mean_ttft_s"] / res[str(c)]["mean_ttft_s"]}
                                      for c in levels if str(c) in res and str(c) in fed}
    return out


def plot(results: dict, hf: dict, roofline: dict, levels: list[int], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # vLLM's venv has none: the JSON is written, the picture is skipped
        print(f"matplotlib is not installed here: no {path.name}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = [s for s in results if isinstance(results.get(s), dict)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(servers), 1)
    for i, s in enumerate(servers):
        xs = [j + i * width for j in range(len(levels))]
        ax.bar(xs, [results[s][str(c)]["tok_s"] for c in levels], width, label=label(s))
        bx.bar(xs, [results[s][str(c)]["mean_ttft_s"] for c in levels], width, label=label(s))
    ax.axhline(roofline["tok_s"], color="k", ls="--", lw=1, label=f"fp32 single-stream roofline {roofline['tok_s']:.0f}")
    ax.axhline(hf["tok_s"], color="grey", ls=":", lw=1, label=f"transformers generate, 1 stream {hf['tok_s']:.0f}")
    for a, title in ((ax, "aggregate tokens/s"), (bx, "mean time to first token, s")):
        a.set_xticks([j + width * (len(servers) - 1) / 2 for j in range(len(levels))], [f"{c} clients" for c in levels])
        a.set_title(title)
    ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M, 48-token greedy chat answers, 2-core CPU shared with other jobs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers-dir", type=Path, default=Path(os.environ.get("FEDSEA_PEERS") or Path.home() / ".cache/fedsea/peers"))
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--rounds", type=int, default=2, help="requests each client sends in a row (the 1-client level sends at least 4)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="compute threads of every server (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=RESULTS / "vs_peers.json", help="JSON (and PNG beside it) to write")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every server this many times, taking turns, and report each number's median")
    ap.add_argument("--only", nargs="+", choices=[*SERVERS, BASELINE, "transformers"], help="run only these")
    ap.add_argument("--busy", type=int, default=0, metavar="N",
                    help="run N busy-loop processes at normal priority throughout (the contention check: "
                         "does batching still pay when the cores are shared?)")
    ap.add_argument("--baseline", type=Path, help="a checkout of another fedsea commit (git worktree add DIR REV): "
                                                 f"its `fedsea serve` runs too, as {BASELINE!r}, taking turns with this one")
    ap.add_argument("--weights", nargs="+", default=["float32"], choices=list(GGUF_TYPES),
                    help="fedsea's --weights formats, each against llama.cpp at the same bits (vLLM and --baseline: "
                         "float32 only; default: %(default)s)")
    args = ap.parse_args()
    if args.max_tokens < 2 or args.rounds < 1 or args.repeat < 1 or any(c < 1 for c in args.clients):
        ap.error("--max-tokens must be >= 2, --rounds, --repeat and --clients >= 1")
    RESULTS.mkdir(exist_ok=True)
    kinds = dict(SERVERS)
    if args.baseline:
        rev = subprocess.run(["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip() or str(args.baseline)
        LABELS[BASELINE] = f"fedsea serve at {rev}"
        kinds[BASELINE] = lambda peers, threads, weights: fedsea_server(peers, threads, args.baseline.resolve(), BASELINE)
    chosen = args.only or [*kinds, "transformers"]
    servers = {variant(kind, w): functools.partial(start, weights=w) for w in args.weights for kind, start in kinds.items()
               if kind in chosen and (w == "float32" or kind in ("fedsea", "llamacpp"))}
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    load_before = os.getloadavg()

    results: dict = {}
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeat):  # servers take turns, so a slow spell of the machine hits them all
        for name, start in servers.items():
            if isinstance(results.get(name), str):
                continue
            print(f"\n{label(name)}" + (f", run {repeat + 1} of {args.repeat}" if args.repeat > 1 else ""), flush=True)
            server = start(args.peers_dir, args.threads)
            if isinstance(server, str):
                print(f"  skipped: {server}")
                results[name] = f"skipped: {server}"
                continue
            t0 = time.perf_counter()
            with server as (url, pid):
                print(f"  up in {time.perf_counter() - t0:.0f} s at {url}", flush=True)
                runs.setdefault(name, []).append(asyncio.run(bench_server(url, pid, args.clients, args.rounds, args.max_tokens)))
    results.update({name: median_levels(r) for name, r in runs.items()})

    hf = None
    if "transformers" in chosen:
        torch.set_num_threads(args.threads)
        hf_runs = transformers_phase(args.max_tokens)
        ttft = sum(r["ttft_s"] for r in hf_runs) / len(hf_runs)
        # Whole-request rate, comparable with the servers' 1-client aggregate.
        seconds = sum(r["ttft_s"] + (r["tokens"] - 1) / r["decode_tok_s"] for r in hf_runs if r["decode_tok_s"])
        hf = {"tok_s": sum(r["tokens"] for r in hf_runs) / seconds, "mean_ttft_s": ttft, "runs": hf_runs}
    load_after = os.getloadavg()
    for hog in hogs:
        hog.kill()
    roofline = memory_roofline(args.threads, args.weights)

    levels = args.clients
    print(f"\nSmolLM2-135M-Instruct, {args.max_tokens}-token greedy chat answers, {args.threads} threads each; "
          + (f"{args.busy} busy-loop processes beside them; " if args.busy else "")
          + f"machine shared with other jobs (load average {load_before[0]:.1f} before, {load_after[0]:.1f} after)"
          + (f"; medians of {args.repeat} runs each, taking turns" if args.repeat > 1 else ""))
    head = "".join(f"{f'{c} cl tok/s':>12}{'TTFT s':>8}" for c in levels)
    print(f"{'server':40}{head}{'idle@8':>8}{'RSS MiB':>9}")
    for name in servers:
        res = results.get(name)
        if isinstance(res, dict):
            cells = "".join(f"{res[str(c)]['tok_s']:12.1f}{res[str(c)]['mean_ttft_s']:8.3f}" for c in levels)
            idle = f"{res['8']['cpu_idle_pct']:7.0f}%" if "8" in res else " " * 8
            print(f"{label(name):40}{cells}{idle}{res[str(levels[-1])]['rss_mib']:9.0f}")
        elif res:
            print(f"{label(name):40}{res}")
    if hf:
        print(f"{LABELS['transformers']:40}{hf['tok_s']:12.1f}{hf['mean_ttft_s']:8.3f}")
    print(f"memory read {roofline['read_gb_s']:.1f} GB/s / {roofline['model_fp32_bytes'] / 1e6:.0f} MB fp32: "
          "single-stream roofline " + ", ".join(f"{w} {t:.1f} tok/s" for w, t in roofline["tok_s_by_format"].items()))
    rs = ratios(results, levels)
    for pair, per in rs.items():
        cells = ", ".join(f"{c} cl {v['tok_s']:.2f}x tok/s, {v['ttft']:.2f}x TTFT" for c, v in per.items())
        print(f"{pair}: {cells}")
    for name in servers:
        res = results.get(name)
        if isinstance(res, dict) and "1" in res and len(levels) > 1:
            print(f"{label(name)}: " + ", ".join(f"{c} clients {res[str(c)]['tok_s'] / res['1']['tok_s']:.2f}x one client"
                                                 for c in levels if c != 1))
        if isinstance(res, dict) and "1" in res and name.startswith("fedsea"):
            bound = roofline["tok_s_by_format"].get(weights_of(name))
            if bound:
                print(f"{label(name)} single stream: {100 * res['1']['tok_s'] / bound:.0f}% of its roofline")

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "shared": True,
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "settings": {"model": defaults.MODEL, "weights": args.weights, "kv_tokens": SLOTS * SLOT_TOKENS,
                     "fedsea_kv_cache_bytes": {w: kv_cache_bytes(w) for w in args.weights}, "max_tokens": args.max_tokens, "clients": levels,
                     "rounds": args.rounds, "threads": args.threads, "head": defaults.HEAD, "tail": defaults.TAIL,
                     "noise": defaults.NOISE, "repeat": args.repeat, "busy": args.busy},
        "servers": results, "runs": runs, "transformers": hf, "roofline": roofline, "fedsea_ratios": rs,
    }
    out = args.out
    out.write_text(json.dumps(result, indent=2))
    if any(isinstance(results.get(s), dict) for s in servers) and hf:
        plot(results, hf, roofline, levels, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

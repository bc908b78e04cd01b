"""Where one generated token's time goes inside `fedsea serve`, single stream and at 8 clients.

Starts `fedsea serve` with its defaults (as benchmarks/vs_peers.py does), drives the same
streaming workload, and meanwhile
- samples every Python thread with py-spy twice at once: on-CPU stacks (pausing the process
  for each sample, so stacks are consistent) and, --nonblocking, the stacks holding the GIL;
- reads each OS thread's CPU time from /proc/PID/task (py-spy names the Python threads by
  their native ids; the rest are torch's OpenMP workers and other native threads);
- reads the whole machine's idle share from /proc/stat.
Samples are put in buckets by the innermost frame that names a known piece (attention, MLP,
LM head, sampling, websocket, protocol, HTTP, event loop, ...), per thread, and reported as
milliseconds per generated token.

    pip install py-spy            # not a project dependency
    python benchmarks/profile_serve.py [--clients 1 8] [--rate 100]

Writes benchmarks/results/profile_serve.json; the raw py-spy files stay in /tmp/fedsea_vs_peers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.vs_peers import LOGS, RESULTS, _cpu_times, bench_server, fedsea_server  # noqa: E402

# (bucket, substrings of a frame "function (file:line)"), tried from the innermost frame out.
BUCKETS = [
    ("sampling", ("edge_runtime/sampling.py",)),
    ("LM head + final norm", ("ModelShard.logits",)),
    ("embedding", ("ModelShard.embed",)),
    ("attention (SDPA)", ("causal_attention", "decode_attention")),
    ("KV cache gather/write", ("server_runtime/paged_attention.py", "server_runtime/decode_graphs.py", "SequenceCache.extend")),
    ("MLP", ("MLP.forward",)),
    ("q/k/v/o proj + rotary", ("SelfAttention.forward", "rotate (fedsea_shared")),
    ("RMSNorm", ("RMSNorm.forward",)),
    ("rotary tables", ("rotary_tables", "LlamaRotaryEmbedding", "dynamic_rope_update")),
    ("scheduler + KV bookkeeping", ("server_runtime/scheduler.py", "server_runtime/kv_pool.py")),
    ("model runner (batch assembly)", ("server_runtime/model_runner.py",)),
    ("cross-thread hand-off (call_soon_threadsafe)", ("call_soon_threadsafe", "_write_to_self")),
    ("engine loop", ("server_runtime/engine.py",)),
    ("edge batching (EdgeModel/Worker)", ("edge_runtime/model.py",)),
    ("protocol encode/decode + noise", ("fedsea_shared/protocol.py", "fedsea_shared/noise.py")),
    ("websocket", ("websockets/",)),
    ("server connection handling", ("server_runtime/app.py", "edge_runtime/connection.py", "edge_runtime/session.py")),
    ("detokenize + stop strings", ("edge_runtime/text.py", "tokenizers")),
    ("edge decode loop", ("edge_runtime/client.py",)),
    ("HTTP / SSE gateway", ("gateway/", "fastapi/", "starlette/", "uvicorn/", "h11/", "httptools", "pydantic", "sse_starlette")),
    ("asyncio callbacks", ("asyncio/",)),
    ("thread pool / waiting", ("concurrent/futures/", "threading.py", "queue.py")),
]
# The innermost frame inside the loop's own _run_once or select() is the epoll wait: py-spy
# counts it whenever the thread is runnable, which on a loaded machine includes waiting for a core.
SELECT = ("BaseEventLoop._run_once", "EpollSelector.select")
WAITING = {"event loop select() (waiting or runnable)", "thread pool / waiting"}


def bucket(frames: list[str]) -> str:
    if frames and frames[-1].startswith(SELECT):
        return "event loop select() (waiting or runnable)"
    for frame in reversed(frames):
        for name, keys in BUCKETS:
            if any(k in frame for k in keys):
                return name
    return "other Python"


THREAD = re.compile(r"thread \((\d+)\)(?:: (.*))?")


def parse_raw(path: Path) -> dict[tuple[int, str], dict[str, int]]:
    """py-spy raw (-t) lines 'thread (TID): NAME;frame;...;frame COUNT' -> {(tid, name): {bucket: samples}}."""
    out: dict = defaultdict(lambda: defaultdict(int))
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, *frames = stack.split(";")
        m = THREAD.fullmatch(thread)
        out[(int(m[1]), m[2] or "unnamed")][bucket(frames)] += int(count)
    return out


def task_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each OS thread of `pid`."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


async def _load(url: str, clients: int, rounds: int, max_tokens: int) -> dict:
    return (await bench_server(url, [clients], rounds, max_tokens))[str(clients)]


def profile_level(url: str, pid: int, clients: int, rounds: int, max_tokens: int, rate: int) -> dict:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    files = {mode: LOGS / f"pyspy_{clients}clients_{mode}.txt" for mode in ("cpu", "gil")}
    procs = [subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--threads",
                               "--output", str(files[mode]), *(["--gil", "--nonblocking"] if mode == "gil" else [])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for mode in files]
    time.sleep(2)  # let py-spy attach
    cpu0, (idle0, total0) = task_cpu(pid), _cpu_times()
    t0 = time.perf_counter()
    level = asyncio.run(_load(url, clients, rounds, max_tokens))
    wall = time.perf_counter() - t0
    cpu1, (idle1, total1) = task_cpu(pid), _cpu_times()
    for p in procs:
        p.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        p.wait(timeout=60)
    samples = {mode: parse_raw(f) for mode, f in files.items()}
    tokens = level["tokens"]
    ms_per_token = 1000 / rate / tokens  # one sample of one thread, in ms per generated token
    threads = {}
    for (tid, name), buckets in samples["cpu"].items():
        gil = sum(samples["gil"].get((tid, name), {}).values())
        # A thread id reused after its thread ended would read negative: count it from zero.
        cpu_ms = 1000 * max(cpu1.get(tid, 0) - cpu0.get(tid, 0), 0) / tokens
        working = sum(n for b, n in buckets.items() if b not in WAITING)
        threads[f"{name} ({tid})"] = {
            "cpu_ms_per_token_proc": cpu_ms,
            "sampled_on_cpu_ms_per_token": sum(buckets.values()) * ms_per_token,
            "gil_held_ms_per_token": gil * ms_per_token,
            "buckets_ms_per_token": {b: n * ms_per_token for b, n in sorted(buckets.items(), key=lambda kv: -kv[1])},
            # The thread's measured CPU time split in the proportions of its non-waiting samples
            # (samples alone overcount on a loaded machine: a runnable thread waiting for a core
            # is sampled as if it ran).
            "est_cpu_ms_per_token": {b: cpu_ms * n / working for b, n in sorted(buckets.items(), key=lambda kv: -kv[1])
                                     if b not in WAITING and working},
        }
    python_tids = {tid for tid, _ in samples["cpu"]}
    native = sum(cpu1[t] - cpu0.get(t, 0) for t in cpu1 if t not in python_tids)
    return {
        "clients": clients, "tokens": tokens, "wall_s": wall, "tok_s": level["tok_s"], "mean_ttft_s": level["mean_ttft_s"],
        "wall_ms_per_token": 1000 * wall / tokens,
        "process_cpu_ms_per_token": 1000 * sum(cpu1[t] - cpu0.get(t, 0) for t in cpu1) / tokens,
        "native_threads_cpu_ms_per_token": 1000 * native / tokens,
        "machine_idle_pct": 100 * (idle1 - idle0) / max(total1 - total0, 1),
        "loadavg": os.getloadavg(), "threads": threads,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    levels = []
    with fedsea_server(Path(), args.threads) as (url, pid):
        for c in args.clients:
            levels.append(profile_level(url, pid, c, args.rounds, args.max_tokens, args.rate))
    for lv in levels:
        print(f"\n{lv['clients']} client(s): {lv['tok_s']:.1f} tok/s, {lv['wall_ms_per_token']:.1f} ms wall per token, "
              f"process CPU {lv['process_cpu_ms_per_token']:.1f} ms/token (native threads {lv['native_threads_cpu_ms_per_token']:.1f}), "
              f"machine idle {lv['machine_idle_pct']:.0f}%, load average {lv['loadavg'][0]:.1f} (shared machine)")
        for name, t in sorted(lv["threads"].items(), key=lambda kv: -kv[1]["sampled_on_cpu_ms_per_token"]):
            print(f"  {name:28} CPU {t['cpu_ms_per_token_proc']:6.1f} ms/token (sampled {t['sampled_on_cpu_ms_per_token']:6.1f}), "
                  f"GIL held {t['gil_held_ms_per_token']:6.1f}")
            for b, ms in t["buckets_ms_per_token"].items():
                if ms >= 0.05 * max(t["sampled_on_cpu_ms_per_token"], 1e-9):
                    est = t["est_cpu_ms_per_token"].get(b)
                    print(f"      {b:44}sampled {ms:7.1f}" + (f"   est. CPU {est:6.1f}" if est is not None else ""))
    out = RESULTS / "profile_serve.json"
    out.write_text(json.dumps({"settings": vars(args), "levels": levels}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

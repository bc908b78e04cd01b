"""Attention backends of the server runtime, torch against vllm, on one machine in one run.

For each backend (and vLLM's kernels at block size 16 and 32: 32 selects its `vec` ISA,
16 its `vec16`): per-layer attention time (`attend`: K/V write + attention, metadata built
once beforehand), the per-tick `build` time, and the whole tick through the middle blocks
(`ModelRunner.run`), for decode batches of 1/8/16 sessions at a few context lengths,
prefill chunks, and a mixed tick (decode rows beside a prefill chunk).  SmolLM2-135M's
shape (9 heads, 3 KV heads, head_dim 64, the middle 26 of 30 blocks), random weights,
fp32; contexts are random K/V written straight into the pool (no prefill forward).

Run it under the venv that has vllm (benchmarks/setup_vllm.sh); without vllm only the
torch rows are measured:

    PYTHONPATH=$PWD ~/.cache/fedsea/peers/vllm-venv/bin/python benchmarks/attention_backends.py

`--serve ROUNDS` instead measures `fedsea serve` end to end with each backend (1 and 8
streaming clients, 48-token answers, vs_peers.py's client; the backends alternate for
ROUNDS rounds), writing benchmarks/results/attention_backends_serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import json
import time
from concurrent.futures import Future
from pathlib import Path

import torch
from transformers import LlamaConfig

from fedsea_shared.shard import ModelShard, head_dim
from server_runtime.attention_backends import pool_layer_shape
from server_runtime.kv_pool import BlockTable, KVPool
from server_runtime.model_runner import ModelRunner
from server_runtime.scheduler import Chunk, Session, StepWork
from server_runtime.tick_plan import TickPlan

RESULTS = Path(__file__).parent / "results"
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
               num_hidden_layers=30, vocab_size=49152, max_position_embeddings=8192)
MIDDLE = range(2, 28)


def timed(fn, steps: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


class Bench:
    def __init__(self, shard: ModelShard, backend: str, block_size: int, max_tokens: int):
        cfg = shard.config
        self.kv, self.d, self.heads = cfg.num_key_value_heads, head_dim(cfg), cfg.num_attention_heads
        blocks = max_tokens // block_size + 64
        shape = pool_layer_shape(backend, blocks + 1, block_size, self.kv, self.d, torch.device("cpu"))
        self.pool = KVPool(len(MIDDLE), blocks, block_size, self.kv, self.d, torch.float32, "cpu", shape)
        self.pool.k.normal_()
        self.pool.v.normal_()
        self.runner = ModelRunner(shard, MIDDLE, self.pool, attention_backend=backend)
        self.hidden = cfg.hidden_size

    def chunks(self, sequences: list[tuple[int, int]]) -> list[Chunk]:
        """One chunk per (context before, new tokens); the tables are grown, never advanced,
        so every repetition computes the same tick."""
        out = []
        for i, (before, new) in enumerate(sequences):
            table = BlockTable(self.pool.block_size)
            self.pool.grow(table, before + new)
            table.num_tokens = before
            out.append(Chunk(StepWork(Session(i, table), torch.randn(new, self.hidden), before, Future()), 0, new))
        return out

    def measure(self, sequences: list[tuple[int, int]], steps: int) -> dict[str, float]:
        chunks = self.chunks(sequences)
        plan = TickPlan.from_chunks(chunks, self.pool.block_size)
        backend = self.runner.backend
        tokens = plan.query_start[-1]
        q = torch.randn(tokens, self.heads, self.d)
        k, v = torch.randn(tokens, self.kv, self.d), torch.randn(tokens, self.kv, self.d)
        metadata = backend.build(plan)
        with torch.inference_mode():
            result = {
                "build_ms": 1e3 * timed(lambda: backend.build(plan), steps * 10),
                "attend_ms": 1e3 * timed(lambda: backend.attend(0, q, k, v, metadata), steps * 10),
                "tick_ms": 1e3 * timed(lambda: self.runner.run(chunks), steps),
            }
        for c in chunks:
            self.pool.free(c.session.table)
        return result


def cases(contexts: list[int], batches: list[int]) -> list[tuple[str, list[tuple[int, int]], int]]:
    out = [(f"decode b={b} ctx={n}", [(n - 1, 1)] * b, 4) for n in contexts for b in batches]
    out += [("prefill 256 (ctx 0)", [(0, 256)], 2), ("prefill 256 (ctx 768)", [(768, 256)], 2),
            ("mixed: 8 decode @512 + prefill 128", [(511, 1)] * 8 + [(0, 128)], 3)]
    return out


def serve(rounds: int, threads: int, out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.vs_peers import _process, bench_server
    from server_runtime.process import free_port

    results: dict[str, list] = {}
    for _ in range(rounds):
        for backend in ("torch", "vllm"):
            port = free_port()
            cmd = [sys.executable, "-m", "fedsea.cli", "serve", "--port", str(port), "--attention-backend", backend]
            print(f"fedsea serve --attention-backend {backend}", flush=True)
            env = {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
            with _process("fedsea", cmd, port, "/health", env=env) as (url, _):
                results.setdefault(backend, []).append(asyncio.run(bench_server(url, [1, 8], 1, 48)))
    for c in ("1", "8"):
        mean = {b: sum(r[c]["tok_s"] for r in runs) / len(runs) for b, runs in results.items()}
        print(f"{c} client(s): torch {mean['torch']:.1f} tok/s, vllm {mean['vllm']:.1f} tok/s, "
              f"vllm / torch {mean['vllm'] / mean['torch']:.2f}")
    out.write_text(json.dumps({"threads": threads, "rounds": rounds, "results": results}, indent=2))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the best is kept")
    ap.add_argument("--out", type=Path, default=RESULTS / "attention_backends.json")
    ap.add_argument("--serve", type=int, default=0, metavar="ROUNDS", help="measure fedsea serve end to end instead")
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve, args.threads, RESULTS / "attention_backends_serve.json")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shard = ModelShard(LlamaConfig(**SMOLLM2), list(MIDDLE), with_edge_parts=False).eval()
    configs = [("torch", 16)]
    if importlib.util.find_spec("vllm") is not None:
        configs += [("vllm", 16), ("vllm", 32)]
    else:
        print("vllm is not installed: torch rows only")
    todo = cases(args.contexts, args.batches)
    max_tokens = max(sum(b + n for b, n in seqs) for _, seqs, _ in todo)
    benches = {f"{backend} (block {block})": Bench(shard, backend, block, max_tokens) for backend, block in configs}
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for case, seqs, steps in todo:
        # Backends interleaved, best of --rounds: on a loaded machine, other jobs' bursts
        # then hit every backend alike and the ratios hold better than absolute times.
        for _ in range(args.rounds):
            for name, bench in benches.items():
                got = bench.measure(seqs, steps)
                best = rows.setdefault(case, {}).setdefault(name, got)
                rows[case][name] = {k: min(v, best[k]) for k, v in got.items()}
        for name in benches:
            print(f"{name:18s} {case:36s} " + "  ".join(f"{k} {v:8.3f}" for k, v in rows[case][name].items()), flush=True)
    names = [f"{b} (block {p})" for b, p in configs]
    print(f"\n{'case':36s}" + "".join(f"{n + ' attend/tick ms':>34s}" for n in names)
          + ("".join(f"{'tick ' + n + ' / torch':>28s}" for n in names[1:])))
    for case, by in rows.items():
        line = f"{case:36s}" + "".join(f"{by[n]['attend_ms']:>20.3f} / {by[n]['tick_ms']:>9.2f}" + " " * 2 for n in names)
        base = by[names[0]]["tick_ms"]
        line += "".join(f"{by[n]['tick_ms'] / base:>28.2f}" for n in names[1:])
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "shape": "smollm2-135m middle 26 blocks, fp32, random weights", "threads": args.threads, "rounds": args.rounds,
        "configs": names, "results": rows,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

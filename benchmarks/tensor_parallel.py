"""Tensor-parallel middle blocks on one machine: what splitting a tick over ranks costs.

1. Tick time, all-reduce share and bytes per tick at decode batches of 1, 8 and 16 rows,
   for 1 vs 2 vs 3 gloo ranks on this host (`fedsea server --tensor-parallel N`'s
   executor, driven through the engine): SmolLM2-135M's shape with 12 heads / 6 KV heads
   (so that 2 and 3 both divide them), random weights, fp32, the middle 26 blocks, each
   session at a 64-token context.  On a machine with fewer cores than ranks need this is a
   cost measurement (all-reduce and broadcast overhead), not a speed claim.
2. How a tick's plan travels: the packed form the executor sends (a header, one int64
   tensor, the rows) against `broadcast_object_list` of the plan (pickled), 2 ranks,
   16 sessions at 512 tokens of context.
3. `--default-model`: the real default model (9 heads, 3 KV heads, the packaged Q4_1 GGUF
   read as int4 slices) on 3 ranks against 1: greedy tokens equal, and a single client's
   tokens/s.

    PYTHONPATH=$PWD python benchmarks/tensor_parallel.py [--default-model]

Prints a table and writes benchmarks/results/tensor_parallel.json.  Not measured here:
NCCL on several GPUs (no such machine was lent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig

from server_runtime.app import ServerSettings, ServerThread
from server_runtime.engine import EngineSettings
from server_runtime.tick_plan import TickPlan

RESULTS = Path(__file__).parent / "results"
SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=12, num_key_value_heads=6, head_dim=48,
             num_hidden_layers=30, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)
CONTEXT = 64


def random_model(path: Path) -> Path:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE)).save_pretrained(path, safe_serialization=True)
    return path


def ticks(model: Path, ranks: int, batches: list[int], steps: int) -> dict:
    server = ServerThread(ServerSettings(model=str(model), port=0, tensor_parallel=ranks, kv_cache_memory="128MiB",
                                         kv_quota=1.0, engine=EngineSettings()))
    try:
        engine, executor = server.runtime.engine, server.runtime.executor
        timed: list[tuple[float, object]] = []
        real = executor.execute

        def execute(plan):
            t0 = time.perf_counter()
            out = real(plan)
            timed.append((time.perf_counter() - t0, getattr(executor, "last_tick", None)))
            return out

        executor.execute = execute
        hidden = SHAPE["hidden_size"]
        keys = [("bench", i) for i in range(max(batches))]
        for key in keys:
            engine.open(key).result(60)
            engine.step(key, 0, torch.randn(CONTEXT, hidden)).result(60)
        pos = dict.fromkeys(keys, CONTEXT)
        out = {}
        for rows in batches:
            timed.clear()
            for _ in range(steps + 1):  # the first is a warm-up
                futures = engine.step_many([(k, pos[k], torch.randn(1, hidden)) for k in keys[:rows]])
                for f in futures:
                    f.result(60)
                for k in keys[:rows]:
                    pos[k] += 1
            runs = timed[1:]
            tick = statistics.median(t for t, _ in runs)
            traffic = [x for _, x in runs if x is not None]
            reduce = statistics.median(x.allreduce_seconds for x in traffic) if traffic else 0.0
            out[rows] = {
                "tick_ms": 1e3 * tick, "allreduce_ms": 1e3 * reduce, "allreduce_share": reduce / tick,
                "broadcast_ms": 1e3 * statistics.median(x.broadcast_seconds for x in traffic) if traffic else 0.0,
                "allreduce_bytes": traffic[0].allreduce_bytes if traffic else 0,
                "broadcast_bytes": traffic[0].broadcast_bytes if traffic else 0,
            }
        return out
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plan(sessions: int, context: int, block: int = 16) -> TickPlan:
    blocks = -(-context // block)
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(sessions)]
    return TickPlan.build(block, list(range(sessions + 1)), [context] * sessions, tables,
                          torch.randn(sessions, SHAPE["hidden_size"]), [])


def _receive(port: int, iterations: int, sessions: int, context: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2)
    for _ in range(iterations):  # packed
        header = torch.zeros(3, dtype=torch.long)
        dist.broadcast(header, 0)
        packed = torch.empty(int(header[1]), dtype=torch.long)
        dist.broadcast(packed, 0)
        rows = torch.empty(int(header[2]), SHAPE["hidden_size"])
        dist.broadcast(rows, 0)
        TickPlan.unpack(packed, 16, rows)
        dist.barrier()
    for _ in range(iterations):  # pickled
        box = [None]
        dist.broadcast_object_list(box, 0)
        dist.barrier()
    for _ in range(iterations):  # nothing: the barrier alone
        dist.barrier()
    dist.destroy_process_group()


def plan_transfer(iterations: int = 200, sessions: int = 16, context: int = 512) -> dict:
    port = _free_port()
    peer = mp.get_context("spawn").Process(target=_receive, args=(port, iterations, sessions, context))
    peer.start()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
    plan = _plan(sessions, context)
    times = {"packed": [], "pickled": [], "barrier": []}
    for mode in times:
        for _ in range(iterations):
            t0 = time.perf_counter()
            if mode == "packed":
                packed = plan.pack()
                dist.broadcast(torch.tensor([2, packed.numel(), plan.hidden.shape[0]]), 0)
                dist.broadcast(packed, 0)
                dist.broadcast(plan.hidden, 0)
            elif mode == "pickled":
                dist.broadcast_object_list([plan], 0)
            dist.barrier()
            times[mode].append(time.perf_counter() - t0)
    dist.destroy_process_group()
    peer.join()
    barrier = statistics.median(times["barrier"])
    return {mode: 1e6 * (statistics.median(t) - barrier) for mode, t in times.items() if mode != "barrier"}


async def _greedy(url: str, model: str, prompts: list[str], tokens: int) -> tuple[list[list[int]], float]:
    from edge_runtime import AsyncEdgeClient

    client = AsyncEdgeClient(url, model=model, noise=0.0)
    out, generated, t0 = [], 0, time.perf_counter()
    for p in prompts:
        got = await client.generate([{"role": "user", "content": p}], max_tokens=tokens, temperature=0)
        out.append(got.token_ids)
        generated += len(got.token_ids)
    seconds = time.perf_counter() - t0
    await client.aclose()
    return out, generated / seconds


def default_model(ranks: list[int], tokens: int = 32) -> dict:
    from fedsea_shared.models import DEFAULT_MODEL, resolve_model

    model = str(resolve_model(DEFAULT_MODEL))
    prompts = ["Write a short story about a robot who learns to paint.", "Explain how photosynthesis works."]
    out = {}
    for n in ranks:
        server = ServerThread(ServerSettings(model=model, port=0, tensor_parallel=n, kv_cache_memory="64MiB"))
        try:
            ids, tok_s = asyncio.run(_greedy(server.url, model, prompts, tokens))
        finally:
            server.stop()
        out[n] = {"token_ids": ids, "tok_s": tok_s}
    base = out[ranks[0]]["token_ids"]
    for n in ranks:
        out[n]["greedy_equal_to_1_rank"] = out[n]["token_ids"] == base
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--steps", type=int, default=30, help="ticks measured per batch size (median)")
    ap.add_argument("--default-model", action="store_true", help="also run the default model on 1 and 3 ranks")
    ap.add_argument("--out", type=Path, default=RESULTS / "tensor_parallel.json")
    args = ap.parse_args()
    result = {"machine": f"{os.cpu_count()} cores, torch {torch.__version__}, gloo on 127.0.0.1",
              "shape": "SmolLM2-135M's with 12 heads / 6 KV heads (head_dim 48), middle 26 blocks, fp32, random",
              "gpu": "unmeasured (no GPU machine with several GPUs was lent: NCCL not measured)"}
    with tempfile.TemporaryDirectory() as tmp:
        model = random_model(Path(tmp))
        result["ticks"] = {n: ticks(model, n, args.rows, args.steps) for n in args.ranks}
    print(f"\n{'ranks':>5} {'rows':>5} {'tick ms':>9} {'vs 1 rank':>9} {'all-reduce ms':>14} {'share':>6} "
          f"{'broadcast ms':>13} {'all-reduce B':>13} {'broadcast B':>12}")
    for n, by_rows in result["ticks"].items():
        for rows, r in by_rows.items():
            base = result["ticks"][args.ranks[0]][rows]["tick_ms"]
            print(f"{n:>5} {rows:>5} {r['tick_ms']:>9.2f} {r['tick_ms'] / base:>9.2f} {r['allreduce_ms']:>14.2f} "
                  f"{r['allreduce_share']:>6.0%} {r['broadcast_ms']:>13.3f} {r['allreduce_bytes']:>13} "
                  f"{r['broadcast_bytes']:>12}")
    result["plan_transfer_us"] = plan_transfer()
    print("plan of 16 sessions at 512 tokens to 1 peer (median us beyond a barrier): "
          + ", ".join(f"{k} {v:.0f}" for k, v in result["plan_transfer_us"].items()))
    if args.default_model:
        result["default_model"] = default_model([1, 3])
        for n, r in result["default_model"].items():
            print(f"default model, {n} rank(s): {r['tok_s']:.1f} tok/s (1 client), greedy equal to 1 rank: "
                  f"{r['greedy_equal_to_1_rank']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Decode step time of the server runtime's middle blocks against the memory roofline and
Hugging Face eager decode of the same blocks, measured in one run.

Default shape: Llama-2-7B (hidden 4096, 32 heads, 11008 MLP), the middle 28 of 32 blocks,
random weights, context 512, batches 1/8/32/64 (issue 3's GPU acceptance).  Roofline for
a batch: (middle-block weight bytes + the batch's KV bytes read per step) / measured copy
bandwidth.  The engine runs in each decode configuration: `gather` (contexts copied out
of the pool, then SDPA), `flex` (FlexAttention reading the pool in place) and
`flex+graphs` (decode ticks replayed as CUDA graphs; on a CPU the same static path runs
uncaptured).  `--shape tiny` runs anywhere in seconds (CPU smoke test).

    python benchmarks/gpu_decode.py --device cuda --dtype bfloat16                 # on an H100
    python benchmarks/gpu_decode.py --device cpu --dtype float32 --shape smollm2   # this machine
    python benchmarks/gpu_decode.py --device cpu --shape tiny                      # anywhere
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import Future
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaModel

from fedsea_shared.shard import ModelShard, head_dim
from server_runtime.kv_pool import BlockTable, KVPool
from server_runtime.model_runner import ModelRunner
from server_runtime.scheduler import Chunk, Session, StepWork

RESULTS = Path(__file__).parent / "results"

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1000, max_position_embeddings=4096)
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
               vocab_size=49152, max_position_embeddings=8192)
SHAPES = {"llama-2-7b": (LLAMA2_7B, 32), "smollm2": (SMOLLM2, 30), "tiny": (TINY, 32)}
MODES = {"gather": dict(decode_attention="gather"), "flex": dict(decode_attention="flex"),
         "flex+graphs": dict(decode_attention="flex", decode_graphs=True)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, steps: int) -> float:
    """Mean seconds per call after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, 10)  # read + write


def random_shard(config, layers, dtype, device) -> ModelShard:
    with torch.device("meta"):
        shard = ModelShard(config, list(layers), with_edge_parts=False)
    shard = shard.to_empty(device=device).to(dtype)
    for p in shard.parameters():
        torch.nn.init.normal_(p, std=0.02)
    with torch.device(device):
        shard.rotary = type(shard.rotary)(config)
    return shard.eval().requires_grad_(False)


def fedsea_steps(shard, layers, dtype, device, batches, context, steps, mode, block) -> dict[int, float]:
    """Seconds per decode tick of `batch` sessions holding `context` tokens each, for each
    batch size.  One pool, sized for the largest batch, serves them all, as on a server:
    each padded batch size compiles (and, with graphs, captures at start-up) once."""
    config = shard.config
    reserve = context + steps + 4
    pool = KVPool(len(layers), max(batches) * -(-reserve // block), block, config.num_key_value_heads,
                  head_dim(config), dtype, device)
    pool.k.normal_()
    pool.v.normal_()
    runner = ModelRunner(shard, layers, pool, device, **MODES[mode], max_graph_batch=max(batches),
                         max_context=reserve)
    hidden = torch.randn(1, config.hidden_size, dtype=dtype, device=device)
    seconds = {}
    for batch in batches:
        sessions = []
        for i in range(batch):
            table = BlockTable(block)
            pool.grow(table, reserve)
            table.num_tokens = context
            sessions.append(Session(i, table))

        def tick():
            # Same context every tick: the KV read per step stays `context` tokens per session.
            runner.run([Chunk(StepWork(s, hidden, context, Future()), 0, 1) for s in sessions])

        seconds[batch] = timed(tick, device, steps)
        for s in sessions:
            pool.free(s.table)
    del runner, pool
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def hf_step(config, num_layers, dtype, device, batch, context, steps) -> float:
    cfg = LlamaConfig(**{**config.to_dict(), "num_hidden_layers": num_layers})
    cfg._attn_implementation = "sdpa"
    with torch.device(device):  # initialise on the device: a 7B shape is slow to build on the CPU
        model = LlamaModel(cfg).to(dtype).eval()
    with torch.inference_mode():
        cache = DynamicCache(config=cfg)
        prompt = torch.randn(batch, context, cfg.hidden_size, dtype=dtype, device=device)
        model(inputs_embeds=prompt, cache=cache, use_cache=True)
        x = torch.randn(batch, 1, cfg.hidden_size, dtype=dtype, device=device)

        def step():
            model(inputs_embeds=x, cache=cache, use_cache=True)
            cache.crop(-1)  # drop the new token: the context stays fixed, as on the fedsea side

        seconds = timed(step, device, steps)
    del model, cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--shape", default="llama-2-7b", choices=list(SHAPES))
    p.add_argument("--layers", type=int, help="middle blocks (default: all but 2 + 2)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (the server's --block-size)")
    p.add_argument("--out", default=str(RESULTS / "gpu_decode.json"))
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape, total_layers = SHAPES[args.shape]
    config = LlamaConfig(**shape, num_hidden_layers=total_layers)
    args.layers = args.layers or total_layers - 4
    layers = range(2, 2 + args.layers)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    with torch.device("meta"):
        probe = ModelShard(config, list(layers), with_edge_parts=False)
    weight_bytes = sum(t.numel() for t in probe.parameters()) * itemsize
    kv_per_token = 2 * args.layers * config.num_key_value_heads * head_dim(config) * itemsize
    bandwidth = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**26)
    hf = {b: hf_step(config, args.layers, dtype, device, b, args.context, args.steps) for b in args.batches}
    print(f"HF eager measured: {', '.join(f'{b}: {1e3 * t:.2f} ms' for b, t in hf.items())}", flush=True)
    shard = random_shard(config, layers, dtype, device)
    ours = {}
    for mode in args.modes:
        ours[mode] = fedsea_steps(shard, layers, dtype, device, args.batches, args.context, args.steps, mode,
                                  args.block_size)
        print(f"fedsea {mode} measured: {', '.join(f'{b}: {1e3 * t:.2f} ms' for b, t in ours[mode].items())}",
              flush=True)
    rows = []
    print(f"{'batch':>5} {'mode':<12} {'ms/step':>9} {'tok/s':>9} {'x roofline':>10} {'vs HF eager':>11}")
    for batch in args.batches:
        roofline = (weight_bytes + batch * args.context * kv_per_token) / bandwidth
        row = {"batch": batch, "roofline_ms": 1e3 * roofline, "roofline_tok_s": batch / roofline,
               "hf_eager_ms": 1e3 * hf[batch], "hf_eager_tok_s": batch / hf[batch], "modes": {}}
        for mode in args.modes:
            t = ours[mode][batch]
            row["modes"][mode] = {"ms": 1e3 * t, "tok_s": batch / t, "over_roofline": t / roofline,
                                  "speedup_vs_hf_eager": hf[batch] / t}
        rows.append(row)
        for name, ms in [("roofline", row["roofline_ms"]), ("HF eager", row["hf_eager_ms"]),
                         *[(m, r["ms"]) for m, r in row["modes"].items()]]:
            print(f"{batch:>5} {name:<12} {ms:9.2f} {1e3 * batch / ms:9.0f} {ms / row['roofline_ms']:10.2f} "
                  f"{row['hf_eager_ms'] / ms:10.2f}x", flush=True)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": args.dtype,
              "shape": args.shape, "block_size": args.block_size, "middle_layers": args.layers, "context": args.context,
              "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token,
              "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}
    best = {r["batch"]: min(r["modes"].values(), key=lambda m: m["ms"]) for r in rows}
    if 1 in best:
        print(f"batch 1: best step {best[1]['over_roofline']:.2f}x roofline (target <= 1.3x)")
    if 64 in best:
        print(f"batch 64: best {1 / best[64]['over_roofline']:.0%} of roofline tokens/s (target >= 70%)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    plot(result, Path(args.out).with_suffix(".png"))
    return result


def plot(result: dict, path: Path) -> None:
    """Tokens/s against batch size: each decode mode, HF eager and the roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    batches = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(batches, [r["roofline_tok_s"] for r in rows], "k--", label="memory roofline")
    ax.plot(batches, [r["hf_eager_tok_s"] for r in rows], "o-", label="HF eager")
    for mode in rows[0]["modes"]:
        ax.plot(batches, [r["modes"][mode]["tok_s"] for r in rows], "o-", label=f"fedsea {mode}")
    ax.set(xscale="log", yscale="log", xlabel="sessions per decode step", ylabel="tokens / s",
           title=f"decode, {result['shape']} middle {result['middle_layers']} blocks, context {result['context']}, "
                 f"{result['device']}")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

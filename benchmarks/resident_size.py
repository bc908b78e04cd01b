"""Resident weight size of each side of the split per weight format, the edge's time per
token, and where each process's memory goes.

Per weight format (`--formats`), for the default model and for Llama 3.2 1B / 3B and Llama
3.1 8B shapes (`--shapes`; random bf16 weights written once to a scratch checkpoint holding
the edge's blocks and one middle block): the edge shard (embedding, first and last `head` /
`tail` blocks, final norm, LM head) and one middle block are really loaded in the format,
their bytes counted (the server's: one block's times the middle's block count), and the
edge's forward of one token timed (embedding, its blocks with the token attending to
itself only, norm, LM head: the products, which are nearly all of an edge step).

Then each side is built as `fedsea server` and `fedsea gateway` build it, in a fresh
process: resident memory (/proc/self/smaps_rollup) after importing torch and fedsea, and
after loading (weights, the dense copies of the `mixed` linear kernel, the gateway's packed
LM-head copy, the server's KV pool), beside the byte counts of those tensors.

    python benchmarks/resident_size.py [--head 2 --tail 2] [--kv-cache-memory 64MiB]
        [--shapes default llama3.2-1b llama3.2-3b llama3.1-8b] [--formats float32 bfloat16 int8 int4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.memory_soak import resident_mib  # noqa: E402
from fedsea_shared import defaults  # noqa: E402
from fedsea_shared.models import resolve_model  # noqa: E402
from fedsea_shared.architectures import load_config  # noqa: E402
from fedsea_shared.shard import (ModelShard, Partition, address, causal_attention, edge_layers,  # noqa: E402
                                 head_dim, load_shard, resident_bytes, shard_tensor_names)

RESULTS = Path(__file__).parent / "results"
FORMATS = ("float32", "bfloat16", "int8", "int4")
_LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192})
SHAPES = {  # the published configs' shapes
    "llama3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, tie_word_embeddings=True),
    "llama3.2-3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                        num_attention_heads=24, tie_word_embeddings=True),
    "llama3.1-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, tie_word_embeddings=False, rope_scaling={**_LLAMA3["rope_scaling"], "factor": 8.0}),
}


def shape_checkpoint(name: str, head: int, tail: int, root: Path) -> Path:
    """A checkpoint of the shape `name` with random bf16 weights for the edge's tensors and
    one middle block (layer `head`) only: load_shard reads nothing else."""
    config = LlamaConfig(**SHAPES[name])
    path = root / name
    if (path / "model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    layers = [*edge_layers(Partition(config.num_hidden_layers, head, tail)), head]
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = ModelShard(config, layers, True).state_dict()
    tensors = {n: (torch.randn(shapes[n].shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
               for n in shard_tensor_names(config, layers, True)}
    for n, t in tensors.items():
        if n.endswith("norm.weight"):
            t.fill_(1.0)
    save_file(tensors, str(path / "model.safetensors"))
    config.save_pretrained(path)
    return path


def edge_ms_per_token(edge: ModelShard, layers: list[int], rounds: int = 7) -> float:
    """Median ms of one token through the edge: embedding, its blocks (the token attending
    to itself only), final norm and LM head."""
    scale = head_dim(edge.config) ** -0.5

    def attend(layer, q, k, v):
        return causal_attention(q, k, v, scale)

    def token() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            hidden = edge.embed(torch.tensor([1]))
            hidden = edge.run_blocks(layers, hidden, torch.tensor([0]), attend)
            edge.logits(hidden)
        return (time.perf_counter() - t0) * 1e3

    token()  # first-call costs (kernel choice, packing)
    return statistics.median(token() for _ in range(rounds))


def format_rows(model_dir: Path, label: str, head: int, tail: int, formats: list[str]) -> list[dict]:
    """Per format: the edge's and the server's resident bytes and the edge's ms per token."""
    config = load_config(model_dir)
    part = Partition(config.num_hidden_layers, head, tail)
    rows = []
    for fmt in formats:
        edge = load_shard(model_dir, edge_layers(part), True, weights=fmt)
        block = load_shard(model_dir, [head], False, weights=fmt)
        row = {"model": label, "weights": fmt, "edge_bytes": resident_bytes(edge),
               "server_bytes": resident_bytes(block) * len(part.server_layers),
               "edge_ms_per_token": edge_ms_per_token(edge, edge_layers(part))}
        del edge, block
        print(f"{label:>14} {fmt:>9} {row['edge_bytes'] / 1e6:>9.0f} {row['server_bytes'] / 1e6:>10.0f} "
              f"{row['edge_ms_per_token']:>9.1f}", flush=True)
        rows.append(row)
    return rows


def smaps_mib() -> dict[str, float]:
    """This process's resident memory: all, anonymous (heap, tensors), file-backed (libraries)."""
    rss, anonymous = resident_mib(os.getpid())
    return {"rss": rss, "anonymous": anonymous, "file": rss - anonymous}


def tensor_mib(module: torch.nn.Module, name: str | None = None) -> float:
    """MiB of a module's distinct parameters and buffers; with `name`, of the buffers called
    so that hold memory of their own (not a parameter's: the LM head's dense weight is the
    embedding)."""
    params = {address(t) for t in module.parameters()}
    seen = {}
    for m in module.modules():
        for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if name is None or (n == name and address(t) not in params):
                seen[address(t)] = t.numel() * t.element_size()
    return sum(seen.values()) / 2**20


def side_memory(side: str, kv_cache_memory: str, queue) -> None:
    """Build one side in this (fresh) process; put its memory stages on `queue`."""
    from edge_runtime.client import AsyncEdgeClient
    from gateway.backend import GatewaySettings
    from server_runtime.app import ServerRuntime, ServerSettings

    imported = smaps_mib()
    if side == "server":
        runtime = ServerRuntime(ServerSettings(kv_cache_memory=kv_cache_memory))
        shard, extra = runtime.shard, {"kv_pool": runtime.pool.nbytes / 2**20}
    else:
        g = GatewaySettings()
        client = AsyncEdgeClient(g.edge)  # connects later, on first use
        shard, extra = client.worker.model.shard, {"linear_kernel": client.linear_kernel}
    head = getattr(shard, "lm_head", None)
    lm_head_copy = head.weight.numel() * head.weight.element_size() / 2**20 if head is not None and head.weight.is_mkldnn else 0.0
    queue.put({"imported": imported, "loaded": smaps_mib(), "tensors_mib": tensor_mib(shard),
               "dense_copies_mib": tensor_mib(shard, "few_rows"), "lm_head_copy_mib": lm_head_copy, **extra})
    queue.close()
    queue.join_thread()
    os._exit(0)  # the runtime's threads are not meant to be joined: only the numbers matter


def measured_memory(kv_cache_memory: str) -> dict[str, dict]:
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for side in ("server", "gateway"):
        queue = ctx.Queue()
        proc = ctx.Process(target=side_memory, args=(side, kv_cache_memory, queue))
        proc.start()
        out[side] = queue.get(timeout=600)
        proc.join()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head", type=int, default=defaults.HEAD)
    p.add_argument("--tail", type=int, default=defaults.TAIL)
    p.add_argument("--kv-cache-memory", default="64MiB", help="the server's KV pool (default: %(default)s)")
    p.add_argument("--shapes", nargs="*", default=["default", *SHAPES], choices=["default", *SHAPES])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "fedsea_shapes",
                   help="where the shapes' random checkpoints are written once (8B: 4.3 GB)")
    p.add_argument("--no-processes", action="store_true", help="skip the two processes' memory breakdown")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(f"head={args.head}, tail={args.tail}, {os.cpu_count()} threads")
    print(f"{'model':>14} {'weights':>9} {'edge MB':>9} {'server MB':>10} {'edge ms':>9}")
    rows = []
    for shape in args.shapes:
        model_dir = resolve_model(defaults.MODEL) if shape == "default" else shape_checkpoint(
            shape, args.head, args.tail, args.scratch)
        rows += format_rows(model_dir, "smollm2-135m" if shape == "default" else shape, args.head, args.tail,
                            args.formats)
    RESULTS.mkdir(exist_ok=True)
    result = {"head": args.head, "tail": args.tail, "rows": rows, "kv_cache_memory": args.kv_cache_memory,
              "loadavg": os.getloadavg()}
    if args.no_processes:
        (RESULTS / "resident_size.json").write_text(json.dumps(result, indent=2))
        return
    memory = measured_memory(args.kv_cache_memory)
    print(f"\n{'MiB':>28} {'server':>8} {'gateway':>8}")
    for label, get in (("RSS after imports", lambda m: m["imported"]["rss"]),
                       ("  of it file-backed (libs)", lambda m: m["imported"]["file"]),
                       ("RSS after loading", lambda m: m["loaded"]["rss"]),
                       ("  tensors (weights, copies)", lambda m: m["tensors_mib"]),
                       ("  of them dense copies", lambda m: m["dense_copies_mib"]),
                       ("  of them LM-head copy", lambda m: m["lm_head_copy_mib"]),
                       ("  KV pool", lambda m: m.get("kv_pool", 0.0))):
        print(f"{label:>28} {get(memory['server']):>8.0f} {get(memory['gateway']):>8.0f}")
    print(f"(the gateway's linear kernel: {memory['gateway']['linear_kernel']}, timed at start-up)")
    (RESULTS / "resident_size.json").write_text(json.dumps({**result, "memory_mib": memory}, indent=2))


if __name__ == "__main__":
    main()

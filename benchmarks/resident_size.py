"""Resident weight size of each side of the split, and where each process's memory goes.

Default model: the shards are really loaded (each from the safetensors checkpoint, only
its own tensors) and their parameter bytes counted.  Llama-2-7B shape: shards are built
on the meta device from the architecture alone (no weights needed) and counted at fp16.

Then each side is built as `fedsea server` and `fedsea gateway` build it, in a fresh
process: resident memory (/proc/self/smaps_rollup) after importing torch and fedsea, and
after loading (weights, the dense copies of the `mixed` linear kernel, the gateway's packed
LM-head copy, the server's KV pool), beside the byte counts of those tensors.

    python benchmarks/resident_size.py [--head 2 --tail 2] [--kv-cache-memory 64MiB]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.memory_soak import resident_mib  # noqa: E402
from fedsea_shared import defaults  # noqa: E402
from fedsea_shared.models import resolve_model  # noqa: E402
from fedsea_shared.shard import (ModelShard, Partition, address, edge_layers, load_edge_shard,  # noqa: E402
                                 load_server_shard, resident_bytes)

RESULTS = Path(__file__).parent / "results"

LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)


def meta_bytes(config: LlamaConfig, layers: list[int], edge: bool, itemsize: int) -> int:
    with torch.device("meta"):
        shard = ModelShard(config, layers, edge)
    if edge and config.tie_word_embeddings:
        shard.lm_head.weight = shard.model.embed_tokens.weight
    return sum(p.numel() for p in shard.parameters()) * itemsize  # parameters() dedupes tied weights


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
        client = AsyncEdgeClient(g.server_url, lm_head_copy=g.lm_head_copy)  # connects later, on first use
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
    args = p.parse_args()
    rows = []
    model_dir = resolve_model(defaults.MODEL)
    part = Partition(30, args.head, args.tail)
    edge, server = load_edge_shard(model_dir, part), load_server_shard(model_dir, part)
    total = meta_bytes(edge.config, list(range(30)), True, 4)
    rows.append({"model": "SmolLM2-135M-Instruct (fp32)", "edge_bytes": resident_bytes(edge),
                 "server_bytes": resident_bytes(server), "full_bytes": total})
    part7 = Partition(32, args.head, args.tail)
    rows.append({"model": "Llama-2-7B shape (fp16)",
                 "edge_bytes": meta_bytes(LLAMA2_7B, edge_layers(part7), True, 2),
                 "server_bytes": meta_bytes(LLAMA2_7B, list(part7.server_layers), False, 2),
                 "full_bytes": meta_bytes(LLAMA2_7B, list(range(32)), True, 2)})
    print(f"head={args.head}, tail={args.tail}")
    print(f"{'model':>30} {'edge MB':>9} {'server MB':>10} {'full MB':>9} {'edge share':>11}")
    for r in rows:
        print(f"{r['model']:>30} {r['edge_bytes'] / 1e6:>9.1f} {r['server_bytes'] / 1e6:>10.1f} "
              f"{r['full_bytes'] / 1e6:>9.1f} {r['edge_bytes'] / r['full_bytes']:>10.1%}")
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
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "resident_size.json").write_text(json.dumps({"head": args.head, "tail": args.tail, "rows": rows,
                                                            "kv_cache_memory": args.kv_cache_memory,
                                                            "memory_mib": memory}, indent=2))


if __name__ == "__main__":
    main()

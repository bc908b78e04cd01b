"""Resident weight size of each side of the split.

Default model: the shards are really loaded (each from the safetensors checkpoint, only
its own tensors) and their parameter bytes counted.  Llama-2-7B shape: shards are built
on the meta device from the architecture alone (no weights needed) and counted at fp16.

    python benchmarks/resident_size.py [--head 2 --tail 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import LlamaConfig

from fedsea_shared import defaults
from fedsea_shared.models import resolve_model
from fedsea_shared.shard import ModelShard, Partition, edge_layers, load_edge_shard, load_server_shard, resident_bytes

RESULTS = Path(__file__).parent / "results"

LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)


def meta_bytes(config: LlamaConfig, layers: list[int], edge: bool, itemsize: int) -> int:
    with torch.device("meta"):
        shard = ModelShard(config, layers, edge)
    if edge and config.tie_word_embeddings:
        shard.lm_head.weight = shard.model.embed_tokens.weight
    return sum(p.numel() for p in shard.parameters()) * itemsize  # parameters() dedupes tied weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head", type=int, default=defaults.HEAD)
    p.add_argument("--tail", type=int, default=defaults.TAIL)
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
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "resident_size.json").write_text(json.dumps({"head": args.head, "tail": args.tail, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

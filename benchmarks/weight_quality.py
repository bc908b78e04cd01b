"""Quality of each weight format on the default model: perplexity on held-out text (BBC
articles, chitchat conversations) and next-token agreement with float32 (the share of
positions where the format's top-1 token equals float32's, teacher-forced on the same text).

The whole model runs as one shard (every tensor in the format), so this is the quality
of a split with both sides in that format; the noise is 0.

    python benchmarks/weight_quality.py [--texts 24] [--tokens 256] [--formats float32 bfloat16 int8 int4 file]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from audit.data import bbc_articles, chitchat_conversations
from fedsea_shared.models import resolve_model
from fedsea_shared.shard import causal_attention, load_config, load_shard

RESULTS = Path(__file__).parent / "results"


def attend(layer, q, k, v):
    return causal_attention(q, k, v, q.shape[-1] ** -0.5)


@torch.inference_mode()
def logits_of(shard, ids: torch.Tensor) -> torch.Tensor:
    layers = range(shard.config.num_hidden_layers)
    h = shard.run_blocks(layers, shard.embed(ids), torch.arange(len(ids)), attend)
    return shard.logits(h).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=24, help="texts per corpus (the last ones: held out from training use)")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--formats", nargs="+", default=["float32", "bfloat16", "int8", "int4", "file"],
                   help="file: the packaged Q4_1 GGUF as stored (int4 blocks, int8 embedding)")
    args = p.parse_args()
    torch.set_num_threads(2)
    model_dir = resolve_model("smollm2-135m-instruct")
    gguf_dir = resolve_model("smollm2-135m-instruct-q4_1")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    corpora = {"bbc": bbc_articles()[-args.texts:], "chitchat": chitchat_conversations()[-args.texts:]}
    samples = {c: [torch.tensor(tok(t).input_ids[: args.tokens]) for t in texts] for c, texts in corpora.items()}
    config = load_config(model_dir)
    layers = list(range(config.num_hidden_layers))
    reference: dict[str, list[torch.Tensor]] = {}
    results = []
    for fmt in args.formats:
        t0 = time.perf_counter()
        shard = (load_shard(gguf_dir, layers, True, weights="file") if fmt == "file"
                 else load_shard(model_dir, layers, True, weights=fmt))
        for corpus, seqs in samples.items():
            nll = count = agree = 0
            for i, ids in enumerate(seqs):
                logits = logits_of(shard, ids)
                nll += torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
                count += len(ids) - 1
                top = logits.argmax(-1)
                if fmt == "float32":
                    reference.setdefault(corpus, []).append(top)
                agree += (top == reference[corpus][i]).sum().item() if reference else 0
            ppl = math.exp(nll / count)
            row = {"format": fmt, "corpus": corpus, "perplexity": round(ppl, 3), "tokens": count,
                   "top1_agreement_with_float32": round(agree / (count + len(seqs)), 4) if reference else None}
            results.append(row)
            print(f"{fmt:>9} {corpus:>9}: perplexity {ppl:8.3f}  top-1 agreement with float32 "
                  f"{row['top1_agreement_with_float32']}  ({time.perf_counter() - t0:.0f} s)")
    base = {r["corpus"]: r["perplexity"] for r in results if r["format"] == "float32"}
    for r in results:
        if r["corpus"] in base:
            r["perplexity_vs_float32"] = round(r["perplexity"] / base[r["corpus"]] - 1, 4)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "weight_quality.json"
    path.write_text(json.dumps({"texts": args.texts, "tokens": args.tokens, "results": results}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Quality of each weight format on the default model: perplexity on held-out text (BBC
articles, chitchat conversations), next-token agreement with float32 (the share of
positions where the format's top-1 token equals float32's, teacher-forced on the same text)
and free-running greedy agreement (10 chat prompts x 24 tokens; a reply counts up to its
first token that differs from float32's reply).

The whole model runs as one shard (every tensor in the format), so this is the quality
of a split with both sides in that format; the noise is 0.  With --llamacpp, llama.cpp's
llama-server (benchmarks/setup_llamacpp.sh) answers the same prompt tokens from its f32,
bf16, Q8_0 and Q4_0 GGUFs, and its greedy agreement with its own f32 is reported beside.

    python benchmarks/weight_quality.py [--texts 24] [--tokens 256] [--formats float32 bfloat16 int8 int4 file] [--llamacpp]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import httpx
import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audit.data import bbc_articles, chitchat_conversations  # noqa: E402
from benchmarks.vs_peers import GGUF_TYPES, llamacpp_server  # noqa: E402
from fedsea_shared.models import resolve_model  # noqa: E402
from fedsea_shared.shard import causal_attention, load_config, load_shard  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROMPTS = ("Where is the Eiffel Tower?", "List four fruits.", "Why is the sky blue?", "What is 7 times 6?",
           "Write a short poem about snow.", "Who painted the Mona Lisa?", "Give me an antonym for cold.",
           "What do cows eat?", "How many months are in a year?", "Say goodbye in French.")
REPLY_TOKENS = 24


def attend(layer, q, k, v):
    return causal_attention(q, k, v, q.shape[-1] ** -0.5)


@torch.inference_mode()
def logits_of(shard, ids: torch.Tensor) -> torch.Tensor:
    layers = range(shard.config.num_hidden_layers)
    h = shard.run_blocks(layers, shard.embed(ids), torch.arange(len(ids)), attend)
    return shard.logits(h).float()


@torch.inference_mode()
def greedy(shard, prompt: list[int], eos: int) -> list[int]:
    ids = list(prompt)
    for _ in range(REPLY_TOKENS):
        ids.append(int(logits_of(shard, torch.tensor(ids))[-1].argmax()))
        if ids[-1] == eos:
            break
    return ids[len(prompt):]


def agreement(reference: list[list[int]], replies: list[list[int]]) -> float:
    """The share of the reference replies' tokens produced before the first difference."""
    same = 0
    for ref, got in zip(reference, replies):
        for r, g in zip(ref, got):
            if r != g:
                break
            same += 1
    return same / sum(len(r) for r in reference)


def llamacpp_replies(peers: Path, prompts: list[list[int]], weights: str) -> list[list[int]] | str:
    """llama-server's greedy replies to the same prompt tokens from its GGUF at `weights`
    (or why it could not run)."""
    server = llamacpp_server(peers, threads=2, weights=weights)
    if isinstance(server, str):
        return server
    with server as (url, _):
        base = url.removesuffix("/v1")
        body = {"n_predict": REPLY_TOKENS, "temperature": 0, "top_k": 1, "return_tokens": True, "cache_prompt": False}
        return [httpx.post(f"{base}/completion", json={**body, "prompt": p}, timeout=120).json()["tokens"] for p in prompts]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=24, help="texts per corpus (the last ones: held out from training use)")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--formats", nargs="+", default=["float32", "bfloat16", "int8", "int4", "file"],
                   help="file: the packaged Q4_1 GGUF as stored (int4 blocks, int8 embedding)")
    p.add_argument("--llamacpp", action="store_true", help="llama.cpp's greedy agreement per GGUF type beside")
    p.add_argument("--peers-dir", type=Path, default=Path(os.environ.get("FEDSEA_PEERS") or Path.home() / ".cache/fedsea/peers"))
    args = p.parse_args()
    torch.set_num_threads(2)
    model_dir = resolve_model("smollm2-135m-instruct")
    gguf_dir = resolve_model("smollm2-135m-instruct-q4_1")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    corpora = {"bbc": bbc_articles()[-args.texts:], "chitchat": chitchat_conversations()[-args.texts:]}
    samples = {c: [torch.tensor(tok(t).input_ids[: args.tokens]) for t in texts] for c, texts in corpora.items()}
    config = load_config(model_dir)
    layers = list(range(config.num_hidden_layers))
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False).input_ids for q in PROMPTS]
    reference: dict[str, list[torch.Tensor]] = {}
    replies: dict[str, list[list[int]]] = {}
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
        replies[fmt] = [greedy(shard, ids, tok.eos_token_id) for ids in prompts]
    greedy_rows = [{"server": "fedsea", "format": fmt, "greedy_agreement": round(agreement(replies["float32"], r), 4)}
                   for fmt, r in replies.items() if "float32" in replies]
    if args.llamacpp:
        theirs = {fmt: llamacpp_replies(args.peers_dir, prompts, fmt) for fmt in GGUF_TYPES}
        if not isinstance(theirs["float32"], str):
            greedy_rows += [{"server": "llama.cpp", "format": GGUF_TYPES[fmt],
                             "greedy_agreement": round(agreement(theirs["float32"], r), 4) if not isinstance(r, str) else r}
                            for fmt, r in theirs.items()]
            # Its f32 against fedsea's float32: how far apart the two engines start.
            greedy_rows.append({"server": "llama.cpp f32 vs fedsea float32", "format": "f32",
                                "greedy_agreement": round(agreement(replies["float32"], theirs["float32"]), 4)})
    for row in greedy_rows:
        print(f"greedy agreement, {row['server']} {row['format']}: {row['greedy_agreement']}")
    base = {r["corpus"]: r["perplexity"] for r in results if r["format"] == "float32"}
    for r in results:
        if r["corpus"] in base:
            r["perplexity_vs_float32"] = round(r["perplexity"] / base[r["corpus"]] - 1, 4)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "weight_quality.json"
    path.write_text(json.dumps({"texts": args.texts, "tokens": args.tokens, "results": results,
                                       "greedy": {"prompts": len(PROMPTS), "tokens": REPLY_TOKENS, "rows": greedy_rows}}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Split fine-tuning on BBC topic classification (headline -> topic), default model.

Measured in one run, on the same data, validation set and hyperparameters:
  * before: the base model (zero-shot accuracy of the answer's first token among the 5 topics);
  * split, 2 clients (separate processes, batched mode, FedAvg every R steps), at the default
    serving noise and at noise 0;
  * centralized: `peft` LoRA on the unsplit `transformers` model over the union of the
    clients' data, with the same samples in as many optimizer steps of as many samples as
    the split run (one step: every client's batch; the server's adapter takes exactly
    these steps).  benchmarks/quality.py is the comparison with intervals.
Also reports what packing saves on the wire: the [B,1,L,L] float mask and the padding rows
a padded batch would send, against the lengths list actually sent.

    nice -n 19 python benchmarks/finetune_bbc.py [--steps 20] [--batch-size 4] [--valid 100]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import orjson
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaForCausalLM

from fedsea_shared import defaults
from fedsea_shared.models import resolve_model
from fedsea_shared.protocol import LoraSpec, OptimSpec
from fedsea_shared.shard import load_config
from fedsea_shared.training import AdapterOptimizer
from training.data import build_dataset, padded, shard
from training.edge import Packed
from training.federation import FinetuneConfig, run

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def evaluate_full(model, examples, label_tokens, pad_id, batch_size=16) -> dict[str, float]:
    model.eval()
    loss_sum, tokens, correct = 0.0, 0, 0
    names, choices = list(label_tokens), torch.tensor(list(label_tokens.values()))
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size]
        ids, mask, labels = padded(batch, pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        shift = labels[:, 1:]
        loss_sum += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shift.reshape(-1), reduction="sum", ignore_index=-100).item()
        tokens += (shift != -100).sum().item()
        for row, ex in enumerate(batch):
            correct += names[logits[row, ex.prompt_len - 1, choices].argmax().item()] == ex.label
    model.train()
    return {"loss": loss_sum / tokens, "accuracy": correct / len(examples)}


def centralized(model_dir, train, valid, label_tokens, pad_id, lora: LoraSpec, optim: OptimSpec, steps: int, batch_size: int, seed: int):
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets)))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = AdapterOptimizer(params, optim.model_copy(update={"total_steps": steps}), steps)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=g).tolist()
    started = time.perf_counter()
    for step in range(steps):
        picked = [order[(step * batch_size + j) % len(order)] for j in range(batch_size)]
        ids, mask, labels = padded([train[i] for i in picked], pad_id)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.micro_step()
    seconds = time.perf_counter() - started
    return evaluate_full(model, valid, label_tokens, pad_id), seconds


def wire_savings(examples, clients, batch_size, hidden) -> dict[str, float]:
    sent = {"mask_bytes": 0, "padding_bytes": 0, "lengths_bytes": 0, "hidden_bytes": 0}
    for c in range(clients):
        mine = shard(examples, clients, c)
        for i in range(0, len(mine) - batch_size + 1, batch_size):
            packed = Packed.of(mine[i : i + batch_size])
            for k, v in packed.wire_savings(hidden, 4).items():
                sent[k] += v
            sent["lengths_bytes"] += len(orjson.dumps({"lengths": packed.lengths}))
            sent["hidden_bytes"] += sum(packed.lengths) * hidden * 4
    return sent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="steps per client")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--valid", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--fedavg-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model_dir = resolve_model(defaults.MODEL)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    max_train = args.clients * args.steps * args.batch_size  # each sample seen once
    ds = build_dataset("bbc-news", tok, 128, args.seed, max_train=max_train, max_valid=args.valid)
    label_tokens = {label: tok(label, add_special_tokens=False).input_ids[0] for label in ds.labels}
    lora = LoraSpec(rank=args.rank, alpha=2.0 * args.rank)
    optim = OptimSpec(lr=args.lr, schedule="linear")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    results: dict = {"machine": f"{platform.node()} ({torch.get_num_threads()} torch threads), torch {torch.__version__}",
                     "args": vars(args), "samples_trained": max_train, "valid_samples": len(ds.valid)}

    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    results["before"] = evaluate_full(base, ds.valid, label_tokens, pad_id)
    del base
    print(f"before: {results['before']}", flush=True)

    runs = tempfile.mkdtemp(prefix="fedsea-bbc-")
    try:
        for name, noise in (("split_noise_default", defaults.NOISE), ("split_noise_0", 0.0)):
            cfg = FinetuneConfig(data="bbc-news", out=f"{runs}/{name}", clients=args.clients, mode="batched", steps=args.steps,
                                 batch_size=args.batch_size, max_length=128, max_train=max_train, max_valid=args.valid,
                                 noise=noise, lora=lora, optim=optim, fedavg_every=args.fedavg_every, seed=args.seed, progress=False)
            report = run(cfg)
            results[name] = {"noise": noise, **report["after"], "before_at_this_noise": report["before"],
                             "train_seconds": report["train"]["seconds"], "wall_seconds": report["wall_seconds"]}
            print(f"{name}: {results[name]}", flush=True)
    finally:
        shutil.rmtree(runs, ignore_errors=True)

    after, seconds = centralized(model_dir, ds.train, ds.valid, label_tokens, pad_id, lora, optim,
                                 args.steps, args.clients * args.batch_size, args.seed)
    results["centralized"] = {**after, "train_seconds": seconds}
    print(f"centralized: {results['centralized']}", flush=True)
    results["wire"] = wire_savings(ds.train, args.clients, args.batch_size, load_config(model_dir).hidden_size)

    split = results["split_noise_default"]
    rows = [("model", "val loss", "accuracy")]
    rows.append(("base (before)", results["before"]["loss"], results["before"]["accuracy"]))
    for key in ("split_noise_default", "split_noise_0", "centralized"):
        rows.append((key, results[key]["loss"], results[key]["accuracy"]))
    print(f"\nBBC topic, {max_train} training samples, {len(ds.valid)} validation samples")
    for name, loss, acc in rows:
        print(f"{name:<24}{loss:>10}{acc:>10}" if isinstance(loss, str) else f"{name:<24}{loss:>10.4f}{acc:>10.3f}")
    gap = split["accuracy"] - results["centralized"]["accuracy"]
    results["accuracy_gap_split_minus_centralized"] = gap
    w = results["wire"]
    results["mask_bytes_per_lengths_byte"] = w["mask_bytes"] / w["lengths_bytes"]
    print(f"accuracy gap (split @ noise {defaults.NOISE} - centralized): {gap:+.3f}")
    print(f"wire: a padded batch would add {w['mask_bytes']:,} mask bytes and {w['padding_bytes']:,} padding bytes; "
          f"the lengths lists took {w['lengths_bytes']:,} bytes (hidden states sent: {w['hidden_bytes']:,})")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "finetune_bbc.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

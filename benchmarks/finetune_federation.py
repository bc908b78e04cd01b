"""Federation scheduling modes: wall time and accuracy for the same number of samples.

For 2 and 4 client processes, each of sequential / batched / hierarchical trains the
default model on BBC topics with the same total samples (clients x steps x batch), against
one embedded server runtime, in one run of this script.  Time is client 0's training loop
(from the start line after the initial FedAvg round to the last round); sequential with 2
clients is the baseline of the speed-up ratios.

    nice -n 19 python benchmarks/finetune_federation.py [--samples 48] [--clients 2 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from fedsea_shared.protocol import LoraSpec, OptimSpec
from training.federation import FinetuneConfig, run

RESULTS = Path(__file__).parent / "results"
MODES = ("sequential", "batched", "hierarchical")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=48, help="training samples, all clients together")
    p.add_argument("--clients", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--valid", type=int, default=40)
    p.add_argument("--fedavg-every", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    rows = []
    runs = tempfile.mkdtemp(prefix="fedsea-fed-")

    def config(clients: int, mode: str, steps: int) -> FinetuneConfig:
        return FinetuneConfig(
            data="bbc-news", out=f"{runs}/{mode}-{clients}", clients=clients, mode=mode, steps=steps,
            batch_size=args.batch_size, max_length=128, max_train=args.samples, max_valid=args.valid,
            lora=LoraSpec(rank=8, alpha=16), optim=OptimSpec(lr=args.lr), fedavg_every=args.fedavg_every,
            progress=False,
        )

    try:
        # Unmeasured: the embedded server's first passes in this process are slow (kernel
        # and allocator warm-up), which would otherwise land on the first measured mode.
        run(config(1, "sequential", 2).model_copy(update={"out": f"{runs}/warmup", "max_valid": 4}))
        for clients in args.clients:
            steps = max(1, args.samples // (clients * args.batch_size))
            for mode in MODES:
                report = run(config(clients, mode, steps))
                row = {"clients": clients, "mode": mode, "steps_per_client": steps,
                       "samples": clients * steps * args.batch_size, "train_seconds": report["train"]["seconds"],
                       "wall_seconds": report["wall_seconds"], "before": report["before"], "after": report["after"]}
                rows.append(row)
                print(f"{clients} clients {mode:<13} {row['train_seconds']:7.1f} s  acc {row['before'].get('accuracy', 0):.3f} -> "
                      f"{row['after'].get('accuracy', 0):.3f}  loss {row['after']['loss']:.3f}", flush=True)
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    base = {r["clients"]: r["train_seconds"] for r in rows if r["mode"] == "sequential"}
    print(f"\n{'clients':>7} {'mode':<13}{'samples':>8}{'train s':>9}{'vs seq':>8}{'accuracy':>10}{'val loss':>10}")
    for r in rows:
        r["speedup_vs_sequential"] = base[r["clients"]] / r["train_seconds"]
        print(f"{r['clients']:>7} {r['mode']:<13}{r['samples']:>8}{r['train_seconds']:>9.1f}{r['speedup_vs_sequential']:>7.2f}x"
              f"{r['after'].get('accuracy', float('nan')):>10.3f}{r['after']['loss']:>10.3f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "finetune_federation.json"
    out.write_text(json.dumps({"machine": f"{platform.node()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
                               "args": vars(args), "runs": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""`fedsea-finetune`: federated split LoRA fine-tuning from the command line.

    fedsea-finetune --data bbc-news --clients 2 --steps 100 --out runs/bbc

Rerunning the same command after a crash resumes from the last checkpoint in --out.
"""

from __future__ import annotations

import argparse
import os
import logging
import sys

from pydantic import ValidationError

from fedsea_shared import defaults
from fedsea_shared.protocol import LoraSpec, OptimSpec

from .data import BUILTIN, DataError
from .federation import FinetuneConfig, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsea-finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help=f"JSONL file ({{messages}} or {{prompt, completion}} per line) or one of: {', '.join(BUILTIN)}")
    p.add_argument("--out", required=True, help="run directory: checkpoints, adapter/, report.json")
    p.add_argument("--model", default=defaults.MODEL)
    p.add_argument("--head", type=int, default=defaults.HEAD, help="blocks kept on the edge before the server's range")
    p.add_argument("--tail", type=int, default=defaults.TAIL, help="blocks kept on the edge after it")
    p.add_argument("--noise", type=float, default=defaults.NOISE, help="noise on the hidden states sent, relative to per-token RMS")
    p.add_argument("--weights", default="float32", choices=["float32", "bfloat16", "float16", "int8", "int4"],
                   help="weight format of the frozen base on the edge (and the embedded server; a remote one has its "
                        "own --weights): int8/int4 train float LoRA adapters over a quantized base, as QLoRA")
    p.add_argument("--send-grad-clip", type=float, default=0.0,
                   help="clip each sample's gradient sent to the server to this L2 norm (it can leak labels; 0: off)")
    p.add_argument("--send-grad-noise", type=float, default=0.0, help="Gaussian noise on that gradient, std relative to the clip bound")
    p.add_argument("--clients", type=int, default=1, help="client processes, each with its own data shard")
    p.add_argument("--mode", choices=["sequential", "batched", "hierarchical"], default="sequential")
    p.add_argument("--server", action="append",
                   help="ws:// or wss://host:port of a running `fedsea server --enable-training` (default: an embedded "
                        "one); its API key is read from $FEDSEA_SERVER_API_KEY.  Repeat it to name servers of the same "
                        "model and cut: each job runs on one of them (ranked by its name), and when that one is lost, "
                        "resumes from its last checkpoint on the next")
    p.add_argument("--server-ca", metavar="FILE", help="PEM file verifying a wss:// server: a private CA or the server's "
                                                       "self-signed certificate (default: the system trust store)")
    g = p.add_argument_group("budget")
    g.add_argument("--steps", type=int, help="steps per client (overrides --epochs)")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--batch-size", type=int, default=8, help="samples per client step")
    g.add_argument("--max-length", type=int, default=256, help="tokens per sample; longer ones keep their last tokens")
    g.add_argument("--max-train", type=int, help="use at most this many training samples (all clients)")
    g.add_argument("--max-valid", type=int, help="use at most this many validation samples")
    g.add_argument("--valid-fraction", type=float, default=0.1)
    g = p.add_argument_group("LoRA and optimizer")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated module names")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="linear")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g = p.add_argument_group("federation")
    g.add_argument("--fedavg-every", type=int, default=10, help="local steps between FedAvg rounds (and checkpoints)")
    g.add_argument("--average", choices=["adapters", "gradients"], default="adapters",
                   help="what the clients' edges average: adapters, FedAvg every --fedavg-every steps (each client "
                        "steps on its own batches in between); gradients, before every optimizer step (FedSGD: one "
                        "edge adapter trained on all clients' batches, as centralized training would; one more round "
                        "trip per step, and the server sees each client's edge gradient every step, not only its "
                        "adapter every --fedavg-every steps)")
    g.add_argument("--by-label", action="store_true", help="non-IID shards: each client gets a slice of the label-sorted data")
    g.add_argument("--eval-every", type=int, default=0, help="steps between validations (0: before and after only)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args) -> FinetuneConfig:
    return FinetuneConfig(
        data=args.data, out=args.out, model=args.model, head=args.head, tail=args.tail, noise=args.noise, weights=args.weights,
        send_grad_clip=args.send_grad_clip, send_grad_noise=args.send_grad_noise,
        clients=args.clients, mode=args.mode, server=args.server, steps=args.steps, epochs=args.epochs,
        server_ca=args.server_ca, server_api_key=os.environ.get("FEDSEA_SERVER_API_KEY"),
        batch_size=args.batch_size, max_length=args.max_length, max_train=args.max_train, max_valid=args.max_valid,
        valid_fraction=args.valid_fraction, fedavg_every=args.fedavg_every, average=args.average, by_label=args.by_label,
        eval_every=args.eval_every, seed=args.seed, progress=not args.no_progress,
        lora=LoraSpec(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())),
        optim=OptimSpec(lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                        grad_clip=args.grad_clip, grad_accum=args.grad_accum),
    )


def format_report(report: dict) -> str:
    rows = [("", "before", "after")]
    for metric in sorted(set(report["before"]) | set(report["after"])):
        rows.append((f"validation {metric}", f"{report['before'].get(metric, float('nan')):.4f}", f"{report['after'].get(metric, float('nan')):.4f}"))
    train = report.get("train", {})
    lines = [f"{a:<22}{b:>10}{c:>10}" for a, b, c in rows]
    lines.append(f"trained {train.get('steps', '?')} steps/client, {report['wall_seconds']:.1f} s wall")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = run(config_from_args(args))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        sys.exit(f"fedsea-finetune: invalid option{' ' + where if where else ''}: {first['msg']}")
    except (DataError, ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        sys.exit(f"fedsea-finetune: {e}")
    except KeyboardInterrupt:
        sys.exit(f"fedsea-finetune: interrupted; rerun the same command to resume from {args.out}/checkpoint")
    print(format_report(report))
    print(f"adapter: {args.out}/adapter   report: {args.out}/report.json")


if __name__ == "__main__":
    main()

"""Resident memory over oneDNN products of ever-new row counts: the server's four linear
shapes of the default model (fused q/k/v, o, fused gate/up, down; random weights) at
`--ticks` (2000) random row counts of 1-512, as prompts of every length make them.  "whole":
each product at its own row count (oneDNN builds and keeps a kernel per row count, up to
1024); "padded": fedsea's `Linear` (after `warm_linear_kernels`), which pads more than
WARM_ROWS rows to one of eight row counts per doubling.  Each runs in a fresh process.

    python benchmarks/onednn_shapes.py [--ticks 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (outputs, inputs)


def run(mode: str, ticks: int, every: int) -> list[float]:
    """RSS (MiB) after the warm-up and after every `every` ticks."""
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    from fedsea_shared.layers.linear import Linear, _onednn_linear, use_onednn, warm_linear_kernels

    def rss() -> float:
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024

    torch.set_num_threads(1)
    layers = nn.ModuleList(Linear(k, n, bias=False) for n, k in SHAPES).requires_grad_(False)
    use_onednn(layers)
    warm_linear_kernels(layers)
    rng, out = random.Random(0), [rss()]
    with torch.inference_mode():
        for tick in range(1, ticks + 1):
            rows = rng.randint(1, 512)
            for m in layers:
                x = torch.randn(rows, m.in_features)
                m(x) if mode == "padded" else _onednn_linear(x, m.weight, None)
            if tick % every == 0:
                out.append(rss())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ticks", type=int, default=2000)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--child", choices=["whole", "padded"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run(args.child, args.ticks, args.every)))
        return
    rows = []
    for mode in ("whole", "padded"):
        child = subprocess.run([sys.executable, __file__, "--child", mode, "--ticks", str(args.ticks), "--every", str(args.every)],
                               capture_output=True, text=True, check=True)
        rows.append({"mode": mode, "rss_mib": json.loads(child.stdout)})
    print(f"RSS (MiB) after the warm-up, then every {args.every} ticks of random 1-512-row products, 4 linear shapes")
    for r in rows:
        print(f"{r['mode']:>7}: " + " ".join(f"{v:.0f}" for v in r["rss_mib"]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onednn_shapes.json").write_text(json.dumps({"ticks": args.ticks, "every": args.every, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

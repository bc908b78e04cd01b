"""Resident memory over oneDNN products of ever-new row counts: the server's four linear
shapes of the default model (fused q/k/v, o, fused gate/up, down; random weights) at
`--ticks` (2000) random row counts of 1-512, as prompts of every length make them, with
oneDNN's per-shape caches at their default (1024 shapes) and at fedsea's bound
(fedsea_shared.layers.linear.ONEDNN_CACHED_SHAPES).  Each setting runs in a fresh process:
the caches read their capacity once.

    python benchmarks/onednn_shapes.py [--ticks 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (outputs, inputs)
ONEDNN_DEFAULT = 1024


def run(ticks: int, every: int) -> list[float]:
    """RSS (MiB) before the first product and after every `every` ticks."""
    import torch

    from fedsea_shared.layers.linear import PACK_HINT_ROWS, _onednn_linear

    def rss() -> float:
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024

    torch.set_num_threads(1)
    weights = [torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k), PACK_HINT_ROWS) for n, k in SHAPES]
    rng, out = random.Random(0), [rss()]
    for tick in range(1, ticks + 1):
        rows = rng.randint(1, 512)
        for w in weights:
            _onednn_linear(torch.randn(rows, w.shape[1]), w, None)
        if tick % every == 0:
            out.append(rss())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ticks", type=int, default=2000)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run(args.ticks, args.every)))
        return
    from fedsea_shared.layers.linear import ONEDNN_CACHED_SHAPES

    rows = []
    for capacity in (ONEDNN_DEFAULT, ONEDNN_CACHED_SHAPES):
        env = os.environ | {"PYTHONPATH": str(ROOT)} | {v: str(capacity) for v in CACHES}
        child = subprocess.run([sys.executable, __file__, "--child", "--ticks", str(args.ticks), "--every", str(args.every)],
                               env=env, capture_output=True, text=True, check=True)
        rows.append({"cached_shapes": capacity, "rss_mib": json.loads(child.stdout)})
    print(f"RSS (MiB) every {args.every} ticks of random 1-512-row products, 4 linear shapes")
    for r in rows:
        print(f"{r['cached_shapes']:>5} cached shapes: " + " ".join(f"{v:.0f}" for v in r["rss_mib"]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onednn_shapes.json").write_text(json.dumps({"ticks": args.ticks, "every": args.every, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

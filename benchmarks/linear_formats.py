"""Milliseconds per product of each weight format's CPU kernel at SmolLM2-135M's linear shapes,
against float32 in the same run.

Variants take turns inside every round (so a burst of load from other processes on a shared
machine hits all of them), and each cell is the median over rounds of the mean of `--calls`
back-to-back products; weights are random (speed does not depend on values).

    python benchmarks/linear_formats.py [--rounds 9] [--calls 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fedsea_shared.layers.linear import Linear, PACK_HINT_ROWS, int4_tensors, onednn_available, quantize

RESULTS = Path(__file__).parent / "results"
# (out, in): q/o, k/v, gate/up, down, the LM head.
SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576))


def _layer(w: torch.Tensor, fmt: str) -> Linear:
    layer = Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    layer.load_state_dict(quantize(w, fmt), assign=True)
    return layer.requires_grad_(False)


def _int4(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    rows, cols = w.shape
    g = w.view(rows, cols // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    codes = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).view(rows, cols)
    return int4_tensors(codes, scale, lo + 8 * scale)


def variants(w: torch.Tensor) -> dict[str, callable]:
    """name -> fn(x float32 [rows, in]) running one product."""
    out, cols = w.shape
    v = {"float32 torch": lambda x: F.linear(x, w)}
    if onednn_available("cpu", torch.float32):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_HINT_ROWS)
        v["float32 onednn"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    wb = w.bfloat16()
    v["bfloat16 torch (bf16 act)"] = lambda x: F.linear(x.bfloat16(), wb).float()
    for fmt in ("int8", "int4"):
        layer = _layer(w, fmt)
        v[f"{fmt} (fedsea Linear, bf16 act)"] = layer
    i8 = quantize(w, "int8")
    v["int8 _weight_int8pack_mm fp32 act"] = lambda x: torch.ops.aten._weight_int8pack_mm(x, i8["weight"], i8["weight_scale"])
    g64 = _int4(w, 64)
    v["int4 g64 bf16 act"] = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.bfloat16(), g64["weight"], 64, g64["weight_scale_zeros"]).float()
    g32 = _int4(w, 32)
    sz32 = g32["weight_scale_zeros"].float()
    v["int4 g32 fp32 act"] = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, g32["weight"], 32, sz32)
    # torch's other int4 path: KleidiAI on Arm, a reference kernel elsewhere.
    g = w.view(out, cols // 32, 32)
    scale = g.abs().amax(-1) / 7
    codes = ((g / scale[..., None]).round().clamp(-8, 7) + 8).to(torch.uint8).view(out, cols)
    nibbles = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    dyn = torch.ops.aten._dyn_quant_pack_4bit_weight(nibbles, scale, None, 32, cols, out)
    v["int4 g32 _dyn_quant_matmul_4bit"] = lambda x: torch.ops.aten._dyn_quant_matmul_4bit(x, dyn, 32, cols, out)
    return v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    with torch.inference_mode():
        for out, cols in SHAPES:
            w = torch.randn(out, cols) * 0.02
            fns = variants(w)
            for rows in args.rows:
                x = torch.randn(rows, cols)
                times: dict[str, list[float]] = {name: [] for name in fns}
                for fn in fns.values():
                    fn(x)  # builds kernels, first-touch
                for _ in range(args.rounds):
                    for name, fn in fns.items():
                        t0 = time.perf_counter()
                        for _ in range(args.calls):
                            fn(x)
                        times[name].append((time.perf_counter() - t0) / args.calls * 1e3)
                base = statistics.median(times["float32 torch"])
                for name, ts in times.items():
                    ms = statistics.median(ts)
                    results.append({"shape": [out, cols], "rows": rows, "variant": name, "ms": round(ms, 4),
                                    "vs_float32": round(base / ms, 2)})
                    print(f"{out:>6}x{cols:<5} {rows:>2} rows  {name:<36} {ms:9.3f} ms  {base / ms:6.2f}x float32")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "linear_formats.json"
    path.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "load_avg_at_end": os.getloadavg()},
        "torch": torch.__version__, "rounds": args.rounds, "calls": args.calls, "results": results,
    }, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

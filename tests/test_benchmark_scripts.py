"""The GPU decode benchmark must stay runnable for the session that gets a GPU: run its
tiny shape on the CPU (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def test_gpu_decode_benchmark_runs_on_cpu(tmp_path):
    path = Path(__file__).parent.parent / "benchmarks" / "gpu_decode.py"
    spec = importlib.util.spec_from_file_location("gpu_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "r.json"
    module.main(["--device", "cpu", "--shape", "tiny", "--dtype", "float32", "--batches", "1", "3",
                 "--context", "40", "--steps", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["hf_eager_ms"] > 0 and r["roofline_ms"] > 0 for r in rows)
    assert all(set(r["modes"]) == {"gather", "flex", "flex+graphs"} for r in rows)
    assert all(m["ms"] > 0 for r in rows for m in r["modes"].values())

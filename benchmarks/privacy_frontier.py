"""Privacy frontier of the default model at the default split: plain noise (the
baseline, measured in the same run) against each defense at the same noise, with
naive and adaptive attacks, perplexity, few-shot task accuracy and greedy agreement
through the real serving path (`audit.frontier`).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/privacy_frontier.py [--task-prompts N] [--obfuscator-steps N]

One torch thread: on a shared 2-core machine, multi-threaded kernels spin against other
jobs and run many times slower.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from audit.config import AuditConfig
from audit.frontier import FRONTIER, frontier_table, plot_frontier, run_frontier

RESULTS = Path(__file__).parent / "results"

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--task-prompts", type=int, default=12)
    p.add_argument("--chat-prompts", type=int, default=6)
    p.add_argument("--obfuscator-steps", type=int, default=150)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/fedsea-frontier"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("websockets", "fedsea.server", "fedsea.edge", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    report = run_frontier(AuditConfig(), FRONTIER, args.task_prompts, args.chat_prompts, args.obfuscator_steps, args.workdir)
    print(frontier_table(report))
    print(f"\nunsplit: perplexity {report.baseline_perplexity:.1f}, task accuracy {report.baseline_accuracy}; "
          f"wall {report.wall_s:.0f} s, CPU {report.cpu_s:.0f} s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "privacy_frontier.json").write_text(json.dumps(report.model_dump(), indent=1))
    (RESULTS / "privacy_frontier.txt").write_text(frontier_table(report) + "\n")
    plot_frontier(report, RESULTS / "privacy_frontier.png")

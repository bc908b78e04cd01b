"""Privacy frontier of the default model at the default split: plain noise (the
baseline, measured in the same run) against each defense at the same noise, with
naive and adaptive attacks, perplexity, few-shot task accuracy and greedy agreement
through the real serving path (`audit.frontier`).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/privacy_frontier.py            # every setting, full size
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/privacy_frontier.py --quick --part noise &
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/privacy_frontier.py --quick --part obfuscator
    python benchmarks/privacy_frontier.py --merge                                    # parts -> one table + plot

`--part` runs a subset of the settings, so two single-threaded processes share a
loaded machine; `--merge` joins the parts' JSON into privacy_frontier.{json,txt,png}.
One torch thread: on a shared 2-core machine, multi-threaded kernels spin against other
jobs and run many times slower.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from audit.config import AuditConfig
from audit.frontier import FRONTIER, FrontierReport, Setting, frontier_table, plot_frontier, run_frontier

RESULTS = Path(__file__).parent / "results"
PARTS = {
    "noise": [Setting(name="public-template", noise=0.1, pseudonymize=False),
              Setting(name="noise", noise=0.1, public_template=False, pseudonymize=False),
              Setting(name="public-template", noise=1.0, pseudonymize=False),
              Setting(name="noise", noise=1.0, public_template=False, pseudonymize=False)],
    "obfuscator": [Setting(name="obfuscator-w1", noise=0.1, obfuscator=1.0, pseudonymize=False)],
    "pseudonyms": [Setting(name="pseudonyms", noise=0.1, pseudonymize=True), Setting(name="pseudonyms", noise=1.0, pseudonymize=True)],
    "all": FRONTIER,
}
# Sizes that finish in about half an hour per part on 2 cores shared with other jobs.
QUICK = dict(attacker_windows=256, victim_windows=32, utility_windows=8, inverter_steps=80, inverter_warm_steps=0,
             defense_windows=64)


def merge() -> FrontierReport:
    parts = [FrontierReport.model_validate_json(f.read_text()) for f in sorted(RESULTS.glob("privacy_frontier_*.json"))]
    if not parts:
        raise SystemExit(f"no privacy_frontier_*.json parts under {RESULTS}")
    first = parts[0]
    return first.model_copy(update={
        "points": [pt for r in parts for pt in r.points],
        "wall_s": max(r.wall_s for r in parts), "cpu_s": sum(r.cpu_s for r in parts),
    })


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=sorted(PARTS), default="all")
    p.add_argument("--quick", action="store_true", help=f"smaller data and training: {QUICK}")
    p.add_argument("--task-prompts", type=int, default=12)
    p.add_argument("--chat-prompts", type=int, default=6)
    p.add_argument("--obfuscator-steps", type=int, default=150)
    p.add_argument("--merge", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("websockets", "fedsea.server", "fedsea.edge", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    RESULTS.mkdir(exist_ok=True)
    if args.merge:
        report = merge()
        stem = "privacy_frontier"
    else:
        config = AuditConfig(**(QUICK if args.quick else {}))
        report = run_frontier(config, PARTS[args.part], args.task_prompts, args.chat_prompts, args.obfuscator_steps,
                              Path(f"/tmp/fedsea-frontier-{args.part}"))
        stem = f"privacy_frontier_{args.part}"
    print(frontier_table(report))
    print(f"\nunsplit: perplexity {report.baseline_perplexity:.1f}, task accuracy {report.baseline_accuracy}; "
          f"wall {report.wall_s:.0f} s, CPU {report.cpu_s:.0f} s")
    (RESULTS / f"{stem}.json").write_text(json.dumps(report.model_dump(), indent=1))
    (RESULTS / f"{stem}.txt").write_text(frontier_table(report) + "\n")
    if args.merge:
        plot_frontier(report, RESULTS / f"{stem}.png")

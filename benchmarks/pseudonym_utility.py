"""What pseudonymization costs the serving default: perplexity ratio and greedy agreement
with the pseudonymizer on and off, at the same split, noise and template.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/pseudonym_utility.py    # ~10 min on 2 cores

Perplexity ratio and greedy agreement come from the audit's own frontier run
(`audit.frontier.run_frontier`, cheapest attack only: the attacks are not the point here).
Greedy agreement is then also listed per chat prompt: a prompt in which the detector
replaces nothing reaches the model unchanged, so only the prompts it changes can differ.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from audit import tasks
from audit.config import AuditConfig
from audit.frontier import frontier_table, run_frontier, serving_default
from edge_runtime.pii import Detector
from fedsea_shared import defaults

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utility-windows", type=int, default=32, help="held-out chat windows for perplexity")
    ap.add_argument("--chat-prompts", type=int, default=48, help="chat prompts for greedy agreement")
    ap.add_argument("--out", default=str(RESULTS / "pseudonym_utility.json"))
    args = ap.parse_args(argv)
    on = serving_default()
    off = on.model_copy(update={"name": "serving-default, pseudonymize off", "pseudonymize": False})
    config = AuditConfig(heads=[on.head], attacks=["embedding"], attacker_windows=8, victim_windows=8,
                         utility_windows=args.utility_windows, inverter_steps=1, inverter_warm_steps=0, defenses=[],
                         defense_windows=1)
    report = run_frontier(config, [on, off], task_prompts=1, chat_prompts=args.chat_prompts)
    print(frontier_table(report))

    prompts = tasks.prompts(1, args.chat_prompts, config.seed)
    reference, with_, without = tasks.measure(defaults.MODEL, on.head, config.tail, [
        tasks.Serving(0.0), tasks.Serving(on.noise, on.public_template, pseudonymize=True),
        tasks.Serving(on.noise, on.public_template)], prompts)
    a_on, a_off = with_.agreement_per_prompt(reference), without.agreement_per_prompt(reference)
    detector = Detector.shared()
    changed = [i for i, m in enumerate(prompts.chat) if detector.detect(m[0]["content"])]
    unchanged_equal = all(a_on[i] == a_off[i] for i in range(len(a_on)) if i not in changed)
    print(f"\n{len(a_on)} chat prompts: the detector changes {len(changed)}; agreement on {sum(a_on) / len(a_on):.3f}, "
          f"off {sum(a_off) / len(a_off):.3f}; equal on every prompt it leaves alone: {unchanged_equal}")
    for i in changed:
        print(f"  prompt {i}: on {a_on[i]:.3f}, off {a_off[i]:.3f}: {prompts.chat[i][0]['content'][:80]!r}")
    out = {"points": {pt.setting.name: {"perplexity_ratio": pt.perplexity_ratio, "greedy_agreement": pt.greedy_agreement}
                      for pt in report.points},
           "per_prompt": {"on": a_on, "off": a_off, "changed_by_detector": changed, "unchanged_equal": unchanged_equal},
           "utility_windows": args.utility_windows, "chat_prompts": args.chat_prompts,
           "wall_s": report.wall_s, "cpu_s": report.cpu_s}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""`fedsea audit`: measure what the server can reconstruct, and what the noise costs."""

from __future__ import annotations

import json
from pathlib import Path

from fedsea_shared import defaults

from .config import DEFENSES, AuditConfig


def add_parser(sub) -> None:
    p = sub.add_parser("audit", help="measure what the server can reconstruct from the noised hidden states")
    d = AuditConfig()
    p.add_argument("--model", default=defaults.MODEL, help="checkpoint directory or packaged model name (default: %(default)s)")
    p.add_argument("--heads", type=int, nargs="+", default=d.heads, help="head depths to audit; 0 = embeddings (default: %(default)s)")
    p.add_argument("--tail", type=int, default=defaults.TAIL)
    p.add_argument("--noise", type=float, nargs="+", default=d.noises, help="noise scales (default: %(default)s)")
    p.add_argument("--attacks", nargs="+", default=d.attacks, help="(default: %(default)s)")
    p.add_argument("--attacker-windows", type=int, default=d.attacker_windows)
    p.add_argument("--victim-windows", type=int, default=d.victim_windows)
    p.add_argument("--utility-windows", type=int, default=d.utility_windows)
    p.add_argument("--inverter-steps", type=int, default=d.inverter_steps)
    p.add_argument("--inverter-warm-steps", type=int, default=d.inverter_warm_steps)
    p.add_argument("--defenses", nargs="*", default=d.defenses, help=f"measured next to plain noise, any of {list(DEFENSES)} (default: %(default)s)")
    p.add_argument("--defense-windows", type=int, default=d.defense_windows)
    p.add_argument("--max-ppl-ratio", type=float, default=1.25, help="perplexity budget for the recommendation, relative to the unsplit model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument("--plot", type=Path, help="write the leakage-vs-utility PNG here")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--frontier", action="store_true",
                      help="instead of the sweep, audit whole serving configurations (plain noise, public template, "
                           "obfuscating adapter) with adaptive attacks, perplexity, task accuracy and greedy agreement")
    mode.add_argument("--serving-default", action="store_true",
                      help="audit exactly what `fedsea serve`/`gateway`/EdgeClient run by default; --json gets top-level "
                           "token_recovery, names_recovered, numbers_recovered, perplexity_ratio, task_accuracy_delta")
    p.add_argument("--task-prompts", type=int, default=12, help="few-shot queries per task (--frontier, --serving-default)")
    p.add_argument("--chat-prompts", type=int, default=6, help="chat prompts for greedy agreement (--frontier, --serving-default)")
    p.add_argument("--obfuscator-steps", type=int, default=150, help="training steps of each obfuscating adapter (--frontier)")


def run(args) -> None:
    from .report import attack_table, plot, recommend, table
    from .run import run_audit

    config = AuditConfig(
        model=args.model, heads=args.heads, tail=args.tail, noises=args.noise, attacks=args.attacks,
        attacker_windows=args.attacker_windows, victim_windows=args.victim_windows,
        utility_windows=args.utility_windows, inverter_steps=args.inverter_steps,
        inverter_warm_steps=args.inverter_warm_steps, defenses=args.defenses,
        defense_windows=args.defense_windows, seed=args.seed,
    )
    if args.frontier or args.serving_default:
        return _run_frontier(args, config)
    report = run_audit(config)
    print(table(report))
    print()
    print(attack_table(report))
    print(f"\nunsplit perplexity {report.baseline_perplexity:.1f}; wall {report.wall_s:.0f} s, CPU {report.cpu_s:.0f} s")
    for defense in (None, *config.defenses):
        best = recommend(report, args.max_ppl_ratio, defense)
        what = f"noise + {defense}" if defense else "noise only"
        if best is None:
            print(f"recommendation ({what}): no setting keeps perplexity within {args.max_ppl_ratio}x")
        else:
            print(f"recommendation ({what}, perplexity <= {args.max_ppl_ratio}x): head {best.head}, noise {best.noise:g} "
                  f"-> {best.best.token_recovery:.0%} of tokens recovered ({best.best_attack})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.model_dump(), indent=1))
    if args.plot:
        plot(report, args.plot)


def _run_frontier(args, config) -> None:
    from .frontier import FRONTIER, frontier_table, plot_frontier, run_frontier, serving_default, serving_default_summary

    if min(args.task_prompts, args.chat_prompts, args.obfuscator_steps) < 1:
        raise ValueError("--task-prompts, --chat-prompts and --obfuscator-steps must be >= 1")
    settings = [serving_default()] if args.serving_default else FRONTIER
    report = run_frontier(config, settings, args.task_prompts, args.chat_prompts, args.obfuscator_steps)
    print(frontier_table(report))
    print(f"\nunsplit: perplexity {report.baseline_perplexity:.1f}, task accuracy {report.baseline_accuracy}; "
          f"wall {report.wall_s:.0f} s, CPU {report.cpu_s:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = serving_default_summary(report) if args.serving_default else report.model_dump()
        args.json.write_text(json.dumps(out, indent=1))
    if args.plot:
        plot_frontier(report, args.plot)

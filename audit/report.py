"""Presenting an audit: a table, JSON, a leakage-vs-utility plot, and the calibration rule."""

from __future__ import annotations

from pathlib import Path

from .run import AuditReport, Cell


def table(report: AuditReport) -> str:
    """One row per (head, noise): the strongest attack's numbers and the perplexity."""
    rows = [
        "| head | noise | token recovery | ROUGE-L | canary names | canary numbers | best attack | perplexity | ppl ratio |"
        + "".join(f" ppl, {d} |" for d in report.config.defenses),
        "|---:|---:|---:|---:|---:|---:|:--|---:|---:|" + "---:|" * len(report.config.defenses),
    ]
    for c in report.cells:
        defended = "".join(f" {c.defended[d]:.1f} |" if d in c.defended else " - |" for d in report.config.defenses)
        rows.append(
            f"| {c.head} | {c.noise:g} | {c.best.token_recovery:.1%} | {c.best.rouge_l:.3f} | "
            f"{c.best.canary.get('name', 0):.0%} | {c.best.canary.get('number', 0):.0%} | {c.best_attack} | "
            f"{c.perplexity:.1f} | {c.perplexity_ratio:.2f} |{defended}"
        )
    return "\n".join(rows)


def attack_table(report: AuditReport) -> str:
    """Token recovery of every attack, to see which one does the damage where."""
    names = list(report.cells[0].attacks)
    rows = ["| head | noise | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    for c in report.cells:
        rows.append(f"| {c.head} | {c.noise:g} | " + " | ".join(f"{c.attacks[n].token_recovery:.1%}" for n in names) + " |")
    return "\n".join(rows)


def recommend(report: AuditReport, max_ppl_ratio: float, defense: str | None = None) -> Cell | None:
    """The servable setting (head >= 1) that leaks least while perplexity stays within
    `max_ppl_ratio` of the same setup without noise (the unsplit model; with `defense`,
    that defense at noise 0, so an adapted tail's gain on chat text is not counted)."""

    def ppl(c: Cell) -> float | None:
        return c.defended.get(defense) if defense else c.perplexity

    def base(c: Cell) -> float | None:
        quiet = [q for q in report.cells if q.head == c.head and q.noise == 0]
        return ppl(quiet[0]) if defense and quiet else report.baseline_perplexity

    ok = [c for c in report.cells if c.head > 0 and ppl(c) and base(c) and ppl(c) <= max_ppl_ratio * base(c)]
    return min(ok, key=lambda c: (c.best.token_recovery, ppl(c)), default=None)


def plot(report: AuditReport, path: Path) -> None:
    """Token recovery (strongest attack) against perplexity, one curve per head depth;
    dashed: the same leakage under each defense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for head in sorted({c.head for c in report.cells}):
        cells = [c for c in report.cells if c.head == head]
        line = ax.plot([c.perplexity for c in cells], [c.best.token_recovery for c in cells], "o-", label=f"head {head}, noise only")[0]
        for c in cells:
            ax.annotate(f"{c.noise:g}", (c.perplexity, c.best.token_recovery), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for defense, style in zip(report.config.defenses, ("s--", "^:")):
            defended = [c for c in cells if defense in c.defended]
            if defended:
                ax.plot([c.defended[defense] for c in defended], [c.best.token_recovery for c in defended], style,
                        color=line.get_color(), alpha=0.7, label=f"head {head}, noise + {defense}")
    ax.axvline(report.baseline_perplexity, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("perplexity on held-out chat (log; dotted = unsplit model)")
    ax.set_ylabel("victim tokens recovered (strongest attack)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("What the server reads vs what the noise costs (labels: noise scale)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""The frontier: whole serving configurations, each measured for what the strongest
attacker reads back and for what users get.

A configuration is a split, a noise scale, whether the public template prefix goes
un-noised, whether the edge runs a private obfuscating adapter (audit.obfuscator), and
whether it pseudonymizes names and numbers (edge_runtime.pseudonyms, audit.substitution:
leakage is then scored against the original text).
Leakage: every attack of the sweep (naive: it assumes the public head) plus, against an
adapter, the adaptive attacker, who knows the recipe and code but not the device's
seed or text: it trains a shadow adapter with this same code on its own public text
(another seed), holding the real server-side adapter fixed (the server has it), and
attacks through the shadow head (`shadow-*`).  `known-*` attacks through the real edge
adapter: what an attacker gets if the adapter ships in the repository.  Utility:
perplexity on held-out chat and, through the real serving path (audit.tasks), few-shot
accuracy and greedy agreement with the unsplit model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from edge_runtime.pseudonyms import Pseudonymizer
from fedsea_shared import defaults

from . import attacks, tasks
from .capture import batched_causal_attend, head_states, server_view
from .config import AuditConfig
from .obfuscator import ABSORB, Obfuscator, train_obfuscator
from .run import AttackResult, _best, _Sweep
from .substitution import substitute, truncated
from .utility import perplexity

log = logging.getLogger("fedsea.audit")


class Setting(BaseModel):
    name: str
    head: int = defaults.HEAD
    noise: float = defaults.NOISE
    public_template: bool = defaults.PUBLIC_TEMPLATE
    obfuscator: float = Field(0.0, ge=0, description="leakage weight of the private obfuscating adapter; 0 = none")
    # Off unless named (results saved before defense (c) existed load as what they were).
    pseudonymize: bool = Field(False, description="names, numbers, e-mails -> keyed surrogates on the edge")


def serving_default() -> Setting:
    """Exactly what `fedsea serve`, `fedsea gateway` and `EdgeClient` run by default."""
    return Setting(name="serving-default", pseudonymize=defaults.PSEUDONYMIZE)


# Plain noise as before this defense work, then each defense at the same noise levels.
FRONTIER = [
    *(Setting(name="noise", noise=n, public_template=False, pseudonymize=False) for n in (0.1, 0.3, 1.0)),
    *(Setting(name="public-template", noise=n, pseudonymize=False) for n in (0.1, 0.3)),
    *(Setting(name=f"obfuscator-w{w:g}", noise=0.1, obfuscator=w, pseudonymize=False) for w in (0.3, 1.0)),
    *(Setting(name="pseudonyms", noise=n, pseudonymize=True) for n in (0.1, 0.3)),
]
# The device's pseudonym key in the audit: the attacker knows the recipe and the public
# surrogate lists, never this.
DEVICE_KEY = hashlib.blake2b(b"fedsea-audit-device-key", digest_size=32).digest()


class Point(BaseModel):
    setting: Setting
    attacks: dict[str, AttackResult]
    best: AttackResult = Field(description="per metric, the strongest attack's value")
    best_attack: str
    perplexity: float
    perplexity_ratio: float = Field(description="vs the unsplit model on the same text")
    task_accuracy: dict[str, float]
    task_accuracy_delta: float = Field(description="mean task accuracy minus the unsplit model's, in [−1, 1]")
    greedy_agreement: float = Field(description="fraction of the unsplit model's greedy reply tokens before the first difference")
    detected: dict[str, float] = Field(default_factory=dict, description="pseudonymize: planted names / numbers the edge's "
                                       "detector replaced, and surrogates_read: replaced spans whose surrogate the best attack read")


class FrontierReport(BaseModel):
    config: AuditConfig
    baseline_perplexity: float
    baseline_accuracy: dict[str, float]
    task_prompts: int = Field(description="few-shot queries per task")
    chat_prompts: int
    points: list[Point]
    wall_s: float
    cpu_s: float


def _inverter_attacks(sweep: _Sweep, head: int, head_shard, seen: torch.Tensor, noise: float, prefix: str, kinds,
                      score=None) -> dict[str, AttackResult]:
    """Probe table and learned inverters built through `head_shard`'s head blocks (the
    attacker's idea of the edge), scored on the victims' received states `seen` (by
    `score`: default, against the victims' tokens position by position)."""
    c, p = sweep.config, sweep.victims.prefix
    score = score or sweep.score
    out = {}
    if {"probe", "vocab"} & set(c.attacks):
        public = head_shard is sweep.shard and head in sweep.probes
        table = sweep.probes[head] if public else attacks.probe_table(head_shard, sweep.maker.prefix_ids, [head])[head]
        if "probe" in c.attacks:
            out[f"{prefix}probe"] = score(attacks.nearest(seen.flatten(0, 1), table).view(seen.shape[:2]))
        if "vocab" in c.attacks:
            contexts = sweep.victims.ids[:, :p]
            out[f"{prefix}vocab"] = score(attacks.vocabulary_matching_windows(head_shard, head, contexts, seen, table))
    cut = head_states(head_shard, sweep.attacker.ids, [head])[head][:, p:]
    for kind in kinds:
        model = attacks.make_inverter(kind, sweep.model_config.hidden_size, max(p + seen.shape[1], sweep.victims.ids.shape[1]))
        attacks.train_inverter(model, cut, sweep.attacker.content, sweep.embedding, noise,
                               c.inverter_steps + c.inverter_warm_steps, seed=c.seed)
        out[f"{prefix}{kind}"] = score(attacks.invert(model, seen, sweep.embedding))
    return out


def _downstream_attacks(sweep: _Sweep, head: int, served, received: torch.Tensor, noise: float) -> dict[str, AttackResult]:
    """The server runs what it received (prefix included) through its own adapted
    blocks, which by design restore the unsplit model's state after block head + absorb,
    and attacks there with tools built from the public model alone: the probe table at
    that depth, and an MLP trained on public states noised at the cut and carried there."""
    c, p = sweep.config, sweep.victims.prefix
    depth = head + ABSORB

    def deeper(shard, cut):
        b, t, _ = cut.shape
        with torch.no_grad():
            out = shard.run_blocks(range(head, depth), cut.reshape(b * t, -1), torch.arange(t).repeat(b), batched_causal_attend(b, t))
        return out.view(b, t, -1)[:, p:]

    deep = deeper(served, received)
    out = {}
    if "probe" in c.attacks:
        table = attacks.probe_table(sweep.shard, sweep.maker.prefix_ids, [depth])[depth]
        out["downstream-probe"] = sweep.score(attacks.nearest(deep.flatten(0, 1), table).view(deep.shape[:2]))
    if "mlp" in c.attacks:
        a, clean = sweep.attacker, sweep.attacker_cut[head]
        public_deep = deeper(sweep.shard, server_view(clean, noise, c.seed + 3, p))
        model = attacks.make_inverter("mlp", sweep.model_config.hidden_size, sweep.victims.ids.shape[1])
        attacks.train_inverter(model, public_deep, a.content, sweep.embedding, 0.0, c.inverter_steps + c.inverter_warm_steps, seed=c.seed)
        out["downstream-mlp"] = sweep.score(attacks.invert(model, deep, sweep.embedding))
    return out


def run_frontier(config: AuditConfig, settings: list[Setting], task_prompts: int = 12, chat_prompts: int = 6,
                 obfuscator_steps: int = 150, workdir: Path | None = None, progress: Path | None = None) -> FrontierReport:
    """`progress`: rewrite this JSON file with the points done so far after each one
    (a long run on a shared machine keeps what it measured if it is stopped)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    heads = sorted({s.head for s in settings})
    if len(heads) != 1:
        raise ValueError("a frontier run audits one split; run once per head depth")
    config = config.model_copy(update={"heads": heads})
    torch.manual_seed(config.seed)
    sweep = _Sweep(config)
    head = heads[0]
    workdir = Path(workdir or tempfile.mkdtemp(prefix="fedsea-frontier-"))
    prompts = tasks.prompts(task_prompts, chat_prompts, config.seed)
    reference = tasks.measure(config.model, head, config.tail, [tasks.Serving(0.0)], prompts)[0]
    p = sweep.victims.prefix
    defense_windows = sweep.maker.plain(sweep.defense_chats, config.defense_windows)
    obfuscators: dict[tuple[float, float], tuple[Obfuscator, Obfuscator]] = {}
    pseudonymizer = Pseudonymizer(DEVICE_KEY)
    points = []
    for s in settings:
        base_attacks = [k for k in attacks.INVERTERS if k in config.attacks]
        if s.obfuscator:
            key = (s.noise, s.obfuscator)
            if key not in obfuscators:
                log.info("training the device's obfuscator and the attacker's shadow at noise %g, weight %g", *key)
                tag = f"{s.noise:g}-w{s.obfuscator:g}"
                real = train_obfuscator(sweep.shard, config.model, head, defense_windows, s.noise, obfuscator_steps,
                                        workdir / f"device-{tag}", seed=config.seed + 1000, weight=s.obfuscator)
                shadow = train_obfuscator(sweep.shard, config.model, head, sweep.attacker, s.noise, obfuscator_steps,
                                          workdir / f"shadow-{tag}", seed=config.seed + 2000, weight=s.obfuscator,
                                          server_from=real.server_dir)
                obfuscators[key] = (real, shadow)
            real, shadow = obfuscators[key]
            edge = real.edge_shard(sweep.shard)
            full = real.full_shard(sweep.shard)
        else:
            edge = full = sweep.shard
        score, detected = sweep.score, {}
        if s.pseudonymize:
            # The edge substitutes before tokenizing; guesses are scored at the original positions.
            pad = sweep.tokenizer.eos_token_id
            victims = substitute(sweep.tokenizer, sweep.victims, pseudonymizer, pad)
            victim_cut = head_states(edge, victims.ids, [head])[head]
            read: list[float] = []

            def score(guess, victims=victims, read=read):
                read.append(victims.surrogates_read(guess))
                return sweep.score(victims.to_original(guess))

            detected = victims.detected(sweep.victims.canaries, sweep.tokenizer)
            log.info("%s: the detector replaced %s of the planted canaries", s.name, detected)
        else:
            victim_cut = head_states(edge, sweep.victims.ids, [head])[head] if s.obfuscator else sweep.victim_cut[head]
        # What the server receives: noised, the public template prefix clean when that is on.
        received = server_view(victim_cut, s.noise, config.seed + 1, p if s.public_template else 0)
        seen = received[:, p:]
        results = {}
        if "embedding" in config.attacks:
            results["embedding"] = score(attacks.nearest_embedding(seen, sweep.embedding))
        results |= _inverter_attacks(sweep, head, sweep.shard, seen, s.noise, "", base_attacks, score)
        if s.obfuscator:
            mlp = ["mlp"] if "mlp" in config.attacks else []
            results |= _inverter_attacks(sweep, head, shadow.edge_shard(sweep.shard), seen, s.noise, "shadow-", mlp)
            results |= _inverter_attacks(sweep, head, edge, seen, s.noise, "known-", mlp)
            results |= _downstream_attacks(sweep, head, full, received, s.noise)
        best, best_attack = _best(results)
        if s.pseudonymize:
            detected["surrogates_read"] = max(read)
        h = sweep.held_out
        clean = h.prefix if s.public_template else 0
        if s.pseudonymize:
            # Perplexity is not defined on the original text for replaced spans: this is the
            # split's perplexity on the pseudonymized text against the unsplit model's on it.
            ids = truncated(substitute(sweep.tokenizer, h, pseudonymizer, sweep.tokenizer.eos_token_id))
            cut = head_states(edge, ids, [head])[head]
            ppl = perplexity(full, head, cut, ids, h.prefix, s.noise, config.seed + 2, clean)
            ratio = ppl / perplexity(sweep.shard, head, cut, ids, h.prefix, 0.0, config.seed + 2)
        else:
            utility_cut = head_states(edge, h.ids, [head])[head] if s.obfuscator else sweep.utility_cut[head]
            ppl = perplexity(full, head, utility_cut, h.ids, h.prefix, s.noise, config.seed + 2, clean)
            ratio = ppl / sweep.baseline
        adapters = {"obf": (real.edge_dir, real.server_dir)} if s.obfuscator else None
        serving = tasks.Serving(s.noise, s.public_template, "obf" if s.obfuscator else None, s.pseudonymize)
        got = tasks.measure(config.model, head, config.tail, [serving], prompts, adapters)[0]
        points.append(Point(
            setting=s, attacks=results, best=best, best_attack=best_attack, perplexity=ppl,
            perplexity_ratio=ratio, task_accuracy=got.accuracy, detected=detected,
            task_accuracy_delta=got.mean_accuracy - reference.mean_accuracy, greedy_agreement=got.agreement(reference),
        ))
        if progress is not None:
            progress.write_text(json.dumps([pt.model_dump() for pt in points], indent=1))
        log.info("%s noise %g: recovery %.3f (%s), ppl x%.3f, accuracy %+.3f, agreement %.2f", s.name, s.noise,
                 best.token_recovery, best_attack, points[-1].perplexity_ratio, points[-1].task_accuracy_delta,
                 points[-1].greedy_agreement)
    return FrontierReport(
        config=config, baseline_perplexity=sweep.baseline, baseline_accuracy=reference.accuracy,
        task_prompts=task_prompts, chat_prompts=chat_prompts, points=points,
        wall_s=time.perf_counter() - start, cpu_s=time.process_time() - cpu_start,
    )


def frontier_table(report: FrontierReport) -> str:
    rows = [
        "| configuration | noise | token recovery | names | numbers | strongest attack | ppl ratio | task acc. | Δ acc. | greedy agreement |",
        "|:--|---:|---:|---:|---:|:--|---:|---:|---:|---:|",
    ]
    for pt in report.points:
        acc = sum(pt.task_accuracy.values()) / len(pt.task_accuracy)
        rows.append(
            f"| {pt.setting.name} | {pt.setting.noise:g} | {pt.best.token_recovery:.1%} | {pt.best.canary.get('name', 0):.0%} | "
            f"{pt.best.canary.get('number', 0):.0%} | {pt.best_attack} | {pt.perplexity_ratio:.3f} | {acc:.1%} | "
            f"{pt.task_accuracy_delta:+.1%} | {pt.greedy_agreement:.2f} |"
        )
    return "\n".join(rows)


def serving_default_summary(report: FrontierReport) -> dict:
    """The top-level numbers of `fedsea audit --serving-default --json`."""
    pt = report.points[0]
    return {
        "token_recovery": pt.best.token_recovery,
        "names_recovered": pt.best.canary.get("name", 0.0),
        "numbers_recovered": pt.best.canary.get("number", 0.0),
        "perplexity_ratio": pt.perplexity_ratio,
        "task_accuracy_delta": pt.task_accuracy_delta,
        "greedy_agreement": pt.greedy_agreement,
        "strongest_attack": pt.best_attack,
        "setting": pt.setting.model_dump(),
        "report": report.model_dump(),
    }


def plot_frontier(report: FrontierReport, path: Path) -> None:
    """Token recovery (strongest attack) against perplexity ratio and task accuracy delta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    names = list(dict.fromkeys(pt.setting.name for pt in report.points))
    for ax, (metric, label) in zip(axes, [("perplexity_ratio", "perplexity / unsplit (log)"),
                                          ("task_accuracy_delta", "task accuracy − unsplit (points)")]):
        for name, marker in zip(names, "os^Dv"):
            pts = [pt for pt in report.points if pt.setting.name == name]
            xs = [getattr(pt, metric) * (100 if metric == "task_accuracy_delta" else 1) for pt in pts]
            ax.plot(xs, [pt.best.token_recovery for pt in pts], marker + "-", label=name)
            for x, pt in zip(xs, pts):
                ax.annotate(f"{pt.setting.noise:g}", (x, pt.best.token_recovery), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.axhline(0.3, color="grey", lw=0.8, ls=":")
    axes[0].set_xscale("log")
    axes[0].set_ylabel("victim tokens recovered (strongest attack)")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Frontier at head {report.config.heads[0]} (labels: noise; dotted: the 30% target)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""The audit: play the server over a sweep of head depths and noise levels.

For every (head, noise) cell it measures what each attack recovers from the states the
server would receive, and the perplexity the split model has at that setting.  Costly
things are computed once and shared: the clean cut states at every depth come from one
pass through the deepest head; the noise is added per cell.
"""

from __future__ import annotations

import logging
import time

import torch
from pydantic import BaseModel, Field
from transformers import AutoTokenizer

from fedsea_shared.models import resolve_model
from fedsea_shared.shard import load_config, load_shard

from . import attacks, data, defense, metrics
from .config import AuditConfig
from .capture import head_states, server_view
from .utility import perplexity

log = logging.getLogger("fedsea.audit")

class AttackResult(BaseModel):
    token_recovery: float
    rouge_l: float
    canary: dict[str, float] = Field(description="fraction of planted names / numbers recovered exactly")


class Cell(BaseModel):
    head: int
    noise: float
    perplexity: float
    perplexity_ratio: float = Field(description="perplexity / perplexity without noise, same text")
    defended: dict[str, float] = Field(
        default_factory=dict, description="perplexity under each defense at this noise; the leakage is the same"
    )
    attacks: dict[str, AttackResult]
    best: AttackResult = Field(description="per metric, the strongest attack's value")
    best_attack: str = Field(description="the attack with the highest token recovery")


class AuditReport(BaseModel):
    config: AuditConfig
    num_layers: int
    baseline_perplexity: float = Field(description="the unsplit model's perplexity on the held-out text")
    cells: list[Cell]
    wall_s: float
    cpu_s: float = Field(description="process CPU time (all threads): steadier than wall time on a shared machine")


def _best(results: dict[str, AttackResult]) -> tuple[AttackResult, str]:
    kinds = {k for r in results.values() for k in r.canary}
    best = AttackResult(
        token_recovery=max(r.token_recovery for r in results.values()),
        rouge_l=max(r.rouge_l for r in results.values()),
        canary={k: max(r.canary.get(k, 0.0) for r in results.values()) for k in sorted(kinds)},
    )
    return best, max(results, key=lambda a: results[a].token_recovery)


class _Sweep:
    """The shared inputs of every cell: the model, the three corpora's windows and their
    clean cut states at every audited depth, and the probe tables."""

    def __init__(self, config: AuditConfig):
        self.config = config
        model_dir = resolve_model(config.model)
        self.model_config = load_config(model_dir)
        layers = self.model_config.num_hidden_layers
        too_deep = [h for h in config.heads if h + config.tail >= layers]
        if too_deep:
            raise ValueError(f"heads {too_deep} + tail {config.tail} leave no block for the server ({layers} blocks)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        # One shard with every block: the audit plays edge and server at once.
        self.shard = load_shard(model_dir, list(range(layers)), with_edge_parts=True, config=self.model_config)
        self.embedding = self.shard.model.embed_tokens.weight

        # Attacker and victims write different corpora; the victim, utility and defense
        # windows come from disjoint ranges of conversations.
        chats = data.chitchat_conversations()
        third = len(chats) // 3
        self.maker = maker = data.WindowMaker(self.tokenizer, config.window)
        self.attacker = maker.plain(data.bbc_articles(), config.attacker_windows, per_text=2)
        self.victims = maker.with_canaries(chats[:third], config.victim_windows, seed=config.seed)
        self.long_maker = data.WindowMaker(self.tokenizer, config.utility_window)
        self.held_out = self.long_maker.plain(chats[third : 2 * third], config.utility_windows)
        self.defense_chats = chats[2 * third :]

        depths = config.heads
        log.info("cut states for %d attacker, %d victim, %d utility windows",
                 len(self.attacker.ids), len(self.victims.ids), len(self.held_out.ids))
        self.attacker_cut = head_states(self.shard, self.attacker.ids, depths)
        self.victim_cut = head_states(self.shard, self.victims.ids, depths)
        self.utility_cut = head_states(self.shard, self.held_out.ids, depths)
        wanted = [d for d in depths if d > 0] if {"probe", "vocab"} & set(config.attacks) else []
        self.probes = attacks.probe_table(self.shard, maker.prefix_ids, wanted) if wanted else {}
        # Without noise the split model computes exactly the unsplit one: one baseline for all.
        self.baseline = self.perplexity(depths[0], 0.0)

    def score(self, guess: torch.Tensor) -> AttackResult:
        truth = self.victims.content
        return AttackResult(
            token_recovery=metrics.token_recovery(guess, truth),
            rouge_l=metrics.mean_rouge_l(self.tokenizer, guess, truth),
            canary=metrics.canary_recovery(guess, truth, self.victims.canaries),
        )

    def leakage(self, head: int, noise: float, level: int, inverters: dict) -> dict[str, AttackResult]:
        """Every attack on the victims' states at this cell; the inverters train on."""
        config, p = self.config, self.victims.prefix
        seen = server_view(self.victim_cut[head], noise, config.seed + 1)[:, p:]
        results: dict[str, AttackResult] = {}
        if "embedding" in config.attacks:
            results["embedding"] = self.score(attacks.nearest_embedding(seen, self.embedding))
        if head in self.probes and "probe" in config.attacks:
            results["probe"] = self.score(attacks.nearest(seen.flatten(0, 1), self.probes[head]).view(seen.shape[:2]))
        if head in self.probes and "vocab" in config.attacks:
            # The strongest attack with no training: each position's probe candidates run in
            # context after the (public) prefix and the tokens guessed so far.
            results["vocab"] = self.score(attacks.vocabulary_matching_windows(
                self.shard, head, self.victims.ids[:, :p], seen, self.probes[head]))
        for kind, model in inverters.items():
            steps = config.inverter_steps if level == 0 else config.inverter_warm_steps
            attacks.train_inverter(
                model, self.attacker_cut[head][:, p:], self.attacker.content, self.embedding, noise, steps,
                seed=config.seed + level,
            )
            results[kind] = self.score(attacks.invert(model, seen, self.embedding))
        return results

    def perplexity(self, head: int, noise: float, clean_prefix: int = 0) -> float:
        h = self.held_out
        return perplexity(self.shard, head, self.utility_cut[head], h.ids, h.prefix, noise, self.config.seed + 2, clean_prefix)

    def adapted_tail(self, head: int):
        train = self.long_maker.plain(self.defense_chats, self.config.defense_windows)
        log.info("head %d: adapting the tail to noise", head)
        return defense.adapt_tail(
            self.shard, head, self.config.tail, head_states(self.shard, train.ids, [head])[head], train.ids,
            train.prefix, self.config.noises, epochs=self.config.defense_epochs, seed=self.config.seed,
        )

    def defended(self, head: int, noise: float, tail) -> dict[str, float]:
        """Perplexity under each defense (none applies to head 0, which is no split)."""
        out: dict[str, float] = {}
        if "clean-prefix" in self.config.defenses and head > 0:
            out["clean-prefix"] = self.perplexity(head, noise, self.held_out.prefix)
        if tail is not None:
            with defense.swapped_tail(self.shard, tail):
                out["adapted-tail"] = self.perplexity(head, noise)
        return out


def run_audit(config: AuditConfig) -> AuditReport:
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(config.seed)
    sweep = _Sweep(config)
    cells: list[Cell] = []
    for head in config.heads:
        inverters = {
            kind: attacks.make_inverter(kind, sweep.model_config.hidden_size, sweep.victims.ids.shape[1])
            for kind in attacks.INVERTERS if kind in config.attacks
        }
        tail = sweep.adapted_tail(head) if "adapted-tail" in config.defenses and head > 0 else None
        for level, noise in enumerate(config.noises):
            results = sweep.leakage(head, noise, level, inverters)
            plain = sweep.perplexity(head, noise)
            defended = sweep.defended(head, noise, tail)
            best, best_attack = _best(results)
            cells.append(Cell(
                head=head, noise=noise, perplexity=plain, perplexity_ratio=plain / sweep.baseline, defended=defended,
                attacks=results, best=best, best_attack=best_attack,
            ))
            log.info("head %d noise %g: recovery %.3f (%s), ppl %.1f %s", head, noise, best.token_recovery, best_attack, plain, defended)
    return AuditReport(
        config=config, num_layers=sweep.model_config.num_hidden_layers, baseline_perplexity=sweep.baseline,
        cells=cells, wall_s=time.perf_counter() - start, cpu_s=time.process_time() - cpu_start,
    )

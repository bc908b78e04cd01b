"""The audit: play the server over a sweep of head depths and noise levels.

For every (head, noise) cell it measures what each attack recovers from the states the
server would receive, and the perplexity the split model has at that setting.  Costly
things are computed once and shared: the clean cut states at every depth come from one
pass through the deepest head; the noise is added per cell.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

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

    @property
    def canary_all(self) -> float:
        return sum(self.canary.values()) / max(1, len(self.canary))


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


def run_audit(config: AuditConfig) -> AuditReport:
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(config.seed)
    model_dir = resolve_model(config.model)
    model_config = load_config(model_dir)
    num_layers = model_config.num_hidden_layers
    too_deep = [h for h in config.heads if h + config.tail >= num_layers]
    if too_deep:
        raise ValueError(f"heads {too_deep} + tail {config.tail} leave no block for the server ({num_layers} blocks)")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    # One shard with every block: the audit plays edge and server at once.
    shard = load_shard(model_dir, list(range(num_layers)), with_edge_parts=True, config=model_config)
    embedding = shard.model.embed_tokens.weight

    # Attacker and victims write different corpora; the victim, utility and defense
    # windows come from disjoint ranges of conversations.
    chats = data.chitchat_conversations()
    third = len(chats) // 3
    maker = data.WindowMaker(tokenizer, config.window)
    attacker = maker.plain(data.bbc_articles(), config.attacker_windows, per_text=2)
    victims = maker.with_canaries(chats[:third], config.victim_windows, seed=config.seed)
    long_maker = data.WindowMaker(tokenizer, config.utility_window)
    held_out = long_maker.plain(chats[third : 2 * third], config.utility_windows)
    p = victims.prefix

    depths = config.heads
    log.info("cut states for %d attacker, %d victim, %d utility windows", len(attacker.ids), len(victims.ids), len(held_out.ids))
    attacker_cut = head_states(shard, attacker.ids, depths)
    victim_cut = head_states(shard, victims.ids, depths)
    utility_cut = head_states(shard, held_out.ids, depths)
    probes = attacks.probe_table(shard, maker.prefix_ids, [d for d in depths if d > 0]) if "probe" in config.attacks else {}
    truth = victims.content
    # Without noise the split model computes exactly the unsplit one: one baseline for all.
    baseline = perplexity(shard, depths[0], utility_cut[depths[0]], held_out.ids, held_out.prefix, 0.0, config.seed)

    def score(guess: torch.Tensor) -> AttackResult:
        return AttackResult(
            token_recovery=metrics.token_recovery(guess, truth),
            rouge_l=metrics.mean_rouge_l(tokenizer, guess, truth),
            canary=metrics.canary_recovery(guess, truth, victims.canaries),
        )

    cells: list[Cell] = []
    for head in depths:
        inverters = {
            kind: attacks.make_inverter(kind, model_config.hidden_size, victims.ids.shape[1])
            for kind in attacks.INVERTERS if kind in config.attacks
        }
        tail = None
        if "adapted-tail" in config.defenses and head > 0:
            train = long_maker.plain(chats[2 * third :], config.defense_windows)
            log.info("head %d: adapting the tail to noise", head)
            tail = defense.adapt_tail(
                shard, head, config.tail, head_states(shard, train.ids, [head])[head], train.ids, train.prefix,
                config.noises, epochs=config.defense_epochs, seed=config.seed,
            )
        for level, noise in enumerate(config.noises):
            seen = server_view(victim_cut[head], noise, config.seed + 1)[:, p:]
            results: dict[str, AttackResult] = {}
            if "embedding" in config.attacks:
                results["embedding"] = score(attacks.nearest_embedding(seen, embedding))
            if head in probes:
                results["probe"] = score(attacks.nearest(seen.flatten(0, 1), probes[head]).view(seen.shape[:2]))
            for kind, model in inverters.items():
                steps = config.inverter_steps if level == 0 else config.inverter_warm_steps
                attacks.train_inverter(
                    model, attacker_cut[head][:, p:], attacker.content, embedding, noise, steps, seed=config.seed + level
                )
                results[kind] = score(attacks.invert(model, seen, embedding))
            def ppl(clean_prefix: int = 0) -> float:
                return perplexity(
                    shard, head, utility_cut[head], held_out.ids, held_out.prefix, noise, config.seed + 2, clean_prefix
                )

            plain = ppl()
            defended = {}
            if "clean-prefix" in config.defenses and head > 0:
                defended["clean-prefix"] = ppl(held_out.prefix)
            if tail is not None:
                with defense.swapped_tail(shard, tail):
                    defended["adapted-tail"] = ppl()
            best, best_attack = _best(results)
            cells.append(Cell(
                head=head, noise=noise, perplexity=plain, perplexity_ratio=plain / baseline, defended=defended,
                attacks=results, best=best, best_attack=best_attack,
            ))
            log.info("head %d noise %g: recovery %.3f (%s), ppl %.1f %s", head, noise, best.token_recovery, best_attack, plain, defended)
    return AuditReport(config=config, num_layers=num_layers, baseline_perplexity=baseline, cells=cells,
                       wall_s=time.perf_counter() - start, cpu_s=time.process_time() - cpu_start)

"""The frontier audit on the tiny random model: the adaptive attacker, the private
adapter's split, task utility through the serving path and the serving-default report."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from audit import tasks
from audit.capture import head_states, server_view
from audit.config import AuditConfig
from audit.frontier import Setting, _inverter_attacks, run_frontier
from audit.obfuscator import train_obfuscator
from audit.run import _Sweep
from fedsea.cli import main
from fedsea_shared import defaults

SMALL = dict(window=32, victim_windows=16, utility_windows=2, utility_window=16, inverter_steps=20, inverter_warm_steps=0)


@pytest.fixture(scope="module")
def adapted(tiny_model_dir, tmp_path_factory):
    """The device's obfuscator (trained on chat) and the attacker's shadow (its own BBC
    text, another seed, the real server-side adapter held fixed)."""
    sweep = _Sweep(AuditConfig(model=str(tiny_model_dir), heads=[2], attacker_windows=48, attacks=["probe"], **SMALL))
    out = tmp_path_factory.mktemp("obfuscator")
    chats = sweep.maker.plain(sweep.defense_chats, 32)
    real = train_obfuscator(sweep.shard, str(tiny_model_dir), 2, chats, 0.1, 100, out / "real", absorb=2, seed=1)
    shadow = train_obfuscator(sweep.shard, str(tiny_model_dir), 2, sweep.attacker, 0.1, 100, out / "shadow", absorb=2,
                              seed=2, server_from=real.server_dir)
    return sweep, real, shadow


def test_adaptive_attacker_beats_the_naive_one_against_the_adapter(adapted):
    sweep, real, shadow = adapted
    seen = server_view(head_states(real.edge_shard(sweep.shard), sweep.victims.ids, [2])[2], 0.1, 1)[:, sweep.victims.prefix:]
    naive = _inverter_attacks(sweep, 2, sweep.shard, seen, 0.1, "", [])["probe"].token_recovery
    adaptive = _inverter_attacks(sweep, 2, shadow.edge_shard(sweep.shard), seen, 0.1, "shadow-", [])["shadow-probe"].token_recovery
    known = _inverter_attacks(sweep, 2, real.edge_shard(sweep.shard), seen, 0.1, "known-", [])["known-probe"].token_recovery
    # The adapter hides the tokens from an attacker who assumes the public head...
    on_public_head = _inverter_attacks(sweep, 2, sweep.shard, server_view(sweep.victim_cut[2], 0.1, 1)[:, sweep.victims.prefix:],
                                       0.1, "", [])["probe"].token_recovery
    assert naive < on_public_head - 0.3
    # ...but not from one who trains a shadow copy, nor from one who holds the real adapter.
    assert adaptive > naive + 0.2
    assert known >= adaptive


def test_the_server_directory_holds_no_edge_block(adapted, tiny_model_dir):
    _, real, _ = adapted

    def blocks(d):
        with safe_open(str(d / "adapter_model.safetensors"), framework="pt") as f:
            return {int(k.split(".")[4]) for k in f.keys()}

    assert blocks(real.edge_dir) == {0, 1}
    assert blocks(real.server_dir) == {2, 3}


def test_task_utility_runs_through_the_serving_path(tiny_model_dir, adapted):
    _, real, _ = adapted
    p = tasks.prompts(2, 2, seed=0)
    assert [len(q) for q in p.classify.values()] == [2, 2] and len(p.chat) == 2
    ref, same, loud, adapted_ = tasks.measure(
        str(tiny_model_dir), 2, 2,
        [tasks.Serving(0.0), tasks.Serving(0.0, False), tasks.Serving(3.0), tasks.Serving(0.1, True, "obf")],
        p, adapters={"obf": (real.edge_dir, real.server_dir)},
    )
    assert set(ref.accuracy) == set(tasks.DEFAULT_TASKS)
    for task, hits in ref.hits.items():  # per query, for paired intervals
        assert len(hits) == 2 and ref.accuracy[task] == sum(hits) / 2
    assert same.agreement(ref) == 1.0  # noise 0 is the unsplit model, template exemption or not
    assert same.agreement_per_prompt(ref) == [1.0, 1.0]
    assert loud.agreement(ref) < 1.0
    # The edge's half and the server's half were each loaded and served under one name
    # (a side without it refuses the generation).
    assert set(adapted_.accuracy) == set(tasks.DEFAULT_TASKS) and len(adapted_.greedy) == 2


def test_few_shot_queries_stay_label_balanced_up_to_the_rarest_label():
    p = tasks.prompts(10_000, 0, seed=0, tasks=("bbc-topic", "bbc-lead"))
    for task, queries in p.classify.items():
        labels = [label for _, label in queries]
        per_label = {label: labels.count(label) for label in set(labels)}
        # BBC's rarest topic (entertainment) has 386 articles, one of them the shot.
        assert len(per_label) == 5 and set(per_label.values()) == {385}, (task, per_label)
        assert all(m[:-1] == queries[0][0][:-1] for m, _ in queries)  # the same shots before every query
    headline, lead = (p.classify[t][0][0][-1]["content"] for t in ("bbc-topic", "bbc-lead"))
    assert "Headline:" in headline and "Article:" in lead


def test_serving_default_json(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "default.json"
    main([
        "audit", "--model", str(tiny_model_dir), "--serving-default", "--json", str(out), "--attacks", "embedding", "probe", "vocab",
        "--attacker-windows", "8", "--victim-windows", "4", "--utility-windows", "2", "--task-prompts", "2", "--chat-prompts", "1",
    ])
    saved = json.loads(out.read_text())
    for key in ("token_recovery", "names_recovered", "numbers_recovered", "greedy_agreement"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["perplexity_ratio"] > 0 and -1.0 <= saved["task_accuracy_delta"] <= 1.0
    assert saved["setting"] == {"name": "serving-default", "head": defaults.HEAD, "noise": defaults.NOISE,
                                "public_template": defaults.PUBLIC_TEMPLATE, "obfuscator": 0.0,
                                "pseudonymize": defaults.PSEUDONYMIZE}
    attacks = saved["report"]["points"][0]["attacks"]
    assert saved["token_recovery"] == max(a["token_recovery"] for a in attacks.values())
    assert attacks["vocab"]["token_recovery"] >= attacks["probe"]["token_recovery"]  # the report has the strongest attack
    assert "| serving-default |" in capsys.readouterr().out


def test_cli_rejects_bad_frontier_input(tiny_model_dir):
    with pytest.raises(SystemExit) as exit_:
        main(["audit", "--model", str(tiny_model_dir), "--serving-default", "--task-prompts", "0"])
    assert "--task-prompts" in str(exit_.value)


def test_pseudonymized_victims_give_up_fewer_planted_names_than_plain_noise(tiny_model_dir):
    """The real pseudonymizer runs on the victims' text; leakage is scored against the
    original text, so a name counts only if the attacker writes the original."""
    config = AuditConfig(model=str(tiny_model_dir), heads=[2], attacker_windows=8, attacks=["embedding", "probe"], **SMALL)
    plain, pseudo = run_frontier(config, [Setting(name="noise", noise=0.1, pseudonymize=False),
                                          Setting(name="pseudonyms", noise=0.1, pseudonymize=True)], 1, 1).points
    assert plain.best.canary["name"] > 0.5 and plain.best.canary["number"] > 0.5  # the tiny head hides nothing
    assert pseudo.best.canary["name"] < plain.best.canary["name"] - 0.5
    assert pseudo.best.canary["number"] < plain.best.canary["number"] - 0.5
    assert pseudo.best.token_recovery < plain.best.token_recovery
    assert pseudo.detected["name"] > 0.5 and pseudo.detected["surrogates_read"] > 0.5  # it reads the surrogates instead

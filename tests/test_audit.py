"""`fedsea audit` on the tiny random model: orderings only, never absolute numbers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from audit import attacks, data, defense, metrics
from audit.capture import head_states, server_view
from audit.config import AuditConfig
from audit.report import plot, recommend, table
from audit.run import run_audit
from fedsea.cli import main
from fedsea_shared.noise import add_noise
from fedsea_shared.shard import load_shard

SMALL = dict(
    window=32, attacker_windows=24, victim_windows=8, utility_windows=4, utility_window=16,
    inverter_steps=20, inverter_warm_steps=10, defense_windows=8, defense_epochs=1,
)


@pytest.fixture(scope="module")
def report(tiny_model_dir):
    config = AuditConfig(
        model=str(tiny_model_dir), heads=[0, 2], noises=[0.0, 3.0], defenses=["clean-prefix", "adapted-tail"], **SMALL
    )
    return run_audit(config)


def cell(report, head, noise):
    return next(c for c in report.cells if c.head == head and c.noise == noise)


def test_embedding_layer_without_noise_is_read_back_almost_entirely(report):
    assert cell(report, 0, 0.0).attacks["embedding"].token_recovery > 0.95
    assert cell(report, 0, 0.0).best.canary == {"name": 1.0, "number": 1.0}


def test_more_noise_recovers_less(report):
    for head in (0, 2):
        quiet, loud = cell(report, head, 0.0), cell(report, head, 3.0)
        assert loud.best.token_recovery < quiet.best.token_recovery
        assert loud.best.rouge_l < quiet.best.rouge_l
        assert quiet.perplexity_ratio == pytest.approx(1.0, rel=1e-4)  # the split is exact without noise
        # A random model predicts nothing, so only check that the noise reaches the output.
        assert loud.perplexity != pytest.approx(quiet.perplexity, rel=1e-6)


def test_probe_matches_head_outputs_at_least_as_well_as_the_embedding_table(report):
    quiet = cell(report, 2, 0.0)
    assert quiet.attacks["probe"].token_recovery >= quiet.attacks["embedding"].token_recovery


def test_vocabulary_matching_in_context_is_at_least_as_strong_as_the_probe(report):
    """The candidates checked in context after the decoded prefix (Thomas et al.'s attack)
    recover at least what the fixed-prefix probe does, with and without noise."""
    for noise in (0.0, 3.0):
        c = cell(report, 2, noise)
        assert c.attacks["vocab"].token_recovery >= c.attacks["probe"].token_recovery
    assert cell(report, 2, 0.0).attacks["vocab"].token_recovery > 0.9  # exact states: read back


def test_prefix_and_tail_defenses_change_cost_not_leakage(report, tiny_model_dir):
    quiet, loud = cell(report, 2, 0.0), cell(report, 2, 3.0)
    assert set(loud.defended) == {"clean-prefix", "adapted-tail"}
    # Cost: at noise 3 each defense computes on different inputs (or weights) than plain noise.
    for name in ("clean-prefix", "adapted-tail"):
        assert loud.defended[name] != pytest.approx(loud.perplexity, rel=1e-6)
    assert quiet.defended["clean-prefix"] == pytest.approx(quiet.perplexity)  # nothing to exempt from
    assert cell(report, 0, 3.0).defended == {}  # head 0 is a reference, not a split
    # Leakage: the server's view of the user's own (scored) tokens is the same under
    # clean-prefix, and adapted-tail changes nothing the edge sends.
    shard = load_shard(tiny_model_dir, [0, 1], with_edge_parts=True)
    ids = torch.randint(0, 1000, (3, 10))
    clean = head_states(shard, ids, [2])[2]
    plain, exempt = server_view(clean, 3.0, 5), server_view(clean, 3.0, 5, clean_prefix=3)
    assert torch.equal(plain[:, 3:], exempt[:, 3:])
    assert torch.equal(exempt[:, :3], clean[:, :3]) and not torch.equal(plain[:, :3], clean[:, :3])


def test_report_outputs(report, tmp_path):
    text = table(report)
    assert text.count("\n") == len(report.cells) + 1
    json.loads(report.model_dump_json())
    plot(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert recommend(report, max_ppl_ratio=1e-3) is None  # nothing beats the unsplit model by 1000x
    least = min(c.best.token_recovery for c in report.cells if c.head > 0)
    for defense in (None, "clean-prefix", "adapted-tail"):
        chosen = recommend(report, max_ppl_ratio=1e9, defense=defense)
        assert chosen.head > 0 and chosen.best.token_recovery == least


def test_server_view_is_the_serving_noise(tiny_model_dir):
    shard = load_shard(tiny_model_dir, [0, 1], with_edge_parts=True)
    ids = torch.randint(0, 1000, (2, 6))
    clean = head_states(shard, ids, [1, 2])
    assert torch.equal(server_view(clean[2], 0.0, 0), clean[2])
    expected = add_noise(clean[2], 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(server_view(clean[2], 0.5, 3), expected)
    # The batched cut states equal running each window alone.
    alone = head_states(shard, ids[1:], [2])[2]
    torch.testing.assert_close(clean[2][1:], alone, rtol=1e-5, atol=1e-5)


def test_swapped_tail_restores_the_shard(tiny_model_dir):
    shard = load_shard(tiny_model_dir, list(range(6)), with_edge_parts=True)
    original = shard.model.layers["5"]
    replacement = torch.nn.ModuleDict({"5": torch.nn.Identity()})
    with pytest.raises(RuntimeError), defense.swapped_tail(shard, replacement):
        assert shard.model.layers["5"] is replacement["5"]
        raise RuntimeError
    assert shard.model.layers["5"] is original


def test_canaries_sit_where_the_windows_say(default_model_dir):
    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    w = data.WindowMaker(tok, 40).with_canaries(data.chitchat_conversations()[:50], 10, seed=1)
    assert w.ids.shape == (10, w.prefix + 40)
    for row, spans in zip(w.content, w.canaries):
        (name_kind, a, b), (num_kind, c, d) = spans
        assert (name_kind, num_kind) == ("name", "number")
        first, last = tok.decode(row[a:b]).split(maxsplit=1)
        assert first in data.FIRST_NAMES and last in data.LAST_NAMES
        assert tok.decode(row[c:d]).replace(" ", "").isdigit()


def test_metrics():
    assert metrics.lcs_length("abcbdab", "bdcaba") == 4
    assert metrics.rouge_l("the cat sat", "the cat sat") == 1.0
    assert metrics.rouge_l("a b", "c d") == 0.0
    assert metrics.rouge_l("the cat", "the cat sat down") == pytest.approx(2 * 1 * 0.5 / 1.5)
    guess, truth = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 9, 4]])
    assert metrics.token_recovery(guess, truth) == 0.75
    assert metrics.canary_recovery(guess, truth, [[("name", 0, 2), ("number", 1, 4)]]) == {"name": 1.0, "number": 0.0}


def test_nearest_is_cosine():
    table_ = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert attacks.nearest(torch.tensor([[10.0, 1.0], [0.1, 0.2]]), table_).tolist() == [0, 1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--heads", "5"], "leave no block for the server"),
        (["--noise", "-1"], "noise levels"),
        (["--attacks", "telepathy"], "unknown attacks"),
        (["--defenses", "hope"], "unknown defenses"),
    ],
)
def test_cli_rejects_bad_input(tiny_model_dir, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["audit", "--model", str(tiny_model_dir), *argv])
    assert message in str(exit_.value)


def test_cli_writes_json_and_plot(tiny_model_dir, tmp_path, capsys):
    main([
        "audit", "--model", str(tiny_model_dir), "--heads", "1", "--noise", "0", "1", "--attacks", "embedding", "probe",
        "--attacker-windows", "8", "--victim-windows", "4", "--utility-windows", "2", "--defense-windows", "4",
        "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"),
    ])
    out = capsys.readouterr().out
    assert "| head | noise |" in out and "recommendation" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [(c["head"], c["noise"]) for c in saved["cells"]] == [(1, 0.0), (1, 1.0)]
    assert (tmp_path / "r.png").exists()

"""The peer benchmark and the profile script: what they compute from their inputs (no server
is started and no timing is asserted)."""

from __future__ import annotations

from benchmarks.profile_serve import parse_raw
from benchmarks.step_trace import PHASES, cycles
from benchmarks.vs_peers import label, llamacpp_server, median_levels, ratios, vllm_server


def test_a_peer_that_is_not_set_up_is_skipped_with_its_setup_script(tmp_path):
    assert "setup_llamacpp.sh" in llamacpp_server(tmp_path, 2)
    assert "setup_vllm.sh" in vllm_server(tmp_path, 2)


def test_ratios_are_fedsea_over_each_peer_per_level_and_skip_skipped_peers():
    level = lambda tok_s, ttft: {"tok_s": tok_s, "mean_ttft_s": ttft}  # noqa: E731
    results = {
        "fedsea": {"1": level(10.0, 0.2), "8": level(30.0, 0.5)},
        "llamacpp": {"1": level(40.0, 0.05), "8": level(100.0, 0.1)},
        "vllm": "skipped: not set up",
    }
    r = ratios(results, [1, 8])
    assert set(r) == {"fedsea / llamacpp"}
    assert r["fedsea / llamacpp"]["1"] == {"tok_s": 0.25, "ttft": 4.0}
    assert r["fedsea / llamacpp"]["8"]["tok_s"] == 0.3


def test_each_weight_format_is_compared_with_the_peer_at_the_same_bits():
    level = lambda tok_s: {"1": {"tok_s": tok_s, "mean_ttft_s": 0.1}}  # noqa: E731
    results = {"fedsea": level(10.0), "fedsea int8": level(20.0), "fedsea int4": level(30.0),
               "llamacpp": level(40.0), "llamacpp int8": level(50.0), "llamacpp int4": level(60.0), "vllm": level(5.0)}
    r = ratios(results, [1])
    assert set(r) == {"fedsea / llamacpp", "fedsea / vllm", "fedsea int8 / llamacpp int8", "fedsea int4 / llamacpp int4"}
    assert r["fedsea int4 / llamacpp int4"]["1"]["tok_s"] == 0.5
    assert "Q8_0" in label("llamacpp int8") and "int4" in label("fedsea int4")


def test_a_missing_quantized_gguf_is_named_with_its_setup_script(tmp_path):
    (tmp_path / "llamacpp/bin").mkdir(parents=True)
    (tmp_path / "llamacpp/bin/llama-server").touch()
    (tmp_path / "llamacpp/smollm2-135m-instruct-f32.gguf").touch()
    missing = llamacpp_server(tmp_path, 2, weights="int4")
    assert "q4_0.gguf" in missing and "setup_llamacpp.sh" in missing


def test_profile_buckets_by_innermost_known_frame_per_thread(tmp_path):
    engine = ("thread (11): fedsea-engine;Thread.run (threading.py:982);Engine._loop (server_runtime/engine.py:99);"
              "ModelRunner._run (server_runtime/model_runner.py:121);DecoderBlock.forward (fedsea_shared/shard.py:155);"
              "MLP.forward (fedsea_shared/shard.py:246);Linear.forward (fedsea_shared/shard.py:150)")
    raw = tmp_path / "raw.txt"
    raw.write_text("\n".join([
        f"{engine} 7",
        "thread (11): fedsea-engine;Engine._loop (server_runtime/engine.py:99);Engine._collect (server_runtime/engine.py:115) 2",
        "thread (12): MainThread;BaseEventLoop.run_forever (asyncio/base_events.py:607);"
        "BaseEventLoop._run_once (asyncio/base_events.py:1884) 5",
        "thread (12): MainThread;AsyncEdgeClient._decode (edge_runtime/client.py:205);sample (edge_runtime/sampling.py:70) 3",
        "thread (13);Thread.run (threading.py:982) 1",  # py-spy leaves some threads unnamed
    ]))
    got = {k: dict(v) for k, v in parse_raw(raw).items()}
    assert got == {
        (11, "fedsea-engine"): {"MLP": 7, "engine loop": 2},
        (12, "MainThread"): {"event loop select() (waiting or runnable)": 5, "sampling": 3},
        (13, "unnamed"): {"thread pool / waiting": 1},
    }


def test_step_trace_splits_full_decode_cycles_into_phases():
    # Two cycles of 2 sessions (tick -> tail -> head -> tick), then a tick of one session
    # (a generation ended): only windows in which all sessions decode together count.
    tick, tail, head = "engine tick", "edge tail", "edge head"
    spans = [(tick, 0.0, 10.0, 2), (tail, 11.0, 14.0, 2), (head, 15.0, 16.0, 2),
             (tick, 18.0, 28.0, 2), (tail, 29.0, 31.0, 2), (head, 32.0, 33.0, 2),
             (tick, 35.0, 40.0, 1), (tail, 41.0, 42.0, 1)]
    found = cycles(spans[::-1], 2)  # in any order: sorted by start
    assert found == [dict(zip(PHASES, (10.0, 1.0, 3.0, 1.0, 1.0, 2.0)))]
    assert cycles(spans, 1) == []


def test_repeated_runs_report_each_numbers_median_per_level():
    run = lambda tok_s, ttft: {"8": {"clients": 8, "tok_s": tok_s, "mean_ttft_s": ttft, "loadavg": (tok_s,)}}  # noqa: E731
    got = median_levels([run(100.0, 0.3), run(160.0, 0.1), run(120.0, 0.2)])
    assert got["8"]["tok_s"] == 120.0 and got["8"]["mean_ttft_s"] == 0.2 and got["8"]["clients"] == 8
    assert got["8"]["loadavg"] == (120.0,)  # not a number: the last run's
    assert median_levels([run(7.0, 1.0)]) == run(7.0, 1.0)

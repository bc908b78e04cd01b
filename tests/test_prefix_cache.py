"""The server's prefix cache and forks: shared, reference-counted KV blocks.  Driven
through the engine's API and observed through the pool's stats() and /metrics."""

from __future__ import annotations

import hashlib
import random
from concurrent.futures import Future

import pytest
import torch

from fedsea_shared.prefix import PrefixHasher, prefix_root, run_key
from fedsea_shared.protocol import ProtocolError
from server_runtime.engine import EngineSettings
from conftest import metric

HIDDEN = 64
ROOT = prefix_root(6, HIDDEN, (2, 4), "float32", None)


def wait(fut: Future, timeout: float = 30):
    return fut.result(timeout=timeout)


def keys_of(hidden: torch.Tensor, root: bytes = ROOT) -> list[bytes]:
    hasher = PrefixHasher(root, 16)
    hasher.extend(hidden)
    return hasher.keys


def named(hidden: torch.Tensor, root: bytes = ROOT) -> tuple[list[bytes], list[bytes]]:
    """What an edge names for these states: the keys of their full blocks and the
    digests of the rows after them."""
    hasher = PrefixHasher(root, 16)
    hasher.extend(hidden)
    return hasher.keys, hasher.pending


def run(engine, key, hidden, prefix=(), root=ROOT, partial=()) -> tuple[int, torch.Tensor]:
    """Open (naming `prefix` and `partial`), send what the server lacks of `hidden`, return (cached, output)."""
    cached = wait(engine.open(key, None, root, list(prefix), False, list(partial)))
    return cached, wait(engine.step(key, cached, hidden[cached:]))


def test_the_hasher_names_every_run_the_same_way_however_it_is_fed():
    torch.manual_seed(5)
    rows = torch.randn(40, HIDDEN)
    whole = PrefixHasher(ROOT, 16)
    blocks = whole.extend(rows)
    digests = [hashlib.blake2b(r.numpy().tobytes(), digest_size=16).digest() for r in rows]
    parent = ROOT
    for i, block in enumerate(blocks):
        d = digests[16 * i : 16 * (i + 1)]
        assert block.key == run_key(parent, d)
        assert list(block.partial_keys) == [run_key(parent, d[:r]) for r in range(1, 16)]
        parent = block.key
    assert whole.keys == [b.key for b in blocks] and len(whole.pending) == 8
    assert whole.pending_keys == [run_key(parent, digests[32 : 32 + r]) for r in range(1, 9)]
    assert whole.partial_keys(3) == whole.pending_keys[-3:] and whole.partial_keys(0) == []
    # Fed in pieces, from an adopted prefix (what a server takes up), or copied: the same chain.
    pieces = PrefixHasher(ROOT, 16)
    for lo, hi in ((0, 7), (7, 23), (23, 40)):
        pieces.extend(rows[lo:hi])
    adopted = PrefixHasher(ROOT, 16)
    adopted.adopt(whole.keys[:1], digests[16:21])
    adopted.extend(rows[21:40])
    twin = whole.copy()
    for h in (pieces, adopted, twin):
        assert h.keys == whole.keys and h.pending_keys == whole.pending_keys
    fresh = PrefixHasher(ROOT, 16)
    fresh.extend(torch.cat([rows, rows[:8]]))
    twin.extend(rows[:8])  # a copy goes on apart: the original's chain is untouched
    assert twin.keys == fresh.keys and len(whole.keys) == 2
    whole.extend(rows[:8])
    assert whole.keys == fresh.keys


def test_prefix_hit_is_bit_identical_to_a_miss(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir)
    engine = server.runtime.engine
    torch.manual_seed(0)
    history = torch.randn(45, HIDDEN)
    cached, first = run(engine, (0, 0), history)
    assert cached == 0
    wait(engine.close((0, 0)))  # its two full blocks stay cached
    cached, hit = run(engine, (0, 1), history, keys_of(history))
    assert cached == 32
    assert torch.equal(hit, first[32:])
    # Naming a prefix the server never received (other bytes) finds nothing.
    other = history.clone()
    other[20] += 1
    cached, miss = run(engine, (0, 2), other, keys_of(other))
    assert cached == 16 and not torch.equal(miss[-1], hit[-1])
    # Another adapter/dtype/cut gives another root: no hit across models.
    f16 = prefix_root(6, HIDDEN, (2, 4), "float16", None)
    cached, _ = run(engine, (0, 3), history, keys_of(history, f16), root=f16)
    assert cached == 0
    stats = server.runtime.pool.allocator.stats()
    assert stats["cached"] >= 2
    assert metric(server, "fedsea_prefix_cache_hit_tokens_total") == 48
    assert metric(server, "fedsea_prefix_cache_query_tokens_total") == 96


def test_a_prefix_ending_inside_a_block_is_taken_up_bit_identical(start_server, tiny_model_dir):
    # oneDNN's linears for every row count: they compute a row the same way in a 5-row tick
    # as in a 45-row one.  MKL's do not, nor does "mixed" (auto's choice where MKL wins at
    # few rows: MKL for the small tick, oneDNN for the reference); bit for bit is the
    # cache's promise for the same arithmetic, and the greedy tests cover the kernels.
    server = start_server(tiny_model_dir, linear_kernel="onednn")
    engine, pool = server.runtime.engine, server.runtime.pool.allocator
    reference = start_server(tiny_model_dir, linear_kernel="onednn").runtime.engine  # the same sessions, no cache hits
    torch.manual_seed(4)
    history = torch.randn(45, HIDDEN)  # two full blocks, then 13 rows in a third
    run(engine, (0, 0), history)
    # A session whose first 40 rows are those (a template, the previous turn) and the
    # rest its own takes up all 40 while the first still holds its block.
    mine, token = torch.cat([history[:40], torch.randn(5, HIDDEN)]), torch.randn(1, HIDDEN)
    _, expected = run(reference, (0, 0), mine)
    keys, partial = named(mine[:40])
    assert len(keys) == 2 and len(partial) == 8
    used = pool.stats()["used"]
    cached, hit = run(engine, (0, 1), mine, keys, partial=partial)
    assert cached == 40 and torch.equal(hit, expected[40:])
    assert pool.stats()["used"] == used + 1  # a private copy of the third block: it writes after row 40
    # The first session writes on in its block; the copy decodes as without any cache.
    wait(engine.step((0, 0), 45, torch.randn(1, HIDDEN)))
    expected_token = wait(reference.step((0, 0), 45, token))
    assert torch.equal(wait(engine.step((0, 1), 45, token)), expected_token)
    # Rows that differ in one place find only the whole blocks before it.
    other = mine.clone()
    other[35] += 1
    keys, partial = named(other[:40])
    assert run(engine, (0, 2), other, keys, partial=partial)[0] == 32
    # After they close, a session reuses the second one's 46 rows but for the last, whose
    # output it needs: its last, partly filled block had cached them as it went.
    for key in ((0, 0), (0, 1), (0, 2)):
        wait(engine.close(key))
    sequence = torch.cat([mine, token])
    keys, partial = named(sequence[:45])
    cached, again = run(engine, (0, 3), sequence, keys, partial=partial)
    assert cached == 45 and torch.equal(again, expected_token)
    assert metric(server, "fedsea_prefix_cache_hit_tokens_total") == 40 + 32 + 45


def test_fork_shares_blocks_and_copies_the_partial_one_on_write(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir)
    engine, pool = server.runtime.engine, server.runtime.pool.allocator
    torch.manual_seed(1)
    prompt, a, b = torch.randn(20, HIDDEN), torch.randn(1, HIDDEN), torch.randn(1, HIDDEN)
    # Reference: two independent sessions.
    ref = []
    for i, token in enumerate((a, b)):
        run(engine, (9, i), prompt)
        ref.append(wait(engine.step((9, i), 20, token)))
        wait(engine.close((9, i)))
    used = pool.stats()["used"]
    run(engine, (0, 0), prompt)
    assert wait(engine.fork((0, 1), (0, 0))) == 20
    assert pool.stats()["used"] == used + 2  # the fork shares both blocks
    out_a = wait(engine.step((0, 0), 20, a))
    out_b = wait(engine.step((0, 1), 20, b))
    assert pool.stats()["used"] == used + 3  # one copy of the shared, partly filled block
    assert torch.equal(out_a, ref[0]) and torch.equal(out_b, ref[1])
    with pytest.raises(ProtocolError) as info:
        wait(engine.fork((0, 2), (5, 5)))
    assert info.value.code.value == "unknown_session"


def test_eviction_takes_only_unreferenced_blocks(start_server, tiny_model_dir):
    # 8 KiB per block: 9 blocks (plus scratch).  One tenant (these keys) fills the pool: no quota.
    server = start_server(tiny_model_dir, kv_cache_memory="80KiB", kv_quota=1.0, engine=EngineSettings(wait_timeout=0.5))
    engine, pool = server.runtime.engine, server.runtime.pool.allocator
    assert pool.stats()["blocks"] == 9
    torch.manual_seed(2)
    held, dropped, token = torch.randn(40, HIDDEN), torch.randn(48, HIDDEN), torch.randn(1, HIDDEN)
    reference = start_server(tiny_model_dir).runtime.engine  # the same computation, no pressure
    run(reference, (0, 0), held)
    expected = wait(reference.step((0, 0), 40, token))

    run(engine, (0, 0), held)  # 3 blocks in use, 2 of them cached
    run(engine, (0, 1), dropped)
    wait(engine.close((0, 1)))  # 3 blocks, cached and evictable
    assert pool.stats()["evictable"] == 3
    run(engine, (0, 2), torch.randn(90, HIDDEN))  # needs 6 blocks: 3 free + 3 evicted
    stats = pool.stats()
    assert stats["evictions"] == 3 and stats["free"] == 0 and stats["evictable"] == 0
    # The session in use kept its blocks: it decodes exactly as without pressure ...
    assert torch.equal(wait(engine.step((0, 0), 40, token)), expected)
    # ... and a pool whose blocks are all in use refuses rather than evicting them.
    with pytest.raises(ProtocolError) as info:
        run(engine, (0, 3), dropped, keys_of(dropped))
    assert info.value.code.value == "capacity"
    wait(engine.close((0, 2)))
    cached, _ = run(engine, (0, 4), dropped, keys_of(dropped))
    assert cached == 0  # the evicted prefix is gone


def test_random_open_fork_close_evict_lifecycles_return_every_block(start_server, tiny_model_dir):
    server = start_server(tiny_model_dir, kv_cache_memory="160KiB", kv_quota=1.0, engine=EngineSettings(token_budget=8, wait_timeout=0.3))
    engine, pool = server.runtime.engine, server.runtime.pool.allocator
    blocks = pool.stats()["blocks"]
    rng = random.Random(0)
    torch.manual_seed(3)
    histories = [torch.randn(rng.randint(1, 70), HIDDEN) for _ in range(6)]
    open_: dict[tuple, int] = {}  # key -> tokens held
    for i in range(100):
        op = rng.random()
        if op < 0.4 or not open_:
            h = rng.choice(histories)
            key = (0, i)
            try:
                keys, partial = named(h[: rng.randint(0, len(h))]) if rng.random() < 0.7 else ([], [])
                cached = wait(engine.open(key, None, ROOT, keys, False, partial))
                open_[key] = cached
                if rng.random() < 0.8:
                    open_[key] += wait(engine.step(key, cached, h[cached:])).shape[0] if cached < len(h) else 0
            except ProtocolError as e:
                assert e.code.value == "capacity"
        elif op < 0.65:
            parent = rng.choice(list(open_))
            key = (1, i)
            try:
                open_[key] = wait(engine.fork(key, parent))
            except ProtocolError as e:  # the parent was preempted earlier: its edge would reopen it
                assert e.code.value == "preempted"
                continue
            if rng.random() < 0.5:
                try:
                    wait(engine.step(key, open_[key], torch.randn(rng.choice([1, 5, 20]), HIDDEN)))
                    open_[key] = None  # length no longer tracked: only closed from now on
                except ProtocolError as e:  # preempted: the newest running session gives way
                    assert e.code.value in ("capacity", "context_overflow", "preempted")
        else:
            key = rng.choice(list(open_))
            assert wait(engine.close(key))
            del open_[key]
        stats = pool.stats()
        assert stats["free"] + stats["evictable"] + stats["used"] == blocks
    for key in list(open_):
        wait(engine.close(key))
    stats = pool.stats()
    assert stats["used"] == 0 and stats["free"] + stats["evictable"] == blocks
    assert stats["evictable"] == stats["cached"] and stats["evictions"] > 0
    assert metric(server, "fedsea_kv_blocks_used") == 0

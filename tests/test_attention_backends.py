"""Every attention backend against the unpaged reference on the tiny model: prefill,
decode, mixed ticks (prefill chunks beside decode rows), blocks out of order, sessions of
different lengths, forked and prefix-shared blocks, a pool full of stale NaN.

The vllm backend runs only where vllm is installed (its own venv, see .ci/run); its
kernels need head_dim >= 32, hence a tiny model with head_dim 32 here."""

from __future__ import annotations

import importlib.util
import random
from concurrent.futures import Future

import pytest
import torch

from fedsea_shared import cpu_kernels
from fedsea_shared.prefix import Block, run_key
from fedsea_shared.shard import (Partition, causal_attention, fuse_projections, head_dim, load_server_shard,
                                 make_block_ops, use_block_ops)
from server_runtime.attention_backends import make_attention_backend, pool_layer_shape, resolve_backend
from server_runtime.kv_pool import BlockTable, KVPool
from server_runtime.model_runner import ModelRunner
from server_runtime.scheduler import Chunk, Session, StepWork
from server_runtime.tick_plan import TickPlan

from conftest import make_tiny_model

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
# (attention backend, decode attention) pairs for the exactness tests of other modules.
ATTENTION_BACKENDS = [
    pytest.param(("torch", "gather"), id="torch-gather"),
    pytest.param(("torch", "flex"), id="torch-flex"),
    pytest.param(("vllm", "auto"), id="vllm", marks=needs_vllm),
]
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("vllm", id="vllm", marks=needs_vllm)]
PARTITION = Partition(6, 2, 2)
BLOCK = 16  # vLLM's CPU kernels need a multiple of 16


@pytest.fixture(scope="module")
def shard(tmp_path_factory, default_model_dir):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny32"), default_model_dir, hidden_size=128,
                           num_attention_heads=4, num_key_value_heads=2)
    return load_server_shard(path, PARTITION)


@pytest.mark.parametrize("kind", [pytest.param("native", id="native"), pytest.param("vllm", id="vllm", marks=needs_vllm)])
def test_block_ops_compute_the_torch_forward(tmp_path, default_model_dir, kind):
    path = make_tiny_model(tmp_path, default_model_dir, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    reference, fused = load_server_shard(path, PARTITION), load_server_shard(path, PARTITION)
    fuse_projections([reference, fused])
    use_block_ops(fused, make_block_ops(kind, "cpu", torch.float32))
    attend = lambda layer, q, k, v: causal_attention(q, k, v, head_dim(reference.config) ** -0.5)
    for rows in (1, 9, 40, 80):  # 80: past the native kernels' rows, torch's ops again
        x, pos = torch.randn(rows, reference.config.hidden_size), torch.arange(rows)
        with torch.inference_mode():
            want, got = (s.run_blocks(PARTITION.server_layers, x, pos, attend) for s in (reference, fused))
        torch.testing.assert_close(got, want)
    grads = []  # training through the shard: torch's ops, which have a backward
    for s in (reference, fused):
        x = torch.randn(3, s.config.hidden_size, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        (s.run_blocks(PARTITION.server_layers, x, torch.arange(3), attend) ** 2).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0])


def make_pool(backend: str, shard, num_blocks: int) -> KVPool:
    cfg, d = shard.config, head_dim(shard.config)
    shape = pool_layer_shape(backend, num_blocks + 1, BLOCK, cfg.num_key_value_heads, d, torch.device("cpu"))
    return KVPool(len(PARTITION.server_layers), num_blocks, BLOCK, cfg.num_key_value_heads, d, torch.float32,
                  "cpu", shape)


class Sessions:
    """Sessions through one runner, each with the hidden states it received so far, and
    each tick's outputs checked against the middle blocks run unpaged over the whole
    history (plain causal attention, no pool)."""

    def __init__(self, runner: ModelRunner):
        self.runner, self.pool = runner, runner.pool
        self.sessions: dict[str, Session] = {}
        self.history: dict[str, torch.Tensor] = {}
        self.hidden_size = runner.shard.config.hidden_size
        self.worst = 0.0

    def open(self, name: str, table: BlockTable | None = None, history: torch.Tensor | None = None) -> None:
        self.sessions[name] = Session(name, table or BlockTable(BLOCK))
        self.history[name] = history if history is not None else torch.empty(0, self.hidden_size)

    def tick(self, steps: dict[str, int]) -> None:
        chunks = []
        for name, n in steps.items():
            s = self.sessions[name]
            self.pool.grow(s.table, n)
            hidden = torch.randn(n, self.hidden_size)
            chunks.append(Chunk(StepWork(s, hidden, s.table.num_tokens, Future()), 0, n))
            self.history[name] = torch.cat([self.history[name], hidden])
        outputs = self.runner.run(chunks)
        for c, out in zip(chunks, outputs):
            lo, hi = c.positions
            c.session.table.num_tokens = hi
            expected = self.reference(self.history[c.session.key])[lo:hi]
            torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4, msg=f"{c.session.key} at {lo}:{hi}")
            self.worst = max(self.worst, (out - expected).abs().max().item())

    def reference(self, hidden: torch.Tensor) -> torch.Tensor:
        scale = self.runner.scale
        return self.runner.shard.run_blocks(PARTITION.server_layers, hidden, torch.arange(hidden.shape[0]),
                                            lambda layer, q, k, v: causal_attention(q, k, v, scale))


@pytest.mark.parametrize("backend, fused", [pytest.param("torch", False, id="torch"),
                                             pytest.param("torch", True, id="torch-fused-decode"),
                                             pytest.param("vllm", False, id="vllm", marks=needs_vllm)])
def test_backend_matches_the_unpaged_reference(shard, backend, fused):
    """fused: the torch backend's gather decode reads short contexts with the fused CPU kernel."""
    torch.manual_seed(0)
    kernels = cpu_kernels.load() if fused else None
    assert not fused or kernels is not None, "the fused CPU kernels did not build"
    pool = make_pool(backend, shard, 48)
    pool.k.fill_(float("nan"))  # what closed sessions may leave in free blocks
    pool.v.fill_(float("nan"))
    # Blocks handed out out of order: take them all, give them back shuffled.
    taken = pool.allocator.allocate(48)
    pool.allocator.release(random.Random(0).sample(taken, 48))
    s = Sessions(ModelRunner(shard, PARTITION.server_layers, pool, attention_backend=backend, kernels=kernels))
    for name in "ABCD":
        s.open(name)
    s.tick({"A": 40, "B": 7, "C": 33})  # prefill, lengths on and off block boundaries
    s.tick({"A": 1, "B": 1, "C": 20, "D": 5})  # mixed: decode rows, a prompt's second chunk, a new prompt
    a, b = s.sessions["A"].table, s.sessions["B"].table
    s.open("E", pool.fork(b), s.history["B"])  # shares B's partly filled block: copy on first write
    partial = [run_key(b"a0", [bytes([i]) * 16 for i in range(n)]) for n in range(1, BLOCK)]
    pool.cache_blocks(a, 0, [Block(b"a0", ()), Block(b"a1", tuple(partial))])
    prefix = BlockTable(BLOCK)
    assert pool.share_prefix(prefix, [b"a0", b"a1", b"a2"]) == 2
    s.open("F", prefix, s.history["A"][: 2 * BLOCK])  # A's first two blocks, continued differently
    copied = BlockTable(BLOCK)
    assert pool.share_prefix(copied, [b"a0"]) == 1 and pool.share_partial(copied, partial[4], 5)
    s.open("H", copied, s.history["A"][: BLOCK + 5])  # and a copy of its second block's first 5 rows
    s.tick({"A": 1, "B": 1, "E": 1, "C": 1, "D": 1, "F": 3, "H": 2})
    assert s.sessions["E"].table.blocks[-1] != b.blocks[-1] and s.sessions["E"].table.blocks[:-1] == b.blocks[:-1]
    for _ in range(2):
        s.tick({name: 1 for name in "ABCDEFH"})  # decode only
    pool.free(s.sessions.pop("B").table)  # its blocks go back holding its K/V
    s.open("G")
    s.tick({"G": 18, "A": 1, "E": 1})
    s.tick({"G": 1, "C": 1})
    assert s.worst < 1e-4


def test_plan_lists_rows_lengths_slots_and_fresh_blocks():
    """The plain-data plan of a mixed tick: cu_seqlens, context lengths, the slot of each
    new token through its block table, and the blocks first written this tick."""
    tables = {"a": BlockTable(4, [7, 2], 4), "b": BlockTable(4, [3, 9], 0)}
    chunks = [Chunk(StepWork(Session(k, t), torch.zeros(n, 8), t.num_tokens, Future()), 0, n)
              for (k, t), n in zip(tables.items(), (1, 6))]
    plan = TickPlan.from_chunks(chunks, 4)
    assert plan.query_start == [0, 1, 7] and plan.seq_lens == [5, 6]
    assert [plan.is_decode(i) for i in range(2)] == [True, False] and not plan.all_decode
    assert plan.positions.tolist() == [4, 0, 1, 2, 3, 4, 5]
    assert plan.slot_mapping.tolist() == [2 * 4, 12, 13, 14, 15, 36, 37]
    assert plan.entered_blocks == [2, 3, 9]
    assert plan.padded_block_table().tolist() == [[7, 2], [3, 9]]
    assert plan.context_slots(0).tolist() == [28, 29, 30, 31, 8]


@needs_vllm
def test_vllm_refuses_what_its_kernels_cannot_run(shard):
    pool = KVPool(1, 4, 16, 2, 16, torch.float32, "cpu", pool_layer_shape("vllm", 5, 16, 2, 16, torch.device("cpu")))
    with pytest.raises(ValueError, match="head_dim 16"):
        make_attention_backend("vllm", pool, 0.25, 4)
    pool = KVPool(1, 4, 8, 2, 32, torch.float32, "cpu", pool_layer_shape("vllm", 5, 8, 2, 32, torch.device("cpu")))
    with pytest.raises(ValueError, match="multiple of 16"):
        make_attention_backend("vllm", pool, 0.25, 4)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_without_vllm_says_what_is_missing(shard):
    pool = make_pool("vllm", shard, 4)
    with pytest.raises(RuntimeError, match="needs vllm installed"):
        ModelRunner(shard, PARTITION.server_layers, pool, attention_backend="vllm")


def test_auto_picks_vllm_only_where_it_is_installed_and_its_kernels_fit():
    cpu = torch.device("cpu")
    installed = importlib.util.find_spec("vllm") is not None
    assert resolve_backend("auto", cpu, torch.float32, 16, 64) == ("vllm" if installed else "torch")
    assert resolve_backend("auto", cpu, torch.float32, 16, 16) == "torch"  # head_dim below its kernels
    assert resolve_backend("auto", cpu, torch.float32, 8, 64) == "torch"  # block size not a multiple of 16
    assert resolve_backend("torch", cpu, torch.float32, 16, 64) == "torch"

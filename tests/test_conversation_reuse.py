"""A conversation through a recording relay on a real websocket: across the turns of a
chat and the choices of n=3, no position of a shared prefix reaches the server in two
versions (so its noise cannot be averaged away), also when the server has lost what it
held and the edge re-sends it, while the content arrives noised; and later turns send
only their new tokens."""

from __future__ import annotations

import pytest
import torch

from edge_runtime import AsyncEdgeClient
from edge_runtime.sampling import SamplingParams
from fedsea_shared.noise import public_prefix_len
from fedsea_shared.protocol import Fork, Open, Step, decode


def sessions_of(frames: list[bytes]) -> dict[int, dict[int, bytes]]:
    """sid -> {position: the bytes of the state sent for it}, in the order sessions opened;
    a position sent twice in one session in two versions fails here already."""
    out: dict[int, dict[int, bytes]] = {}
    for frame in frames:
        message, tensor = decode(frame)
        if isinstance(message, (Open, Fork)):
            out[message.sid] = {}
        elif isinstance(message, Step):
            for (sid, pos, _), part in zip(message.rows, message.split(tensor)):
                for i, row in enumerate(part):
                    old = out[sid].setdefault(pos + i, row.numpy().tobytes())
                    assert old == row.numpy().tobytes()
    return out


def common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.fixture
def relay(start_server, record, tiny_model_dir):
    server = start_server(tiny_model_dir, noise_min=0.0)
    return server, record(server)


async def test_a_chat_and_its_choices_never_resend_a_prefix_in_a_new_version(relay, tiny_model_dir):
    server, relay = relay
    client = AsyncEdgeClient(relay.url, model=str(tiny_model_dir), noise=0.5, noise_key=b"s" * 32)
    chat = [{"role": "user", "content": "My name is Alice and I live at 12 Elm Street. What should I cook tonight?"}]
    turn1_prompt = client.chat_prompt(chat)
    turn1 = await client.generate(chat, max_tokens=12, temperature=0)
    chat += [{"role": "assistant", "content": turn1.text}, {"role": "user", "content": "Something with fish, please."}]
    turn2_prompt = client.chat_prompt(chat)
    relay.forget = True  # turn 2 re-sends turn 1's states: in the versions sent before
    turn2 = await client.generate(chat, max_tokens=12, temperature=0)
    relay.forget = False
    chat += [{"role": "assistant", "content": turn2.text}, {"role": "user", "content": "And a dessert?"}]
    turn3_prompt = client.chat_prompt(chat)
    choices = [SamplingParams(max_tokens=6, temperature=1.0, seed=s) for s in range(3)]
    texts: dict[int, list[int]] = {0: [], 1: [], 2: []}
    async for j, event in client.stream_choices(turn3_prompt, choices):
        texts[j].append(event.token_id)
    assert len({tuple(t) for t in texts.values()}) > 1  # the choices really are different samples

    sent = sessions_of(relay.frames)
    sids = list(sent)
    assert len(sids) == 5  # turn 1, turn 2, n=3 as one session and two forks
    assert sum(isinstance(decode(f)[0], Fork) for f in relay.frames) == 2
    seqs = {sids[0]: turn1_prompt + turn1.token_ids[:-1], sids[1]: turn2_prompt + turn2.token_ids[:-1]}
    for sid in sids[2:]:
        seqs[sid] = turn3_prompt + texts[sids.index(sid) - 2][:-1]
    shared_positions = 0
    for a in sids:
        for b in sids:
            if a < b:
                n = common(seqs[a], seqs[b])
                for pos in set(sent[a]) & set(sent[b]):
                    if pos < n:
                        assert sent[a][pos] == sent[b][pos], f"position {pos} sent in two versions"
                        shared_positions += 1
    assert shared_positions > 0
    # The prompt of n=3 went to the server once, in the parent session; the forks only
    # sent their own tokens.
    assert all(pos >= len(turn3_prompt) for sid in sids[3:] for pos in sent[sid])
    assert min(sent[sids[1]]) == 0
    # Turn 3 sent only what the server did not hold: every token of turn 2 it reuses, the
    # part of its last, partly filled block included.
    reused = min(common(seqs[sids[1]], turn3_prompt), len(turn3_prompt) - 1)
    assert reused % 16, "the reuse should end inside a block"
    assert min(sent[sids[2]]) == reused
    await client.aclose()

    # The content still arrives noised: compare with a clean head forward (noise 0).
    relay.frames.clear()
    clean_client = AsyncEdgeClient(relay.url, model=str(tiny_model_dir), noise=0.0, noise_key=b"s" * 32)
    await clean_client.generate(chat[:1], max_tokens=1)
    await clean_client.aclose()
    clean = next(iter(sessions_of(relay.frames).values()))
    noisy = sent[sids[0]]
    public = public_prefix_len(turn1_prompt, client.public_ids)  # the chat template's own tokens go clean
    assert 0 < public < len(turn1_prompt)
    for pos in range(len(turn1_prompt)):
        a = torch.frombuffer(bytearray(noisy[pos]), dtype=torch.float32)
        c = torch.frombuffer(bytearray(clean[pos]), dtype=torch.float32)
        if pos < public:
            assert torch.equal(a, c), pos
        else:
            assert (a - c).pow(2).mean().sqrt() > 0.3 * c.pow(2).mean().sqrt(), pos

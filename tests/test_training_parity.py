"""Split LoRA training computes the gradients of centralized LoRA: one step with noise 0,
one client, same adapter weights, same batch, against `peft` on the unsplit
`transformers` model, for the head, middle (server) and tail adapters."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from fedsea_shared.protocol import AdapterState, Hello, LoraSpec, OptimSpec, TrainJoin
from fedsea_shared.shard import Partition, load_config
from fedsea_shared.training import flatten, load_flat
from training.connection import ServerCheckpoint, TrainingConnection
from training.data import Example, padded
from training.edge import EdgeTrainer

LORA = LoraSpec(rank=4, alpha=8.0, dropout=0.0)
# grad_accum=2: one micro-batch leaves the gradients in place on both sides to inspect.
OPTIM = OptimSpec(lr=1e-3, grad_accum=2, total_steps=10)
TOLERANCE = dict(rtol=1e-4, atol=1e-6)  # float32; differences are summation order only


def _batch(seed: int) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    batch = []
    for n, prompt in ((11, 6), (7, 3), (16, 9)):
        ids = torch.randint(3, 1000, (n,), generator=g).tolist()
        batch.append(Example(ids, [j >= prompt for j in range(n)], prompt))
    return batch


def _randomize(params: dict[str, torch.nn.Parameter], seed: int) -> torch.Tensor:
    """Non-zero B (a fresh adapter has B=0, which would make the A gradients vanish)."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(flatten(params).numel(), generator=g) * 0.1
    load_flat(params, flat)
    return flat


@pytest.mark.parametrize("head,tail", [(2, 2), (1, 3)])
async def test_split_gradients_match_centralized_peft(tiny_model_dir, start_server, head, tail):
    config = load_config(tiny_model_dir)
    partition = Partition(config.num_hidden_layers, head, tail)
    server = start_server(tiny_model_dir, enable_training=True, head=head, tail=tail)
    trainer = EdgeTrainer(tiny_model_dir, partition, LORA, OPTIM, noise=0.0, seed=0)
    edge_flat = _randomize(trainer.params, 1)

    conn = await TrainingConnection.connect(server.url, _hello(config, partition))
    try:
        server_size = (await conn.join(_join(), resume=None)).params
        # Restart the job from a random server adapter: the resume path of train_join.
        await conn.leave()
        await conn.close()
        conn = await TrainingConnection.connect(server.url, _hello(config, partition))
        server_flat = torch.randn(server_size, generator=torch.Generator().manual_seed(2)) * 0.1
        state = torch.stack([server_flat, torch.zeros_like(server_flat), torch.zeros_like(server_flat)])[None]
        joined = await conn.join(_join(), resume=ServerCheckpoint(0, [AdapterState(name="shared", steps=0, micro=0)], state))
        assert joined.resumed
        batch = _batch(3)
        loss, stepped = await trainer.train_step(conn, batch)
        assert not stepped
        job = server.runtime.training.jobs[(None, "parity")]
        server_grads = {n: p.grad.clone() for n, p in job.optimizers["shared"].params.items()}
    finally:
        await conn.close()
    edge_grads = {n: p.grad.clone() for n, p in trainer.params.items()}

    # Centralized: peft LoRA on the full transformers model, same adapter weights.
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=0.0, target_modules=list(LORA.targets)))
    full = {n: p for n, p in model.named_parameters() if "lora_" in n}

    def peft_name(name: str) -> str:
        return "base_model.model." + name.replace(".weight", ".default.weight")

    with torch.no_grad():
        for names, flat in ((list(trainer.params), edge_flat), (list(server_grads), server_flat)):
            load_flat({n: full[peft_name(n)] for n in names}, flat)
    ids, mask, labels = padded(batch, pad_id=2)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    (out.loss / OPTIM.grad_accum).backward()

    assert loss == pytest.approx(out.loss.item(), rel=1e-5)
    for part, grads, layers in (
        ("head", edge_grads, partition.head_layers),
        ("tail", edge_grads, partition.tail_layers),
        ("middle", server_grads, partition.server_layers),
    ):
        names = [n for n in grads if int(n.split(".")[2]) in layers]
        assert names, part
        for name in names:
            reference = full[peft_name(name)].grad
            assert reference.abs().sum() > 0, name
            torch.testing.assert_close(grads[name], reference, **TOLERANCE, msg=lambda m: f"{part} {name}: {m}")


def _hello(config, partition) -> Hello:
    return Hello(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, layers=partition.server_range, dtype="float32")


def _join() -> TrainJoin:
    return TrainJoin(sid=0, job="parity", client=0, clients=1, mode="sequential", lora=LORA, optim=OPTIM, seed=0)


class _RecordingConnection:
    """Stands in for the server: keeps what a train step sends and answers with zeros."""

    def __init__(self):
        self.sent: list[torch.Tensor] = []

    async def forward(self, lengths, hidden, backward=True):
        self.sent.append(hidden.clone())
        return 1, torch.zeros_like(hidden)

    async def backward(self, sid, grad):
        return torch.zeros_like(grad), False


@pytest.mark.parametrize("public_template", [True, False])
async def test_training_sends_the_public_template_prefix_clean_and_the_rest_noised(tiny_model_dir, public_template):
    """As serving does: the chat template's public prefix (attention sink included) reaches
    the server un-noised, every row after it noised; with public_template off, all noised."""
    from transformers import AutoTokenizer

    from fedsea_shared.noise import public_prefix_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    public = public_prefix_ids(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi"}],
                                   tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[: len(public)] == public and len(public) > 1
    batch = [Example(ids, [j >= len(ids) - 3 for j in range(len(ids))], len(ids) - 3)] * 2
    partition = Partition(load_config(tiny_model_dir).num_hidden_layers, 2, 2)
    sent = {}
    for noise in (0.0, 0.5):
        trainer = EdgeTrainer(tiny_model_dir, partition, LORA, OPTIM, noise=noise, seed=0,
                              public_ids=public if public_template else None)
        conn = _RecordingConnection()
        await trainer.train_step(conn, batch)
        sent[noise] = conn.sent[0]
    same = (sent[0.5] == sent[0.0]).all(-1)  # per row: sent exactly as computed
    prefix = len(public) if public_template else 0
    for start in (0, len(ids)):  # both packed sequences
        assert same[start : start + prefix].all()
        assert not same[start + prefix : start + len(ids)].any()

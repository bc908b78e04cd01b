"""Attacks the server can mount on the hidden states it receives, cheapest first.

Every attack maps server-side states [N, T, H] to guessed token ids [N, T].  The model's
weights are public (the server holds the middle blocks of a public checkpoint), so the
attacker knows the embedding table and the edge's head blocks; what it lacks is the noise.

- `nearest_embedding`: cosine nearest neighbour in the embedding table.
- `nearest_probe`: cosine nearest neighbour among the head's outputs for every vocabulary
  token placed alone right after the chat prefix (a position-aware single-token probe).
- `vocabulary_matching`: per position, the probe table's nearest tokens are candidates;
  each is run through the head blocks after the text decoded so far, and the one whose
  output lies nearest the received state wins.  No training; a few candidate forwards per
  token.
- `train_inverter`: a learned inverter (per-token MLP or a small bidirectional transformer
  over the window) trained on the attacker's own text run through the public head blocks
  with noise of the same scale, as in the paper's collusion attack and BiSR.  It predicts a
  point in embedding space and is trained contrastively against the embeddings of the
  tokens in the batch, so it decodes over the whole vocabulary at the cost of a small one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedsea_shared.noise import add_noise
from fedsea_shared.shard import ModelShard


def nearest(queries: torch.Tensor, table: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the most cosine-similar row of `table` for each query. [N, H] -> [N]."""
    keys = F.normalize(table.float(), dim=-1)
    out = [
        (F.normalize(q.float(), dim=-1) @ keys.T).argmax(-1)
        for q in queries.split(chunk)
    ]
    return torch.cat(out)


def nearest_embedding(states: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    return nearest(states.flatten(0, 1), embedding).view(states.shape[:2])


def _causal_recording(cache: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    """An attention callback for one causal sequence that keeps each layer's keys and
    values in `cache` (the context later rows attend to)."""

    def attend(layer, q, k, v):
        cache[layer] = (k, v)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
        )
        return out.transpose(0, 1).reshape(q.shape[0], -1)

    return attend


def _each_after(cache: dict[int, tuple[torch.Tensor, torch.Tensor]], own: dict | None = None):
    """An attention callback where every row is a token of its own, right after the cached
    context: it attends to the context and to itself.  `own` collects the rows' keys and
    values per layer."""

    def attend(layer, q, k, v):
        if own is not None:
            own[layer] = (k, v)
        pk, pv = cache[layer]
        n = q.shape[0]
        keys = torch.cat([pk.expand(n, *pk.shape), k[:, None]], dim=1).transpose(1, 2)
        vals = torch.cat([pv.expand(n, *pv.shape), v[:, None]], dim=1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q[:, :, None], keys, vals, enable_gqa=True)
        return out.reshape(n, -1)

    return attend


@torch.no_grad()
def probe_table(shard: ModelShard, prefix_ids: list[int], depths: list[int], chunk: int = 8192) -> dict[int, torch.Tensor]:
    """Head output at each depth for every vocabulary token alone after the prefix.

    The prefix's keys and values are computed once and every candidate attends to them and
    to itself, so the table costs one token per vocabulary entry.  -> {depth: [V, H]}.
    """
    prefix = torch.tensor(prefix_ids)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    deepest = max(depths)
    shard.run_blocks(range(deepest), shard.embed(prefix), torch.arange(len(prefix)), _causal_recording(cache))
    attend_after_prefix = _each_after(cache)

    vocab = shard.model.embed_tokens.weight.shape[0]
    tables: dict[int, list[torch.Tensor]] = {d: [] for d in depths}
    for start in range(0, vocab, chunk):
        ids = torch.arange(start, min(vocab, start + chunk))
        hidden = shard.embed(ids)
        position = torch.full((len(ids),), len(prefix))
        done = 0
        for depth in sorted(depths):
            hidden = shard.run_blocks(range(done, depth), hidden, position, attend_after_prefix)
            done = depth
            tables[depth].append(hidden.clone())
    return {d: torch.cat(t) for d, t in tables.items()}


@torch.no_grad()
def vocabulary_matching(
    shard: ModelShard, depth: int, context_ids: list[int], states: torch.Tensor, table: torch.Tensor, k: int = 8,
) -> torch.Tensor:
    """Guess the tokens behind `states` [T, H], the server's view of the T positions right
    after `context_ids`, one position at a time.  `table`: the probe table at `depth`,
    rows L2-normalised.  The k tokens whose probe rows are most cosine-similar to a state
    are its candidates; each runs through the head blocks after the context and the guesses
    so far, and the one whose output is nearest (L2) to the state is the guess.  The probe
    alone places a token after a fixed prefix; this check puts it where it really stands.
    -> token ids [T]."""
    layers = range(depth)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    context = torch.tensor(context_ids, dtype=torch.long)
    shard.run_blocks(layers, shard.embed(context), torch.arange(len(context)), _causal_recording(cache))
    candidates = (F.normalize(states.float(), dim=-1) @ table.T).topk(min(k, table.shape[0]), dim=-1).indices
    guesses = []
    for t, (state, tokens) in enumerate(zip(states, candidates)):
        own: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        position = torch.full((len(tokens),), len(context) + t)
        out = shard.run_blocks(layers, shard.embed(tokens), position, _each_after(cache, own))
        best = int((out.float() - state.float()).pow(2).sum(-1).argmin())
        guesses.append(int(tokens[best]))
        for layer, (kk, vv) in own.items():  # the guess joins the context of the next position
            pk, pv = cache[layer]
            cache[layer] = (torch.cat([pk, kk[best : best + 1]]), torch.cat([pv, vv[best : best + 1]]))
    return torch.tensor(guesses, dtype=torch.long)


def vocabulary_matching_windows(shard: ModelShard, depth: int, contexts: torch.Tensor, states: torch.Tensor,
                                table: torch.Tensor) -> torch.Tensor:
    """`vocabulary_matching` of each window: contexts [B, P] token ids before states [B, T, H]
    (the public prefix the attacker knows); `table` the probe table at `depth` as built. -> [B, T]."""
    table = F.normalize(table.float(), dim=-1)
    return torch.stack([vocabulary_matching(shard, depth, ctx.tolist(), st, table) for ctx, st in zip(contexts, states)])


def _rms_normalise(x: torch.Tensor) -> torch.Tensor:
    # Cut states carry a few huge outlier dimensions; compare directions, not magnitudes.
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)


class _Inverter(nn.Module):
    def __init__(self):
        super().__init__()
        # Softmax temperature of the contrastive loss (log scale), learned with the rest.
        self.log_temp = nn.Parameter(torch.tensor(3.0))


class TokenMLP(_Inverter):
    """Per-token inverter: sees one hidden state, guesses its token."""

    def __init__(self, hidden: int):
        super().__init__()
        width = min(512, 2 * hidden)
        self.net = nn.Sequential(
            nn.LayerNorm(hidden), nn.Linear(hidden, width), nn.GELU(),
            nn.Linear(width, width), nn.GELU(), nn.Linear(width, hidden),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, H]
        return self.net(_rms_normalise(x))


class SequenceInverter(_Inverter):
    """Window inverter: a small bidirectional transformer, so each guess can use the
    neighbouring states (the server receives a whole prompt at once)."""

    def __init__(self, hidden: int, max_len: int, layers: int = 2):
        super().__init__()
        width = min(256, 2 * hidden)
        self.inp = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, width))
        self.pos = nn.Parameter(torch.zeros(max_len, width))
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(_rms_normalise(x)) + self.pos[: x.shape[1]]
        return self.out(self.encoder(h))


INVERTERS = ("mlp", "seq")


def make_inverter(kind: str, hidden: int, max_len: int) -> _Inverter:
    if kind == "mlp":
        return TokenMLP(hidden)
    if kind == "seq":
        return SequenceInverter(hidden, max_len)
    raise ValueError(f"unknown inverter {kind!r}; choose from {INVERTERS}")


def contrastive_logits(model: _Inverter, x: torch.Tensor, targets: torch.Tensor, keys: torch.Tensor):
    """The inverter's logits over the distinct tokens of the batch, and the true token's
    index: (logits [B*T, C], labels [B*T]).  `keys`: the L2-normalised embedding table."""
    cands, labels = torch.unique(targets.reshape(-1), return_inverse=True)
    pred = F.normalize(model(x).reshape(-1, x.shape[-1]), dim=-1)
    return pred @ keys[cands].T * model.log_temp.exp(), labels


def train_inverter(
    model: _Inverter,
    clean: torch.Tensor,
    targets: torch.Tensor,
    embedding: torch.Tensor,
    noise: float,
    steps: int,
    batch: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
) -> _Inverter:
    """Train on the attacker's clean cut states [N, T, H] with fresh noise every step.

    The loss is a softmax over the embeddings of the distinct tokens in the batch (the
    hard negatives are the tokens that actually co-occur).  `model` may already be trained (e.g. at a lower noise), training continues from it.
    """
    gen = torch.Generator().manual_seed(seed)
    keys = F.normalize(embedding.float(), dim=-1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)  # linear decay to 0
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, clean.shape[0], (batch,), generator=gen)
        loss = F.cross_entropy(*contrastive_logits(model, add_noise(clean[rows], noise, gen), targets[rows], keys))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def invert(model: nn.Module, states: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    pred = torch.cat([model(s) for s in states.split(64)])
    return nearest(pred.flatten(0, 1), embedding).view(states.shape[:2])

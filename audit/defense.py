"""Defenses measured next to plain noise.  Neither changes what the server can read from
the user's own tokens at a given noise; each lowers what that noise costs, which moves
the leakage/utility curve.

- clean-prefix (in `capture.server_view`): leave the public chat-template tokens at the
  start of a prompt un-noised.  They carry nothing private (every prompt starts with
  them), but position 0 is the attention sink and carries huge outlier activations, so
  noise scaled to its RMS wrecks every later token's attention.
- adapted-tail (here): the edge owns its tail blocks, so it fine-tunes them to read the
  server's output of *noised* cut states.  Gradients never cross the server's blocks
  (they run without autograd): one forward of the model plus a backward through the
  tail and LM head per step.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from fedsea_shared.shard import ModelShard

from .capture import server_view
from .utility import cut_to_logits, next_token_nll


def tail_layers(shard: ModelShard, tail: int) -> list[int]:
    n = shard.config.num_hidden_layers
    return list(range(n - tail, n))


@contextlib.contextmanager
def swapped_tail(shard: ModelShard, blocks: nn.ModuleDict):
    """Run `shard` with `blocks` (keyed by layer index) in place of its own tail."""
    original = {name: shard.model.layers[name] for name in blocks}
    for name, block in blocks.items():
        shard.model.layers[name] = block
    try:
        yield shard
    finally:
        for name, block in original.items():
            shard.model.layers[name] = block


def adapt_tail(
    shard: ModelShard, head: int, tail: int, clean_cut: torch.Tensor, ids: torch.Tensor, prefix: int,
    noises: list[float], epochs: int = 2, batch: int = 8, lr: float = 1e-4, seed: int = 0,
) -> nn.ModuleDict:
    """Fine-tune copies of the tail blocks on windows `ids` (clean cut states given), each
    batch noised at the next level of `noises`, so one adapted tail serves all of them."""
    layers = tail_layers(shard, tail)
    blocks = nn.ModuleDict({str(i): copy.deepcopy(shard.model.layers[str(i)]) for i in layers})
    blocks.requires_grad_(True).train()
    opt = torch.optim.AdamW(blocks.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    with swapped_tail(shard, blocks):
        for _ in range(epochs):
            for rows in torch.randperm(ids.shape[0], generator=gen).split(batch):
                noise = noises[step % len(noises)]
                cut = server_view(clean_cut[rows], noise, seed + 7919 * step)
                logits = cut_to_logits(shard, head, cut, grad_from=layers[0])
                loss = next_token_nll(logits, ids[rows], prefix).sum() / (len(rows) * (ids.shape[1] - prefix))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(blocks.parameters(), 1.0)
                opt.step()
                step += 1
    return blocks.eval().requires_grad_(False)

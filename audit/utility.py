"""Utility at a noise setting: perplexity of the split model, noise only at the cut.

The whole model runs as one shard holding every block (the same `DecoderBlock` code the
edge and server run), cut after `head` blocks: head blocks, then the edge's noise, then
the server's blocks and the edge's tail, exactly the serving path.  (head=0 is allowed
here as a reference: what sending noised embeddings would cost.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedsea_shared.shard import ModelShard

from .capture import batched_causal_attend, server_view


def cut_to_logits(shard: ModelShard, head: int, cut: torch.Tensor, grad_from: int | None = None) -> torch.Tensor:
    """Server blocks + tail + LM head from the (noised) cut states [B, T, H] -> logits.

    Gradients flow only through blocks from `grad_from` on (None: nowhere), so adapting
    the edge's tail never backpropagates through the server's blocks.
    """
    b, t, _ = cut.shape
    attend = batched_causal_attend(b, t)
    positions = torch.arange(t).repeat(b)
    layers = shard.config.num_hidden_layers
    split = layers if grad_from is None else grad_from
    with torch.no_grad():
        hidden = shard.run_blocks(range(head, split), cut.reshape(b * t, -1), positions, attend)
    with torch.set_grad_enabled(grad_from is not None):
        hidden = shard.run_blocks(range(split, layers), hidden, positions, attend)
        return shard.logits(hidden).view(b, t, -1)


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Per-window summed NLL of the content tokens (each predicted from what precedes it)."""
    pred = logits[:, prefix - 1 : -1].float()
    return F.cross_entropy(pred.flatten(0, 1), ids[:, prefix:].flatten(), reduction="none").view(ids.shape[0], -1).sum(-1)


@torch.no_grad()
def perplexity(
    shard: ModelShard, head: int, clean_cut: torch.Tensor, ids: torch.Tensor, prefix: int,
    noise: float, seed: int, clean_prefix: int = 0, chunk: int = 8,
) -> float:
    """Perplexity over the content tokens of windows `ids`, given their clean cut states."""
    total = 0.0
    for start in range(0, ids.shape[0], chunk):
        cut = server_view(clean_cut[start : start + chunk], noise, seed + start, clean_prefix)
        logits = cut_to_logits(shard, head, cut)
        total += next_token_nll(logits, ids[start : start + chunk], prefix).sum().item()
    return math.exp(total / (ids.shape[0] * (ids.shape[1] - prefix)))

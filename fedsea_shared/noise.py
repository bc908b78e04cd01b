"""Gaussian noise the edge adds to every hidden state before it leaves the device.

Unit: `scale` is relative to each token's RMS.  A token whose hidden vector h has
rms(h) = sqrt(mean(h**2)) receives i.i.d. N(0, (scale * rms(h))**2) noise on every
dimension, so scale=1 means noise as large as the signal.  Per-token RMS (rather than a
per-dimension std) because hidden states have a few huge outlier dimensions that would
otherwise set the noise level for all the others.  scale=0 returns the input unchanged.
"""

from __future__ import annotations

import torch


def add_noise(hidden: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    if scale < 0:
        raise ValueError(f"noise scale must be >= 0, got {scale}")
    if scale == 0:
        return hidden
    rms = hidden.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
    noise = torch.randn(hidden.shape, generator=generator, dtype=torch.float32, device=hidden.device)
    return (hidden.float() + noise * rms * scale).to(hidden.dtype)


def public_prefix_len(prompt_ids: list[int], public_ids: list[int]) -> int:
    """How many leading positions of a prompt hold only public tokens, whose states may go
    un-noised: the whole public template prefix (e.g. the chat template's default system
    turn and `<|im_start|>user\\n`) if the prompt starts with all of it, else just position
    0 (the attention sink) if it is the template's first token, else none.  All-or-nothing
    on the template so that a custom system prompt that merely begins like the default one
    is not revealed word by word.  A state at position i depends on tokens 0..i only, so
    exempting these positions tells the server nothing it does not already know."""
    if public_ids and prompt_ids[: len(public_ids)] == public_ids:
        return len(public_ids)
    return 1 if public_ids and prompt_ids[:1] == public_ids[:1] else 0


def keep_public(noised: torch.Tensor, clean: torch.Tensor, start: int, public: int) -> torch.Tensor:
    """`noised` with the rows of positions < `public` put back to their clean values.

    Rows are positions start, start+1, ...  The attention sink (position 0) carries huge
    outlier activations, and noise scaled to them ruins every later token's attention,
    so sending the public prefix clean buys quality at no privacy cost.
    """
    k = max(0, min(public - start, clean.shape[0]))
    if k == 0 or noised is clean:
        return noised
    out = noised.clone()
    out[:k] = clean[:k]
    return out

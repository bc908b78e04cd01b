"""Gaussian noise the edge adds to every hidden state before it leaves the device.

Unit: `scale` is relative to each token's RMS.  A token whose hidden vector h has
rms(h) = sqrt(mean(h**2)) receives i.i.d. N(0, (scale * rms(h))**2) noise on every
dimension, so scale=1 means noise as large as the signal.  Per-token RMS (rather than a
per-dimension std) because hidden states have a few huge outlier dimensions that would
otherwise set the noise level for all the others.  scale=0 returns the input unchanged.

Keyed noise: the noise of the token at position p is a function of a secret edge key and
of everything that determines its hidden state (model, cut, scale, adapter, token ids
0..p).  The same prefix therefore always gets the same noise, so a server that sees a
conversation again (a later turn, another of n choices, a retry) sees the same noised
states again and cannot average the noise away; any change earlier in the prefix gives
independent noise.  `NoiseChain` computes the per-position digests as a running keyed
BLAKE2b chain, so a prompt of n tokens costs n small hashes.
"""

from __future__ import annotations

import hashlib

import torch

KEY_BYTES = 32


def add_noise(hidden: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    if scale < 0:
        raise ValueError(f"noise scale must be >= 0, got {scale}")
    if scale == 0:
        return hidden
    rms = hidden.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
    noise = torch.randn(hidden.shape, generator=generator, dtype=torch.float32, device=hidden.device)
    return (hidden.float() + noise * rms * scale).to(hidden.dtype)


class NoiseChain:
    """Running keyed hash over one sequence's token ids: digest p names the prefix 0..p."""

    def __init__(self, key: bytes, model: str, cut: tuple[int, int], scale: float, adapter: str | None):
        if len(key) != KEY_BYTES:
            raise ValueError(f"the edge noise key must be {KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        context = f"fedsea-noise-v1|{model}|{cut[0]},{cut[1]}|{float(scale).hex()}|{adapter or ''}".encode()
        self.state = self._hash(context)
        self.length = 0  # tokens folded in so far

    def _hash(self, data: bytes) -> bytes:
        return hashlib.blake2b(data, key=self._key, digest_size=32).digest()

    def extend(self, token_ids: list[int]) -> list[bytes]:
        """Fold in the next tokens; return one digest per token."""
        out = []
        for t in token_ids:
            self.state = self._hash(self.state + int(t).to_bytes(8, "little", signed=False))
            out.append(self.state)
        self.length += len(token_ids)
        return out

    def seek(self, state: bytes, length: int) -> None:
        """Continue after a stored prefix: `state` is the digest of its last token."""
        self.state, self.length = state, length

    def fork(self) -> "NoiseChain":
        twin = object.__new__(NoiseChain)
        twin._key, twin.state, twin.length = self._key, self.state, self.length
        return twin


def add_keyed_noise(hidden: torch.Tensor, scale: float, digests: list[bytes]) -> torch.Tensor:
    """Noise row i of `hidden` with a generator seeded by digests[i]."""
    if len(digests) != hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states but {len(digests)} noise digests")
    if scale < 0:
        raise ValueError(f"noise scale must be >= 0, got {scale}")
    if scale == 0:
        return hidden
    gen = torch.Generator()
    noise = torch.empty(hidden.shape, dtype=torch.float32)
    for i, d in enumerate(digests):
        gen.manual_seed(int.from_bytes(d[:8], "little") & (2**63 - 1))
        noise[i] = torch.randn(hidden.shape[1:], generator=gen, dtype=torch.float32)
    rms = hidden.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
    return (hidden.float() + noise.to(hidden.device) * rms * scale).to(hidden.dtype)


def public_prefix_ids(tokenizer) -> list[int]:
    """Token ids the chat template puts before the first user message's content."""
    sentinel = "\x00fedsea-user-content\x00"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False)
    except ValueError:  # no chat template: nothing is known to be public
        return []
    return tokenizer(text[: text.index(sentinel)], add_special_tokens=False).input_ids


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

"""The server's view: exactly the hidden states an edge sends for a batch of prompts.

The audit reuses the serving code path: the edge's shard runs its head blocks
(`ModelShard.run_blocks`) and `fedsea_shared.noise.add_noise` noises the result, as
`edge_runtime.session` does before anything leaves the device.  Only attention differs:
the edge attends over its per-sequence cache, here whole windows of equal length are run
at once with plain causal attention, which computes the same values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedsea_shared.noise import add_noise
from fedsea_shared.shard import ModelShard


def batched_causal_attend(batch: int, length: int):
    """An `AttentionFn` for `batch` independent sequences of `length` tokens, flat."""

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        def split(x: torch.Tensor) -> torch.Tensor:  # [B*T, h, d] -> [B, h, T, d]
            return x.view(batch, length, x.shape[1], x.shape[2]).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(batch * length, -1)

    return attend


@torch.no_grad()
def head_states(
    shard: ModelShard, token_ids: torch.Tensor, depths: list[int], chunk: int = 64
) -> dict[int, torch.Tensor]:
    """Clean hidden states after each head depth in `depths` (0 = the embedding itself).

    token_ids: [N, T] windows -> {depth: [N, T, H]}.  One pass through the deepest head;
    the shallower cuts are read off on the way, so a sweep over depths costs one forward.
    """
    n, t = token_ids.shape
    out: dict[int, list[torch.Tensor]] = {d: [] for d in depths}
    positions = torch.arange(t)
    for start in range(0, n, chunk):
        ids = token_ids[start : start + chunk]
        b = ids.shape[0]
        attend = batched_causal_attend(b, t)
        pos = positions.repeat(b)
        hidden = shard.embed(ids.reshape(-1))
        done = 0
        for depth in sorted(depths):
            hidden = shard.run_blocks(range(done, depth), hidden, pos, attend)
            done = depth
            out[depth].append(hidden.view(b, t, -1).clone())
    return {d: torch.cat(v) for d, v in out.items()}


def server_view(clean: torch.Tensor, noise: float, seed: int, clean_prefix: int = 0) -> torch.Tensor:
    """What the server receives: the clean cut states [B, T, H] noised exactly as in serving.

    `clean_prefix` > 0 leaves that many leading positions un-noised: the clean-prefix
    defense (see audit.defense), for prompts that start with public template tokens.
    """
    noised = add_noise(clean, noise, torch.Generator().manual_seed(seed))
    if clean_prefix and noise > 0:
        noised[:, :clean_prefix] = clean[:, :clean_prefix]
    return noised

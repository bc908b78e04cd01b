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

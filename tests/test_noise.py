from __future__ import annotations

import pytest
import torch

from fedsea_shared.noise import add_noise


def test_zero_noise_is_exactly_the_input():
    h = torch.randn(5, 32)
    assert add_noise(h, 0.0) is h


def test_noise_is_relative_to_each_tokens_rms():
    # Two tokens with very different magnitudes (and one outlier dimension) get noise
    # proportional to their own RMS.
    h = torch.zeros(2, 4096)
    h[0] = 1.0
    h[1] = 100.0
    h[1, 0] = 5000.0
    scale = 0.5
    noise = add_noise(h, scale, torch.Generator().manual_seed(0)) - h
    rms = h.pow(2).mean(-1).sqrt()
    std = noise.std(dim=-1)
    torch.testing.assert_close(std, scale * rms, rtol=0.05, atol=0)


def test_seeded_noise_is_reproducible_and_unseeded_differs():
    h = torch.randn(3, 64)
    a = add_noise(h, 1.0, torch.Generator().manual_seed(7))
    b = add_noise(h, 1.0, torch.Generator().manual_seed(7))
    c = add_noise(h, 1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_negative_scale_is_refused():
    with pytest.raises(ValueError):
        add_noise(torch.ones(1, 4), -0.1)


def test_noise_keeps_the_dtype():
    h = torch.randn(2, 16, dtype=torch.bfloat16)
    assert add_noise(h, 0.3).dtype == torch.bfloat16

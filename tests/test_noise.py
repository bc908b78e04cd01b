from __future__ import annotations

import os
import stat

import pytest
import torch

from edge_runtime.keys import load_or_create_key
from fedsea_shared.noise import NoiseChain, add_keyed_noise, add_noise


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


def chain(key=b"k" * 32, scale=0.5, adapter=None):
    return NoiseChain(key, "model|6|64", (2, 2), scale, adapter)


def test_keyed_noise_follows_the_prefix():
    ids = [5, 9, 2, 7, 7, 1]
    a, b = chain().extend(ids), chain().extend(ids[:3]) + chain().extend([])
    assert a[:3] == b  # same prefix, same digests
    changed = chain().extend([6] + ids[1:])
    assert all(x != y for x, y in zip(a, changed))  # a change at 0 changes every later position
    running = chain()
    assert running.extend(ids[:2]) + running.extend(ids[2:]) == a  # a running chain, O(1) per token
    for other in (chain(key=b"j" * 32), chain(scale=0.3), chain(adapter="legal")):
        assert other.extend(ids)[0] != a[0]
    h = torch.randn(6, 64)
    assert torch.equal(add_keyed_noise(h, 0.5, a), add_keyed_noise(h, 0.5, a))
    assert add_keyed_noise(h, 0.0, a) is h
    with pytest.raises(ValueError):
        add_keyed_noise(h, 0.5, a[:5])
    with pytest.raises(ValueError):
        NoiseChain(b"short", "m", (2, 2), 0.5, None)


def test_edge_key_is_made_once_private_and_checked(tmp_path):
    path = tmp_path / "cfg" / "fedsea" / "edge.key"
    key = load_or_create_key(path)
    assert len(key) == 32 and load_or_create_key(path) == key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(path.parent) == ["edge.key"]  # no temporary file left behind
    path.write_bytes(b"truncated")
    with pytest.raises(ValueError, match="delete it"):
        load_or_create_key(path)

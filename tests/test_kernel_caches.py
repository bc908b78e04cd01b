"""oneDNN's per-shape primitive caches are bounded in every process that runs fedsea's
linears (their default, 1024 shapes each, let a server's memory climb with every new prompt
length), and a deployment's own setting wins."""

from __future__ import annotations

import os
import subprocess
import sys

from fedsea_shared.layers.linear import ONEDNN_CACHED_SHAPES

CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
PROBE = "import os, fedsea_shared.layers.linear; print(*(os.environ[v] for v in %r))" % (CACHES,)


def capacities(**preset: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in CACHES} | preset
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_fedsea_bounds_the_caches_before_its_first_product():
    assert capacities() == [str(ONEDNN_CACHED_SHAPES)] * 2


def test_an_operator_setting_wins():
    assert capacities(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", LRU_CACHE_CAPACITY="8") == ["1024", "8"]

"""Shared fixtures: a tiny random LLaMA checkpoint, the real default model, and
in-process server runtimes on free ports."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoConfig, AutoModelForCausalLM

# Every server, edge and subprocess a test starts stores float32 weights unless the test
# asks for a format: exactness against `transformers` is a float32 property, and auto picks
# int4 on CPUs with native bf16 (tests/test_weight_formats.py checks that policy).
os.environ["FEDSEA_WEIGHTS"] = "float32"
# A server preallocates its whole KV pool; the tests start about a hundred, several at a time
# (in each worker under -n 2), and at the product's 1GiB each a process held over 10 GB.
# 256MiB holds 6,600 tokens of the default model (tests that need a size ask for it).
os.environ["FEDSEA_KV_CACHE_MEMORY"] = "256MiB"

from fedsea_shared.models import DEFAULT_MODEL, resolve_model
from fedsea_shared.threads import run_here
from gateway import GatewaySettings, GatewayThread
from relay import RecordingRelay
from server_runtime.app import ServerSettings, ServerThread
from server_runtime.engine import EngineSettings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@pytest.fixture(autouse=True)
def _private_config_dir(tmp_path_factory, monkeypatch):
    """Edge noise keys go to a temporary config dir, never the real home."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct, converted once into the fedsea cache."""
    return resolve_model(DEFAULT_MODEL)


def make_tiny_model(path: Path, default_model_dir: Path, model_type: str = "llama", **overrides) -> Path:
    """A random 6-block model of the family `model_type` (LLaMA by default) with GQA that
    uses the default model's tokenizer.  Its biases, if any, are random too: transformers
    initialises them to zero, which would hide a bias a shard leaves out."""
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    cfg.update(overrides)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.5)
    model.save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, path / name)
    return path


def spy_safetensors(monkeypatch, module) -> list[str]:
    """Record the name of every tensor `module` reads whole through its `safe_open`."""
    read: list[str] = []
    real_open = module.safe_open

    class Spy:
        def __init__(self, *a, **kw):
            self.f = real_open(*a, **kw)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

        def get_slice(self, name):  # part of a tensor (not recorded: only whole reads are)
            return self.inner.get_slice(name)

    monkeypatch.setattr(module, "safe_open", Spy)
    return read


def metric(where, name: str) -> float:
    """An unlabelled sample's value from /metrics of a server runtime (a ServerThread or its
    ws:// URL) or a gateway (its http(s)://.../v1 URL)."""
    url = where if isinstance(where, str) else where.url
    base = url.replace("ws://", "http://", 1).replace("wss://", "https://", 1).removesuffix("/v1")
    for family in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    raise KeyError(name)


async def eventually(condition, timeout: float = 20, what: str = "the condition") -> None:
    """Poll `condition()` (run off the event loop: it may do HTTP) until true, under a
    deadline, instead of sleeping a guessed time and asserting once."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        await asyncio.sleep(0.02)


@pytest.fixture
def record():
    """Factory: record(server) -> a RecordingRelay in front of it; edges connect to its
    `.url`, and its `.frames` are every frame they sent, in order."""
    relays: list[RecordingRelay] = []

    def start(server) -> RecordingRelay:
        relays.append(RecordingRelay(server.url))
        return relays[-1]

    yield start
    for relay in relays:
        relay.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), default_model_dir)


@pytest.fixture
def start_server():
    """Factory: start_server(model_dir, head=, tail=, engine=, compute=, **settings) -> ServerThread."""
    servers: list[ServerThread] = []

    def start(model: Path | str, head: int = 2, tail: int = 2, engine: EngineSettings | None = None,
              compute=run_here, **kw) -> ServerThread:
        settings = ServerSettings(model=str(model), head=head, tail=tail, port=0, engine=engine or EngineSettings(), **kw)
        server = ServerThread(settings, compute)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def gw(tiny_model_dir):
    """One server runtime + gateway shared by the tests that need no special settings."""
    server = ServerThread(ServerSettings(model=str(tiny_model_dir), port=0))
    gateway = GatewayThread(GatewaySettings.of(server_url=server.url, model=str(tiny_model_dir), port=0))
    yield gateway.wait_ready()
    gateway.stop()
    server.stop()

"""Each default has one home, the settings classes: the CLI's flags read them, so `fedsea
server` and `fedsea gateway` without flags run exactly the library's defaults."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses

import pytest

from edge_runtime.client import AsyncEdgeClient
from edge_runtime.settings import EdgeSettings
from fedsea import cli
from gateway import GatewaySettings
from server_runtime.app import ServerSettings


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli._server_parser(sub)
    cli._gateway_parser(sub)
    cli._serve_parser(sub)
    return parser.parse_args(argv)


def test_fedsea_server_without_flags_runs_the_default_settings(monkeypatch):
    monkeypatch.delenv("FEDSEA_SERVER_API_KEYS", raising=False)
    assert cli.server_settings(_parse(["server"])) == ServerSettings()


@pytest.mark.parametrize("command", ["gateway", "serve"])
def test_fedsea_gateway_without_flags_runs_the_default_settings(monkeypatch, command):
    monkeypatch.delenv("FEDSEA_API_KEY", raising=False)
    got = cli.gateway_settings(_parse([command]), EdgeSettings.server_url)
    assert got == GatewaySettings()
    assert got.edge == EdgeSettings()


def test_flags_reach_the_settings(monkeypatch):
    monkeypatch.delenv("FEDSEA_API_KEY", raising=False)
    args = _parse(["gateway", "--noise", "0.5", "--edge-cache-memory", "64MiB", "--no-lm-head-copy", "--port", "9"])
    got = cli.gateway_settings(args, ["ws://a:1", "ws://b:2"])
    assert (got.edge.noise, got.edge.edge_cache_memory, got.edge.lm_head_copy, got.port) == (0.5, 64 * 2**20, False, 9)
    assert got.edge.servers == ["ws://a:1", "ws://b:2"]
    server = cli.server_settings(_parse(["server", "--max-queued-bytes", "1MiB", "--training-memory", "1GiB",
                                         "--token-budget", "64", "--kv-quota", "0.25"]))
    assert (server.max_queued_bytes, server.training.memory, server.engine.token_budget, server.kv_quota) == \
        (2**20, 2**30, 64, 0.25)


def test_the_flat_constructor_sends_each_option_to_its_settings():
    s = GatewaySettings.of(server_url="ws://x:1", noise=0.3, port=0, api_key="k", server_api_key="s")
    assert (s.port, s.api_key, s.edge.noise, s.edge.server_api_key, s.edge.servers) == (0, "k", 0.3, "s", ["ws://x:1"])
    with pytest.raises(TypeError):
        GatewaySettings.of(no_such_option=1)


@pytest.mark.parametrize("bad, message", [
    (dict(noise=-0.1), "noise must be a finite number >= 0"),
    (dict(noise=float("nan")), "noise must be a finite number >= 0"),
    (dict(wire_dtype="int8"), "wire_dtype must be one of"),
    (dict(server_url=[]), "names no server runtime"),
])
def test_bad_edge_settings_are_refused_before_anything_loads(bad, message):
    with pytest.raises(ValueError, match=message):
        AsyncEdgeClient(**bad)


def test_an_edge_client_takes_settings_or_options(tiny_model_dir):
    settings = EdgeSettings(server_url="ws://127.0.0.1:1", model=str(tiny_model_dir), noise=0.2)
    client = AsyncEdgeClient(settings, noise=0.3)
    try:
        assert client.settings == dataclasses.replace(settings, noise=0.3) and settings.noise == 0.2
    finally:
        asyncio.run(client.aclose())

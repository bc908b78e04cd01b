"""The chat page at `/` and the endpoints it calls (/fedsea/v1/inspect, /fedsea/v1/status),
through HTTP against a real server runtime (tiny random model)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from gateway import GatewaySettings, GatewayThread
from server_runtime.app import ServerSettings, ServerThread

NAME = "My name is Robert Miller and my number is 5551234. Write a poem about the sea."


@pytest.fixture(scope="module")
def gateways(tiny_model_dir):
    """Factory of ready gateways on one server runtime (`gateways.server`), all stopped at
    the end of the module."""
    server = ServerThread(ServerSettings(model=str(tiny_model_dir), port=0))
    started: list[GatewayThread] = []

    def start(**kw) -> GatewayThread:
        gw = GatewayThread(GatewaySettings(server_url=server.url, model=str(tiny_model_dir), port=0, **kw))
        started.append(gw)
        return gw.wait_ready()

    start.server = server
    yield start
    for gw in started:
        gw.stop()
    server.stop()


@pytest.fixture(scope="module")
def gw(gateways):
    return gateways()


def root(gw: GatewayThread) -> str:
    return gw.url.removesuffix("/v1")


def inspect(gw: GatewayThread, content: str = NAME, key: str | None = None, **extra) -> httpx.Response:
    body = {"model": gw.settings.model_id, "messages": [{"role": "user", "content": content}], **extra}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(root(gw) + "/fedsea/v1/inspect", json=body, headers=headers, timeout=120)


# ---- the page ---------------------------------------------------------------------------


def test_page_has_a_strict_policy_and_only_local_assets(gw):
    r = httpx.get(root(gw) + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["connect-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'" and r.headers["x-content-type-options"] == "nosniff"
    assert "access-control-allow-origin" not in r.headers  # other sites' pages get no access to the API
    html = r.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the page names another origin"
    assert "<script>" not in html and "<style" not in html and not re.search(r"\son[a-z]+=", html)  # nothing inline
    assets = re.findall(r"""(?:src|href)="(static/[^"]+)""", html)
    assert {"static/chat.js", "static/chat.css", "static/vendor/marked.umd.js", "static/vendor/purify.min.js"} <= set(assets)
    for path in assets:
        a = httpx.get(f"{root(gw)}/{path}")
        assert a.status_code == 200 and a.content, path
        assert a.headers["content-security-policy"] == r.headers["content-security-policy"]
    js = httpx.get(root(gw) + "/static/chat.js").text
    assert "http://" not in js and "https://" not in js  # relative URLs only: works behind https
    assert "DOMPurify.sanitize" in js and "Bearer" in js


def test_status_says_what_the_strip_shows_and_no_secrets(gateways):
    gw = gateways(api_key="s3cret", server_api_key="server-s3cret")
    headers = {"Authorization": "Bearer s3cret"}
    s = httpx.get(root(gw) + "/fedsea/v1/status", headers=headers).json()
    assert s["ready"] and s["noise"] == gw.settings.noise and s["pseudonymize"] is True and s["auth"] is True
    assert s["servers"] == [{"url": gateways.server.url, "tls": False, "connected": True}] and s["api_tls"] is False
    assert s["split"]["server_layers"] == [2, 4] and s["models"] == [gw.settings.model_id]
    assert "s3cret" not in str(s)


# ---- what the server saw ----------------------------------------------------------------


def test_inspect_counts_match_the_sent_text(gw):
    r = inspect(gw)
    assert r.status_code == 200, r.text
    report = r.json()
    client = gw.backend.client
    text = report["sent_text"]
    assert "Robert" not in text and "5551234" not in text  # the surrogates went instead
    spans = {s["kind"]: s for s in report["spans"]}
    assert spans["first"]["text"] == "Robert" and spans["number"]["text"] == "5551234"
    for s in report["spans"]:
        assert text[s["start"] : s["end"]] == s["surrogate"] != s["text"]
    # What /v1/chat/completions would send: the same tokens, one state per token.
    ids = client.chat_prompt([{"role": "user", "content": NAME}])
    assert report["states"] == len(ids) == len(client.tokenizer(text, add_special_tokens=False).input_ids)
    assert report["bytes"] == report["states"] * client.config.hidden_size * 4  # float32 on the wire
    m = report["message"]
    assert text[m["start"] : m["end"]].startswith("My name is") and 0 < m["states"] < report["states"]
    assert report["reconstruction"] is None  # only on request


def test_reconstruction_reads_more_without_noise(gateways):
    shares = {}
    for noise in (0.0, 4.0):
        report = inspect(gateways(noise=noise), reconstruct=True).json()
        rec = report["reconstruction"]
        assert rec["positions"] == report["message"]["states"] == len(rec["tokens"])
        assert 0.0 <= rec["recovered"] <= 1.0
        assert rec["recovered"] == sum(t["ok"] for t in rec["tokens"]) / rec["positions"]
        shares[noise] = rec["recovered"]
    assert shares[0.0] > 0.9 and shares[0.0] > shares[4.0], shares


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "user", "content": "hi"}], "reconstruct": "maybe"},
    {"messages": "hi"},
])
def test_inspect_refuses_bad_input_and_keeps_serving(gw, body):
    r = httpx.post(root(gw) + "/fedsea/v1/inspect", json={"model": gw.settings.model_id, **body})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    too_long = inspect(gw, "word " * 200_000)
    assert too_long.status_code == 400
    assert inspect(gw, "hello").status_code == 200


def test_inspect_unknown_model_is_404(gw):
    r = httpx.post(root(gw) + "/fedsea/v1/inspect", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404


def test_api_key_guards_the_api_not_the_page(gateways):
    gw = gateways(api_key="s3cret")
    assert httpx.get(root(gw) + "/").status_code == 200
    assert httpx.get(root(gw) + "/static/chat.js").status_code == 200
    assert httpx.get(root(gw) + "/fedsea/v1/status").status_code == 401
    assert inspect(gw).status_code == 401
    assert inspect(gw, key="wrong").status_code == 401
    assert inspect(gw, key="s3cret").status_code == 200


# ---- a real browser (optional: skipped without Debian's chromium) -------------------------


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium on this machine")
def test_page_renders_in_chromium(gw, tmp_path: Path):
    """The page's script runs under its policy: it fills the status strip and the model picker."""
    out = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
         "--dump-dom", root(gw) + "/"],
        capture_output=True, text=True, timeout=120,
    )
    dom = out.stdout
    assert "Noise" in dom and "Pseudonyms" in dom, out.stderr[-2000:]
    assert f'<option value="{gw.settings.model_id}"' in dom

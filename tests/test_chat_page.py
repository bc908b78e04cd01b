"""The chat page at `/` and the endpoints it calls (/fedsea/v1/inspect, /fedsea/v1/status),
through HTTP against a real server runtime (tiny random model)."""

from __future__ import annotations

import json
import os
import re
import ssl
import struct
import time
from pathlib import Path

import httpx
import pytest
import trustme

import browser

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
        gw = GatewayThread(GatewaySettings.of(server_url=server.url, model=str(tiny_model_dir), port=0, **kw))
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
    body = {"model": gw.settings.edge.model_id, "messages": [{"role": "user", "content": content}], **extra}
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
    assert s["ready"] and s["noise"] == gw.settings.edge.noise and s["pseudonymize"] is True and s["auth"] is True
    assert s["servers"] == [{"url": gateways.server.url, "tls": False, "connected": True}] and s["api_tls"] is False
    assert s["split"]["server_layers"] == [2, 4] and s["models"] == [gw.settings.edge.model_id]
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


def test_inspect_places_surrogates_when_the_template_strips_the_message(gw):
    report = inspect(gw, "  Call Robert at 5551234.  \n").json()
    text, spans = report["sent_text"], report["spans"]
    assert [s["text"] for s in spans] == ["Robert", "5551234"]
    assert all(text[s["start"] : s["end"]] == s["surrogate"] for s in spans)
    assert report["message"]["states"] > 0


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
    r = httpx.post(root(gw) + "/fedsea/v1/inspect", json={"model": gw.settings.edge.model_id, **body})
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


# ---- in a real browser: Debian's chromium and chromium-driver, through Selenium -------------

needs_browser = pytest.mark.skipif(browser.MISSING is not None, reason=f"{browser.MISSING} here")
ANSWER = "document.querySelector('.msg.assistant:last-of-type .body').textContent"


def shots_dir(tmp_path: Path) -> Path:
    """Where the screenshots go: $FEDSEA_SCREENSHOTS (to keep them), else the test's tmp dir."""
    out = Path(os.environ.get("FEDSEA_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


@needs_browser
def test_chat_streams_stops_and_shows_what_the_server_saw(gw, tmp_path):
    with browser.browser(tmp_path / "profile") as page:
        page.open(root(gw) + "/")
        page.wait("document.querySelectorAll('#model option').length")
        page.wait("document.getElementById('status').textContent.includes('Pseudonyms on')")
        page.js("(() => { const m = document.getElementById('max_tokens'); m.value = '1500';"
                " m.dispatchEvent(new Event('change')); })()")
        page.type_and_enter("#prompt", NAME)
        page.wait("!document.getElementById('stop').hidden")
        lengths = []  # the answer's length at each poll: it grows token by token
        deadline = time.monotonic() + 60
        while len(set(lengths)) < 5 and time.monotonic() < deadline:
            lengths.append(page.js(f"({ANSWER}).length"))
            time.sleep(0.02)
        # Not strictly increasing: Markdown can shorten the text (`**` closing into bold).
        assert len(set(lengths)) >= 5 and lengths[-1] > lengths[0], lengths
        page.find("#stop").click()
        page.wait("!document.getElementById('send').hidden")
        assert "stopped" in page.js("document.querySelector('.msg.assistant .meta').textContent")
        assert len(page.js(ANSWER)) > 0

        surrogates = {s["text"]: s["surrogate"] for s in inspect(gw).json()["spans"]}
        page.find(".msg.user .seen-toggle").click()
        page.wait("document.querySelector('.seen mark')")
        marks = [m.text for m in page.find_all(".seen .sent mark")]
        assert surrogates["Robert"] in marks and surrogates["5551234"] in marks
        next(b for b in page.find_all(".seen button") if b.text.startswith("Reconstruct")).click()
        page.wait("document.querySelector('.seen .share')", timeout=120)
        assert re.match(r"[\d.]+% of this message's \d+ tokens", page.find(".seen .share").text)

        out = shots_dir(tmp_path)
        for width, height in ((1280, 800), (390, 844)):
            shot = out / f"chat-{width}x{height}.png"
            page.screenshot(shot, width, height)
            assert shot.read_bytes()[16:24] == struct.pack(">II", width, height)  # the PNG's own size
        assert (out / "chat-390x844.png").stat().st_size > 10_000
        assert page.requested_hosts() == {httpx.URL(root(gw)).netloc.decode()}  # nothing but the gateway
        assert page.errors() == []


@needs_browser
def test_untrusted_markdown_runs_nothing(gw, tmp_path):
    payload = ("<script>window.pwned = 1</script> <img src=x onerror=\"window.pwned = 2\"> "
               "[a link](javascript:window.pwned=3) <a href=\"JaVaScRiPt:window.pwned=4\">another</a>\n\n"
               "```python\nprint('hi')\n```\n\n- one\n- two\n")
    chat = {"conversations": [{"id": "x", "title": "t", "updated": 0, "messages": [
        {"role": "user", "content": payload}, {"role": "assistant", "content": payload}]}], "current": "x"}
    with browser.browser(tmp_path / "profile") as page:
        page.open(root(gw) + "/")
        page.js(f"localStorage.setItem('fedsea.chat.v1', {json.dumps(json.dumps(chat))})")
        page.driver.refresh()
        page.wait("document.readyState === 'complete' && document.querySelectorAll('.msg').length === 2")
        page.js("document.querySelectorAll('#messages a').forEach(a => a.click())")
        time.sleep(0.3)
        assert page.js("window.pwned") is None
        assert page.js("document.querySelectorAll('#messages script, #messages img, #messages [onerror]').length") == 0
        hrefs = page.js("[...document.querySelectorAll('#messages a')].map(a => a.getAttribute('href') || '')")
        assert not [h for h in hrefs if "script:" in h.lower()]
        # The answer is Markdown (a code block, a list); the user's text is shown as typed.
        assert page.js("document.querySelector('.msg.assistant pre code').textContent") == "print('hi')\n"
        assert page.js("document.querySelectorAll('.msg.assistant li').length") == 2
        assert "<script>" in page.js("document.querySelector('.msg.user .body').textContent")
        assert page.requested_hosts() == {httpx.URL(root(gw)).netloc.decode()}  # the <img src=x> never loaded


def test_page_over_https(gateways, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    gw = gateways(ssl_certfile=str(tmp_path / "cert.pem"), ssl_keyfile=str(tmp_path / "key.pem"))
    assert root(gw).startswith("https://")
    with httpx.Client(verify=ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))) as http:
        assert "content-security-policy" in http.get(root(gw) + "/").headers
        assert http.get(root(gw) + "/fedsea/v1/status").json()["api_tls"] is True
    if browser.MISSING is not None:
        return
    with browser.browser(tmp_path / "profile", insecure=True) as page:
        page.open(root(gw) + "/")
        page.wait("document.getElementById('status').textContent.includes('page on')")
        page.wait("document.querySelectorAll('#model option').length")


@needs_browser
def test_page_asks_for_the_key_once(gateways, tmp_path):
    gw = gateways(api_key="s3cret")
    with browser.browser(tmp_path / "profile") as page:
        page.open(root(gw) + "/")
        page.wait("document.getElementById('key-dialog').open")
        page.find("#key-input").send_keys("s3cret")
        page.find("#key-save").click()
        page.wait("document.querySelectorAll('#model option').length")
        page.type_and_enter("#prompt", "hello")
        page.wait(f"document.querySelector('.msg.assistant') && !document.getElementById('send').hidden"
                  f" && ({ANSWER}).length > 0")
        page.open(root(gw) + "/")  # kept in the browser: no second question
        page.wait("document.querySelectorAll('#model option').length")
        assert not page.js("document.getElementById('key-dialog').open")

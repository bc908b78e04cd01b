"""A headless Debian `chromium`, driven over the DevTools protocol with the `websockets`
and `httpx` the project already depends on (no browser download, no Selenium)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import socket
import subprocess
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import websockets

CHROMIUM = shutil.which("chromium")


class Page:
    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)
        self.events: list[dict] = []  # every protocol event seen, in order

    async def call(self, method: str, **params) -> dict:
        i = next(self.ids)
        await self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    async def js(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        r = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait(self, expression: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not await self.js(f"!!({expression})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not true after {timeout} s: {expression}")
            await asyncio.sleep(0.05)

    async def open(self, url: str, width: int = 1280, height: int = 800) -> None:
        await self.size(width, height)
        await self.call("Page.navigate", url=url)
        await self.wait("document.readyState === 'complete'")

    async def size(self, width: int, height: int) -> None:
        await self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=width < 600)

    async def screenshot(self, path: Path, width: int, height: int) -> None:
        await self.size(width, height)
        await asyncio.sleep(0.3)  # a layout pass at the new size
        path.write_bytes(base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"]))

    def requested_hosts(self) -> set[str]:
        return {httpx.URL(e["params"]["request"]["url"]).netloc.decode()
                for e in self.events if e.get("method") == "Network.requestWillBeSent"}

    def errors(self) -> list[dict]:
        return [e["params"] for e in self.events if e.get("method") == "Runtime.exceptionThrown"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def browser(profile: Path, *flags: str):
    """A fresh headless chromium (its own profile, and `flags`) and its first tab."""
    port = _free_port()
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--remote-debugging-port={port}",
         f"--user-data-dir={profile}", *flags, "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
                target = next(t for t in targets if t["type"] == "page")
                break
            except (httpx.HTTPError, StopIteration):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("chromium did not start")
                await asyncio.sleep(0.1)
        async with websockets.connect(target["webSocketDebuggerUrl"], max_size=2**26) as ws:
            page = Page(ws)
            await page.call("Network.enable")
            await page.call("Runtime.enable")
            await page.call("Page.enable")
            yield page
    finally:
        proc.terminate()
        proc.wait(timeout=10)

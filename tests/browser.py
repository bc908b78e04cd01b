"""A headless Debian `chromium` driven by Selenium through Debian's `chromium-driver` (both
from apt, `.ci/run`): the system browser and driver are named explicitly, so Selenium Manager
never runs and nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

os.environ.setdefault("SE_OFFLINE", "true")  # were Selenium Manager ever asked: no downloads

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # the `test` extra not installed: the browser tests skip
    webdriver = None

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = ("no selenium (pyproject's `test` extra)" if webdriver is None
           else "no chromium (Debian package `chromium`)" if CHROMIUM is None
           else "no chromedriver (Debian package `chromium-driver`)" if CHROMEDRIVER is None
           else None)


class Page:
    def __init__(self, driver):
        self.driver = driver
        self.events: list[dict] = []  # the performance log's DevTools events, in order

    def js(self, expression: str):
        """The value of a JavaScript expression in the page."""
        return self.driver.execute_script(f"return ({expression});")

    def wait(self, expression: str, timeout: float = 60) -> None:
        WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
            lambda _: self.js(f"!!({expression})"), message=f"not true after {timeout} s: {expression}")

    def open(self, url: str, width: int = 1280, height: int = 800) -> None:
        self.size(width, height)
        self.driver.get(url)
        self.wait("document.readyState === 'complete'")

    def size(self, width: int, height: int) -> None:
        """A viewport of exactly `width` x `height` CSS pixels (the window less its frame)."""
        self.driver.set_window_size(width, height)
        inner = self.js("[window.innerWidth, window.innerHeight]")
        if inner != [width, height]:
            self.driver.set_window_size(2 * width - inner[0], 2 * height - inner[1])

    def find(self, css: str):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def type_and_enter(self, css: str, text: str) -> None:
        """Click into the field, as a person would, then type `text` and Enter."""
        field = self.find(css)
        field.click()
        field.send_keys(text, Keys.ENTER)

    def screenshot(self, path: Path, width: int, height: int) -> None:
        self.size(width, height)
        time.sleep(0.3)  # a layout pass at the new size
        self.driver.save_screenshot(str(path))

    def _drain(self) -> None:
        self.events += [json.loads(e["message"])["message"] for e in self.driver.get_log("performance")]

    def requested_urls(self) -> list[str]:
        """Every URL the browser asked for since it started (its performance log)."""
        self._drain()
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def requested_hosts(self) -> set[str]:
        return {httpx.URL(u).netloc.decode() for u in self.requested_urls()}

    def errors(self) -> list[dict]:
        """The console's errors: uncaught exceptions, failed loads, CSP violations."""
        return [e for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]


@contextmanager
def browser(profile: Path, insecure: bool = False):
    """A fresh headless chromium (its own profile; `insecure` accepts any TLS certificate)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.accept_insecure_certs = insecure
    # Open on a blank tab: the new-tab page of Debian's chromium would ask its search engine
    # (start.duckduckgo.com) for a page before the tests' first navigation.
    options.add_experimental_option("prefs", {"session.restore_on_startup": 4, "session.startup_urls": ["about:blank"]})
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield Page(driver)
    finally:
        driver.quit()

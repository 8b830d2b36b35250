"""Headless Chromium through Selenium, pointed at Debian's binaries: no driver is downloaded.

The page is read the way a person reads it, from the DOM: rows (``tr[data-id]`` with
``data-status``), event items (``li[data-seq]``), the connection indicator
(``#conn[data-state]``). Waits are for a condition of the page, with a deadline
(tests/support.py's eventually).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests.support import eventually

CHROMIUM = Path(os.environ.get("SANDBOXD_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("SANDBOXD_CHROMEDRIVER", "/usr/bin/chromedriver"))
WINDOW = (1440, 1000)


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    absent = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    return f"{' and '.join(absent)} not found" if absent else None


class Browser:
    """One Chromium and the page it shows."""

    def __init__(self, driver: webdriver.Chrome) -> None:
        self.driver = driver

    @classmethod
    @contextlib.contextmanager
    def start(cls) -> Iterator[Browser]:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for argument in (
            "--headless=new",
            "--no-sandbox",  # root, in a container: Chromium's own sandbox cannot start
            "--disable-dev-shm-usage",
            "--disable-gpu",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
        ):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            yield cls(driver)
        finally:
            driver.quit()  # ends the Chromium it started

    # -- the page ----------------------------------------------------------------------------

    def open(self, port: int, token: str | None, path: str = "/") -> None:
        fragment = "" if token is None else f"#token={token}"
        # A blank page between: the next daemon's page starts from nothing, not from a
        # hash change of the last one (they may share a port across a restart).
        self.driver.get("about:blank")
        self.driver.get(f"http://127.0.0.1:{port}{path}{fragment}")

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def conn_state(self) -> str:
        return str(self.js("return document.getElementById('conn').dataset.state"))

    async def live(self, within: float = 10.0) -> None:
        await eventually(lambda: self.conn_state() == "live", within=within, what="a live page")

    def rows(self) -> dict[str, str]:
        """Sandbox id -> the status the table shows."""
        found: list[list[str]] = self.js(
            "return [...document.querySelectorAll('#sandboxes tbody tr')]"
            ".map(tr => [tr.dataset.id, tr.querySelector('.status').textContent])"
        )
        return dict((i, s) for i, s in found)

    def status_of(self, sandbox_id: str) -> str | None:
        return self.rows().get(sandbox_id)

    def event_seqs(self) -> list[int]:
        """The seqs of the event list, top (newest) first, as shown."""
        return [
            int(s)
            for s in self.js(
                "return [...document.querySelectorAll('#events li')].map(li => li.dataset.seq)"
            )
        ]

    def text(self, css: str) -> str:
        return str(self.js("return document.querySelector(arguments[0]).textContent", css))

    def visible(self, css: str) -> bool:
        return bool(
            self.js("const e = document.querySelector(arguments[0]); return !!e && !e.hidden", css)
        )

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def screenshot(self, path: Path) -> None:
        self.driver.save_screenshot(str(path))

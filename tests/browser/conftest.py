"""The dashboard's tests in real headless Chromium: Debian's `chromium` and `chromium-driver`.

Where they are not installed, the tests here are skipped and the run ends with one line
that says so and how to install them (`.ci/run` installs them before `make test`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.support import Browser, missing_browser

HERE = Path(__file__).parent
SKIPPED_KEY = pytest.StashKey[int]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A conftest's hook sees every item of the run: only this folder's are the browser's.
    mine = [item for item in items if HERE in item.path.parents]
    for item in mine:
        item.add_marker(pytest.mark.browser)
    missing = missing_browser()
    if missing is None or not mine:
        return
    for item in mine:
        item.add_marker(pytest.mark.skip(reason=f"no headless browser: {missing}"))
    config.stash[SKIPPED_KEY] = len(mine)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    skipped = config.stash.get(SKIPPED_KEY, 0)
    if skipped:
        terminalreporter.write_line(
            f"{skipped} browser tests skipped ({missing_browser()}): to run them, install"
            " Chromium and its driver, as .ci/run does: apt-get install chromium chromium-driver"
        )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for a module's tests; each test opens its own daemon's page."""
    with Browser.start() as running:
        yield running

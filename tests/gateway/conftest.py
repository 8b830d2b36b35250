"""Fixtures of the gateway's tests; the helpers are in support.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from tests.daemon_process import DaemonProcess
from tests.gateway.harness import Harness, open_harness
from tests.gateway.support import (
    Daemon,
    make_config,
    start_daemon,
    stop_daemon,
)
from tests.support import end_sandboxes


@pytest.fixture
async def daemon(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Daemon]:
    running = await start_daemon(nursery, make_config(tmp_path / "state"))
    yield running
    await stop_daemon(running)
    nursery.cancel_scope.cancel()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """The daemon on in-memory streams; with the autojump_clock fixture, on virtual time."""
    async with open_harness(tmp_path / "state") as running:
        yield running


@pytest.fixture(scope="module")
def daemon_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("daemon")
    running = DaemonProcess(root, make_config(root / "state"))
    running.start_blocking()
    try:
        yield running
    finally:
        running.stop()
        end_sandboxes(running.state_dir)
    # Whatever the tests sent, nothing failed inside the daemon.
    assert "Traceback" not in running.output(), running.output()

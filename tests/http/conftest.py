"""A real daemon in this process, as the gateway's tests run it (tests/gateway/support.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.gateway.support import Daemon, make_config, start_daemon, stop_daemon


@pytest.fixture
async def daemon(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Daemon]:
    running = await start_daemon(nursery, make_config(tmp_path / "state"))
    yield running
    await stop_daemon(running)
    nursery.cancel_scope.cancel()

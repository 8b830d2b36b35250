"""The actors tests' shared fixture: processes started as sandboxes, always cleaned up."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.actors.children.support import Sandboxes


@pytest.fixture
async def sandboxes(tmp_path: Path) -> AsyncIterator[Sandboxes]:
    sandboxes = Sandboxes(tmp_path)
    try:
        yield sandboxes
    finally:
        await sandboxes.cleanup()


@pytest.fixture(params=["auto", "off"], ids=["cgroup", "markers"])
def cgroup(request: pytest.FixtureRequest) -> str:
    """The boundary a tree test runs on: ``sandboxes.cgroup`` "auto" (a cgroup per sandbox,
    where the host allows it) or "off" (the markers fallback)."""
    setting: str = request.param
    return setting

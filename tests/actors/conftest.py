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

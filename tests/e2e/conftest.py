"""Fixtures of the end-to-end and fault tests (their options are in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def rounds(request: pytest.FixtureRequest) -> int:
    value: int = request.config.getoption("rounds")
    return value


@pytest.fixture
def every_byte(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("every_byte"))

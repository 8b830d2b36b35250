"""Options of the end-to-end and fault tests; the helpers are in support.py.

pytest tests/e2e --rounds 300     # more kill -9 rounds than `make test` runs
"""

from __future__ import annotations

import pytest

DEFAULT_ROUNDS = 30


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help=f"kill -9 rounds of the crash test (default {DEFAULT_ROUNDS})",
    )
    parser.addoption(
        "--every-byte",
        action="store_true",
        default=False,
        help="cut the log at every byte of its last three records, not only the last one",
    )


@pytest.fixture
def rounds(request: pytest.FixtureRequest) -> int:
    # With a default: see the module's docstring.
    value: int = request.config.getoption("rounds", default=DEFAULT_ROUNDS)
    return value


@pytest.fixture
def every_byte(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("every_byte", default=False))

"""Options of the whole suite. Here, at the top, so pytest knows them from the start:

pytest --rounds 300          # more kill -9 rounds than `make test` runs
pytest tests/e2e --every-byte
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

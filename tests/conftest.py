"""Options of the whole suite. Here, at the top, so pytest knows them from the start:

pytest --rounds 300          # more kill -9 rounds than `make test` runs
pytest tests/e2e --every-byte
CI=true pytest               # Hypothesis's "ci" profile (below); .ci/run sets it
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

DEFAULT_ROUNDS = 30

# Hypothesis on CI: a cold, shared machine (2 cores, the rest of the suite beside it)
# says nothing about the code through timing, and a cold run once failed `too_slow`
# while generating inputs. So there: no per-example deadline, and no too_slow check.
# Nothing else changes: the same examples, the same other health checks, and a failure
# prints the blob that reproduces it (@reproduce_failure). Tests that set
# suppress_health_check themselves replace this list, so they name too_slow too.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("ci" if os.environ.get("CI", "").lower() in ("true", "1") else "default")


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

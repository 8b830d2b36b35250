"""Options of the whole suite. Here, at the top, so pytest knows them from the start:

pytest --rounds 300          # more kill -9 rounds than `make test` runs
pytest tests/e2e --every-byte
CI=true pytest               # Hypothesis's "ci" profile (below); .ci/run sets it
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.daemon_process import STATE_DIRS, remove_reachable_dirs
from tests.nats_cluster import nats_cluster  # noqa: F401  (a session fixture: one cluster)
from tests.support import end_sandboxes

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


@pytest.fixture(autouse=True)
def _end_what_daemons_left() -> Iterator[None]:
    """After each test, every daemon it configured (tests/daemon_process.py) has no sandbox
    process and no cgroup left, whatever the test did or failed to do. (A daemon shared by
    a module's tests was configured before: its fixture ends it.)"""
    before = len(STATE_DIRS)
    yield
    for state_dir in STATE_DIRS[before:]:
        end_sandboxes(state_dir)
    del STATE_DIRS[before:]


def _daemon_cgroups() -> set[Path]:
    """Every daemon's parent cgroup on this machine (``sandboxd-<hash>``), in every hierarchy."""
    root = Path("/sys/fs/cgroup")
    patterns = ("*/sandboxd-*", "*/*/sandboxd-*", "*/*/*/sandboxd-*")
    return {path for pattern in patterns for path in root.glob(pattern) if path.is_dir()}


@pytest.fixture(autouse=True, scope="session")
def _remove_daemon_cgroups() -> Iterator[None]:
    """A net under the per-test cleanup: a daemon cgroup the session made and left empty
    (a test whose daemon was not made by daemon_config) is removed at its end."""
    before = _daemon_cgroups()
    yield
    for parent in _daemon_cgroups() - before:
        for path in sorted(parent.glob("**/"), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # busy: something still runs there
                path.rmdir()


@pytest.fixture(autouse=True, scope="session")
def _remove_working_dirs() -> Iterator[None]:
    """The reachable dirs the session's sandboxes had their working dirs in, removed at its end."""
    yield
    remove_reachable_dirs()

"""The restart policy's arithmetic: what a failure is, and the window of restart_max."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from sandboxd.actors import restarts
from sandboxd.actors.specs import SpecConfig
from sandboxd.events.projection import SandboxRecord, Status

SPEC = SpecConfig(id="s", command=("x",), restart="on-failure", restart_max=2, restart_window=10)
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC).timestamp()


def ts(seconds_before_now: float) -> str:
    return datetime.fromtimestamp(NOW - seconds_before_now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record(*restarted: str) -> SandboxRecord:
    blank = SandboxRecord("a", "s", None, Status.RUNNING, ts(99), ts(99), 1, 1, 30000, "/w")
    return msgspec.structs.replace(blank, failure_restarts=restarted)


def test_only_a_clean_exit_is_no_failure() -> None:
    assert not restarts.is_failure(0, None)
    assert restarts.is_failure(1, None)
    assert restarts.is_failure(None, 9)
    assert restarts.is_failure(None, None)  # adopted: how it ended is unknown


def test_at_most_restart_max_in_any_window() -> None:
    assert restarts.gave_up(SPEC, record(), NOW) is None
    assert restarts.gave_up(SPEC, record(ts(5)), NOW) is None
    assert restarts.gave_up(SPEC, record(ts(30), ts(20), ts(5)), NOW) is None  # two are old
    assert restarts.gave_up(SPEC, record(ts(9.9), ts(1)), NOW) == (
        "restart = on-failure gave up: 2 restarts in the last 10 s, restart_max is 2"
    )
    assert restarts.gave_up(SPEC, record(ts(10.1), ts(1)), NOW) is None  # slid out

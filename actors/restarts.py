"""The restart policy of a spec (``restart = "on-failure"``): what is a failure, and whether
the policy may restart once more. Pure: the actor asks, then records what it did.

At most ``restart_max`` restarts in any ``restart_window`` seconds (a sliding window,
as Erlang supervisors count their intensity): the times counted are the ``ts`` of
the sandbox's on-failure ``sandbox.restarted`` events, which the projection keeps
(``SandboxRecord.failure_restarts``). So the count is the log's: a daemon killed
with its counter at N-1 starts again at N-1, never at 0. The price: the window is
counted in wall-clock time (the log's), so a clock stepped back stretches it and
one stepped forward shortens it; monotonic time does not survive a reboot.
"""

from __future__ import annotations

from datetime import datetime

from sandboxd.actors.specs import SpecConfig
from sandboxd.events.projection import SandboxRecord


def is_failure(exit_code: int | None, signal: int | None) -> bool:
    """Whether a process that ended so failed: anything but a clean exit with code 0 (an
    adopted process's unknown status included, as systemd's and Docker's on-failure)."""
    return not (exit_code == 0 and signal is None)


def restarts_in_window(record: SandboxRecord, window: float, now: float) -> int:
    """How many on-failure restarts the sandbox had in the ``window`` seconds before ``now``."""
    return sum(1 for ts in record.failure_restarts if now - _epoch(ts) < window)


def gave_up(spec: SpecConfig, record: SandboxRecord, now: float) -> str | None:
    """Why the policy restarts the sandbox no more (a sentence for its error); None if it
    restarts it once more."""
    count = restarts_in_window(record, spec.restart_window, now)
    if count < spec.restart_max:
        return None
    return (
        f"restart = on-failure gave up: {count} restarts in the last"
        f" {spec.restart_window:g} s, restart_max is {spec.restart_max}"
    )


def _epoch(ts: str) -> float:
    # RFC 3339 with a "Z", as the log writes it (fromisoformat reads "Z" from 3.11 on).
    return datetime.fromisoformat(ts).timestamp()

"""What every part's tests share: waiting for the OS, with a deadline, and reading /proc."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import trio

from sandboxd.config import UserConfig

#: The users of the daemons the gateway and end-to-end tests run; root is the admin.
TOKENS = {
    "alice": "alice-token-0123456789",
    "bob": "bob-token-0123456789abc",
    "root": "root-token-0123456789xyz",
}
ADMINS = {"root"}


def configured_users() -> tuple[UserConfig, ...]:
    """TOKENS as the daemon's Config holds them."""
    return tuple(
        UserConfig(name, hashlib.sha256(token.encode()).hexdigest(), name in ADMINS)
        for name, token in TOKENS.items()
    )


async def eventually(
    condition: Callable[[], bool], *, within: float = 10.0, what: str = "a condition"
) -> None:
    """Wait until ``condition()`` holds, checking every few ms; fail after ``within`` s.

    The conditions are the OS's (a file a child wrote, a state in /proc, a
    socket): there is no event to wait on, so this polls, always with a deadline.
    """
    with trio.move_on_after(within):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.005)
        return
    raise AssertionError(f"timed out after {within} s waiting for {what}")


def proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, T, Z...), None if there is no such pid."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return chr(data[data.rfind(b")") + 2])

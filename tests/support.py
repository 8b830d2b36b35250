"""What every part's tests share: waiting for the OS, with a deadline, reading /proc, and
finding (and ending) a daemon's sandboxes' processes on either boundary."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import trio

from sandboxd.actors import proctree
from sandboxd.actors.boundary.cgroupfs import (
    daemon_dir_name,
    dir_of,
    parse_events,
    parse_mountinfo,
    parse_proc_cgroup,
    sandbox_id_of,
)
from sandboxd.actors.boundary.cgroups import remove_daemon_cgroups
from sandboxd.actors.boundary.discovery import discover
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


# --- A daemon's sandboxes, from the outside ------------------------------------------------


def daemon_marker(state_dir: Path) -> str:
    """What the daemon on ``state_dir`` is called: its cgroups' name, its markers' value."""
    return daemon_dir_name(os.path.realpath(state_dir))


def sandbox_pids(state_dir: Path) -> dict[str, list[int]]:
    """Every live process of the daemon's sandboxes, by sandbox id, on either boundary:
    the members of its sandboxes' cgroups, and the processes carrying its markers."""
    found: dict[str, set[int]] = {}
    marker = daemon_marker(state_dir)
    layout = discover().layout
    if layout is not None:
        parent = os.path.join(layout.tree, marker)
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(parent):
                sandbox_id = sandbox_id_of(name)
                if sandbox_id is None:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    text = Path(parent, name, "cgroup.procs").read_text()
                    live = [int(p) for p in text.split() if proc_state(int(p)) not in ("Z", None)]
                    if live:
                        found.setdefault(sandbox_id, set()).update(live)
    for sandbox_id, procs in proctree.find_marked(marker).items():
        found.setdefault(sandbox_id, set()).update(p.pid for p in procs)
    return {sandbox_id: sorted(pids) for sandbox_id, pids in found.items()}


def end_sandboxes(state_dir: Path) -> None:
    """SIGKILL every process of the daemon's sandboxes and remove its cgroups (parents too).

    The marked ones are signalled only if their pid still holds the process found.
    """
    layout = discover().layout
    if layout is not None:
        remove_daemon_cgroups(layout, state_dir=state_dir)
    marker = daemon_marker(state_dir)
    deadline = time.monotonic() + 10
    while (marked := proctree.find_marked(marker)) and time.monotonic() < deadline:
        for procs in marked.values():
            for proc in procs:
                if proctree.is_alive(proc):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
        time.sleep(0.01)


def ids_of(pid: int) -> tuple[set[int], set[int]]:
    """The uids (real, effective, saved, filesystem) and gids of a process, as /proc says."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {int(x) for x in fields["Uid"].split()}, {int(x) for x in fields["Gid"].split()}


def is_paused(pid: int) -> bool:
    """Whether the process is paused as its boundary pauses: its cgroup frozen (the kernel
    says so in cgroup.events; /proc shows a frozen task as sleeping), or stopped (T)."""
    state = proc_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    if state in ("T", "t"):
        return True
    try:
        placed = parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text()).v2
        mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return False
    for mount in mounts:
        if mount.version == 2 and placed is not None:
            directory = dir_of(mount, placed)
            if directory is not None:
                with contextlib.suppress(OSError):
                    events = Path(directory, "cgroup.events").read_text()
                    return parse_events(events).frozen
    return False

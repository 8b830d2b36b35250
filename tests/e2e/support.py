"""End-to-end support: a real `sandboxd serve` subprocess, and ways to look behind its back.

The daemon runs as `python -m sandboxd.cli serve --config F`, the way an
operator runs it (tests/daemon_process.py), so SIGKILL and SIGTERM are real.
Its sandboxes' children are `sleep` (no HTTP check: RUNNING as soon as they
run), so a test starts one in milliseconds. Everything the tests check after a
restart is read from the outside: the state through the gateway, the log
offline from its files (the same reader as `sandboxd log dump`), the processes
from /proc.

Every wait is for a condition, with a deadline. Everything a test starts is
ended by its own pid: the daemon by the pid of its Popen, the sandboxes by
their cgroups (named for the test's own state dir) or their markers
(tests.support.end_sandboxes), and the cgroups are removed.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from sandboxd.actors import proctree
from sandboxd.actors.boundary.cgroupfs import sandbox_dir_name
from sandboxd.actors.boundary.discovery import discover
from sandboxd.actors.info import SandboxInfo, sandbox_info
from sandboxd.actors.specs import SpecConfig
from sandboxd.cli import main as sandboxd_cli
from sandboxd.config import Config
from sandboxd.daemon import run_daemon
from sandboxd.events import audit, codec
from sandboxd.events import types as ev
from sandboxd.events.projection import SandboxRecord, State, apply
from sandboxd.events.store import StoreConfig, open_store
from sandboxd.gateway.server import Gateway
from tests.daemon_process import DaemonProcess, agent_command, daemon_config
from tests.support import TOKENS, daemon_marker, end_sandboxes, is_paused, sandbox_pids

SLEEP = shutil.which("sleep") or "/bin/sleep"

ROOT = TOKENS["root"]

SLEEP_SPEC = SpecConfig(
    id="sleep", command=(SLEEP, "3600"), health_check_path="", inherit_env=("PATH",)
)
#: The project's reference agent server, with a fast liveness check (5 probes a second).
AGENT_SPEC = SpecConfig(
    id="agent",
    command=agent_command(),
    health_check_path="/alive",
    health_interval=0.2,
    ready_timeout=20.0,
    inherit_env=("PATH",),
)


def make_config(state_dir: Path, **changes: Any) -> Config:
    """This suite's daemon: the specs above; sandboxes outlive it (on_shutdown "keep")."""
    return daemon_config(state_dir, (SLEEP_SPEC, AGENT_SPEC), on_shutdown="keep", **changes)


@contextlib.asynccontextmanager
async def daemon_in_process(config: Config) -> AsyncIterator[Gateway]:
    """The real wiring (run_daemon) in this process, left by cancelling it: as a crash
    leaves it, with no daemon.stopping, no shutdown snapshot, and sandboxes running on."""
    async with trio.open_nursery() as nursery:
        gateway: Gateway = await nursery.start(run_daemon, config)
        yield gateway
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def daemon_process(
    root: Path, *, state_dir: Path | None = None, **settings: Any
) -> AsyncIterator[DaemonProcess]:
    """A started `sandboxd serve` (``settings``: Config fields); afterwards it and every
    sandbox process it made are ended."""
    daemon = DaemonProcess(root, make_config(state_dir or root / "state", **settings))
    try:
        await daemon.start()
        yield daemon
    finally:
        end_daemon(daemon)
    assert "Traceback" not in daemon.output(), daemon.output()


# --- Processes ----------------------------------------------------------------------------


def sandbox_processes(state_dir: Path) -> dict[str, list[proctree.ProcessId]]:
    """Live processes of the daemon on ``state_dir``'s sandboxes, by sandbox id: its
    sandboxes' cgroups' members, and the processes carrying its markers."""
    found: dict[str, list[proctree.ProcessId]] = {}
    for sandbox_id, pids in sandbox_pids(state_dir).items():
        procs = [p for pid in pids if (p := proctree.process_id(pid)) is not None]
        if procs:
            found[sandbox_id] = procs
    return found


def end_daemon(daemon: DaemonProcess) -> None:
    """Kill the daemon, then every process its sandboxes left, and remove its cgroups."""
    daemon.kill()
    end_sandboxes(daemon.state_dir)


def paused(pid: int) -> bool:
    """Paused as the boundary pauses: its cgroup frozen, or stopped by a signal."""
    return is_paused(pid)


def continue_by_hand(pid: int) -> None:
    """What a person does to let a paused process run behind the daemon's back: SIGCONT,
    and, where a cgroup freezes it (which SIGCONT does not undo), thaw that cgroup."""
    os.kill(pid, 18)  # SIGCONT
    placed = Path(f"/proc/{pid}/cgroup").read_text()
    layout = discover().layout
    v2 = next((line[3:] for line in placed.splitlines() if line.startswith("0::")), None)
    if layout is not None and v2 is not None and v2 != "/":
        freeze = Path(layout.tree + v2, "cgroup.freeze")
        if freeze.exists():
            freeze.write_text("0")


def spawn_stray(state_dir: Path, sandbox_id: str, *argv: str) -> subprocess.Popen[bytes]:
    """A process the daemon on ``state_dir`` takes for ``sandbox_id``'s, placed as the actor
    places them: in the sandbox's cgroup where the host has cgroups (made if need be),
    else carrying its markers."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        proctree.MARKER_VAR: sandbox_id,
        proctree.DAEMON_MARKER: daemon_marker(state_dir),
    }
    layout = discover().layout
    procs: int | None = None
    if layout is not None:
        cgroup = Path(layout.tree, daemon_marker(state_dir), sandbox_dir_name(sandbox_id))
        cgroup.mkdir(parents=True, exist_ok=True)
        procs = os.open(cgroup / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        del env[proctree.DAEMON_MARKER]  # with cgroups, no process carries it

    def join() -> None:
        if procs is not None:
            os.write(procs, b"0")

    try:
        return subprocess.Popen(
            list(argv) or [SLEEP, "3600"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=join,
        )
    finally:
        if procs is not None:
            os.close(procs)


#: A process that writes the number of every signal it receives to the file named
#: by argv[1], and says "ready" there once its handlers are installed.
SIGNAL_RECORDER = """
import os, signal, sys, time
path = sys.argv[1]
def note(signum, frame):
    with open(path, "a") as f:
        f.write(f"{signum}\\n")
for s in signal.valid_signals():
    if s not in (signal.SIGKILL, signal.SIGSTOP):
        try:
            signal.signal(s, note)
        except (OSError, ValueError):
            pass
with open(path, "a") as f:
    f.write("ready\\n")
while True:
    time.sleep(3600)
"""


# --- The log, read offline -----------------------------------------------------------------


def read_log(state_dir: Path) -> list[ev.Event]:
    """Every event of the log, from seq 1, read from its files (`sandboxd log dump`)."""
    out, err = io.StringIO(), io.StringIO()
    code = audit.dump(state_dir, out, err=err)
    assert code == 0, err.getvalue()
    return [codec.decode(line.encode()) for line in out.getvalue().splitlines()]


def replay(events: Iterable[ev.Event]) -> State:
    """The fold of ``events`` from an empty state: no snapshot involved."""
    state = State()
    for event in events:
        apply(state, event)
    return state


def verify_log(state_dir: Path) -> tuple[int, str]:
    """`sandboxd log verify --state-dir DIR`, in this process: its exit code and output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = sandboxd_cli(["log", "verify", "--state-dir", str(state_dir)])
    return code, out.getvalue()


async def append_offline(state_dir: Path, pendings: list[ev.PendingEvent]) -> list[ev.Event]:
    """Append events with no daemon running, through the real store (codec, log, checks)."""
    async with open_store(state_dir, StoreConfig()) as store:
        return await store.append_many(pendings)


def differences(info: SandboxInfo, record: SandboxRecord) -> list[str]:
    """Where a SandboxInfo from the gateway and a record of a replay differ (not the key)."""
    mine = attrs.asdict(sandbox_info(record, ""), recurse=False)
    theirs = attrs.asdict(info, recurse=False)
    return [
        f"{key}: gateway {theirs[key]!r}, replay {value!r}"
        for key, value in mine.items()
        if key != "session_api_key" and theirs[key] != value
    ]


# --- A subscription by hand (protocol.md, no client library) ------------------------------


async def raw_subscription(
    url: str,
    token: str,
    after_seq: int,
    until: Callable[[list[dict[str, Any]]], bool],
    frames: list[dict[str, Any]],
) -> None:
    """Subscribe after ``after_seq`` and append every frame of the subscription to ``frames``
    until ``until(frames)`` holds or the server closes the connection.

    By hand, so that what is checked is the server's stream, not a client's dedup.
    """
    from trio_websocket import ConnectionClosed, open_websocket_url

    headers = [(b"Authorization", f"Bearer {token}".encode())]
    async with open_websocket_url(url, extra_headers=headers) as ws:
        await ws.send_message(
            json.dumps({"id": 1, "op": "events.subscribe", "after_seq": after_seq})
        )
        try:
            while not until(frames):
                frame = json.loads(await ws.get_message())
                if "subscription" in frame:
                    frames.append(frame)
                else:
                    assert frame.get("ok") is True, frame
        except ConnectionClosed:
            return


def seqs_of(frames: Iterable[Mapping[str, Any]]) -> list[int]:
    return [f["event"]["seq"] for f in frames if "event" in f]


# --- A full disk ----------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real small disk at ``mount`` (made here), unmounted afterwards; skips the test
    where mounting is not permitted."""
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(
            f"a full disk is a small tmpfs, and mounting one is not permitted here "
            f"({done.stderr.strip() or done.returncode}): run as root with mount rights"
        )
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path) -> Path:
    """Take every free block of ``mount`` with one file; return its path."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        chunk = 1 << 16
        while True:
            try:
                os.write(fd, b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if chunk == 1:
                    return filler
                chunk //= 2
    finally:
        os.close(fd)
